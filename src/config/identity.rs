//! A node's identity when the file leaves it out: its name, region,
//! advertised Postgres host, API URL and the service names of its
//! certificate, from the platform's environment (Fly.io's `FLY_*`
//! variables) or the hostname, so one image and one file serve every Machine
//! of an app. Pure functions of [`Platform`], which the loader reads once.

use std::net::{IpAddr, SocketAddr};

use super::env::EnvSource;

/// The Machine's id (Fly.io): the node's name by default.
pub const MACHINE_ID: &str = "FLY_MACHINE_ID";
/// The Machine's private IPv6 address (Fly.io): the advertised host by default.
pub const PRIVATE_IP: &str = "FLY_PRIVATE_IP";
/// The Machine's region (Fly.io): the node's region by default.
pub const REGION: &str = "FLY_REGION";
/// The app's name (Fly.io): `<app>.internal` is a service name by default.
pub const APP_NAME: &str = "FLY_APP_NAME";

/// What the environment says about the machine this agent runs on. A
/// variable set to the empty string counts as unset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Platform {
    pub machine_id: Option<String>,
    pub private_ip: Option<String>,
    pub region: Option<String>,
    pub app_name: Option<String>,
    pub hostname: Option<String>,
}

impl Platform {
    /// Reads the variables (and the hostname) from `env`.
    pub fn from_env(env: &dyn EnvSource) -> Platform {
        let vars = env.vars();
        let var = |name: &str| {
            vars.iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        Platform {
            machine_id: var(MACHINE_ID),
            private_ip: var(PRIVATE_IP),
            region: var(REGION),
            app_name: var(APP_NAME),
            hostname: env
                .hostname()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty()),
        }
    }
}

/// Where a value the file left out came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A variable of the platform, e.g. `FLY_MACHINE_ID`.
    Env(&'static str),
    /// The machine's hostname.
    Hostname,
    /// Built from other keys, named here.
    Derived(&'static str),
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Env(var) => write!(f, "${var}"),
            Origin::Hostname => f.write_str("the hostname"),
            Origin::Derived(from) => f.write_str(from),
        }
    }
}

/// A key the file left out, the value it got and where that came from:
/// shown by `pgha check-config` and logged at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Defaulted {
    pub key: &'static str,
    pub value: String,
    pub origin: Origin,
}

/// Why no value could be found: the message, and the platform variable
/// whose value was unusable, if one was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub env_var: Option<&'static str>,
    pub message: String,
}

/// Hostnames every machine may have: they cannot tell nodes apart.
const SHARED_HOSTNAMES: &[&str] = &["localhost", "localhost.localdomain"];

/// `name` when neither the file nor `PGHA_NAME` sets it: the Machine id,
/// else the hostname (a name only has to be unique, not reachable).
pub fn node_name(platform: &Platform) -> Result<(String, Origin), Problem> {
    if let Some(id) = &platform.machine_id {
        return Ok((id.clone(), Origin::Env(MACHINE_ID)));
    }
    match &platform.hostname {
        Some(host) if SHARED_HOSTNAMES.contains(&host.to_ascii_lowercase().as_str()) => {
            Err(Problem {
                env_var: None,
                message: format!(
                    "not set, and the hostname {host:?} does not tell nodes apart: \
                     set name or PGHA_NAME"
                ),
            })
        }
        Some(host) => Ok((host.clone(), Origin::Hostname)),
        None => Err(Problem {
            env_var: None,
            message: format!(
                "required key missing: set it or PGHA_NAME (by default ${MACHINE_ID} \
                 gives it, else the hostname; neither is known)"
            ),
        }),
    }
}

/// `region` when the file leaves it out: the Machine's region, if any.
pub fn region(platform: &Platform) -> Option<(String, Origin)> {
    platform
        .region
        .clone()
        .map(|region| (region, Origin::Env(REGION)))
}

/// `postgresql.advertise_host` when neither the file nor the environment
/// sets it: the Machine's private address. Never the hostname: other
/// members must be able to reach it, and a hostname only they cannot
/// resolve would fail at the first clone, not here.
pub fn advertise_host(platform: &Platform) -> Result<(String, Origin), Problem> {
    match &platform.private_ip {
        Some(text) => {
            let literal = text
                .strip_prefix('[')
                .and_then(|r| r.strip_suffix(']'))
                .unwrap_or(text);
            literal
                .parse::<IpAddr>()
                .map(|ip| (ip.to_string(), Origin::Env(PRIVATE_IP)))
                .map_err(|_| Problem {
                    env_var: Some(PRIVATE_IP),
                    message: format!("expected an IP address, like \"fdaa:0:1::2\", got {text:?}"),
                })
        }
        None => Err(Problem {
            env_var: None,
            message: format!(
                "required key missing: set it or PGHA_POSTGRESQL_ADVERTISE_HOST to the name \
                 or address other members reach this node at (by default ${PRIVATE_IP} \
                 gives it, and it is not set)"
            ),
        }),
    }
}

/// `api.advertise_url` when neither the file nor the environment sets it:
/// the advertised host (an IPv6 literal in brackets) and the port of the
/// first listen address.
pub fn api_url(advertise_host: &str, listen: &[SocketAddr], https: bool) -> Option<String> {
    let port = listen.first()?.port();
    let scheme = if https { "https" } else { "http" };
    Some(format!(
        "{scheme}://{}",
        crate::net::host_port(advertise_host, port)
    ))
}

/// `tls.service_names` when the file leaves it out: `<app>.internal`, the
/// name that resolves to every Machine of the app, on Fly.io; else none.
pub fn service_names(platform: &Platform) -> Result<Option<(Vec<String>, Origin)>, Problem> {
    let Some(app) = &platform.app_name else {
        return Ok(None);
    };
    let label_ok = app.len() <= 63
        && app.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && !app.starts_with('-')
        && !app.ends_with('-');
    if !label_ok {
        return Err(Problem {
            env_var: Some(APP_NAME),
            message: format!(
                "expected an app name of letters, digits and '-' (for <app>.internal), got {app:?}"
            ),
        });
    }
    Ok(Some((
        vec![format!("{}.internal", app.to_ascii_lowercase())],
        Origin::Env(APP_NAME),
    )))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::config::testing::WithHostname;

    fn fly(id: &str, ip: &str) -> Platform {
        Platform {
            machine_id: Some(id.into()),
            private_ip: Some(ip.into()),
            region: Some("ams".into()),
            app_name: Some("mydb".into()),
            hostname: Some(id.into()),
        }
    }

    #[test]
    fn the_platform_is_read_from_the_variables_and_the_hostname() {
        let vars: BTreeMap<String, String> = [
            (MACHINE_ID, "3d8d9e1b2c4e89"),
            (PRIVATE_IP, " fdaa:0:c037:a7b:c207:e395:9a80:2 "),
            (REGION, ""),
            ("PATH", "/usr/bin"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let platform = Platform::from_env(&WithHostname(vars.clone(), "db-1\n"));
        assert_eq!(
            platform,
            Platform {
                machine_id: Some("3d8d9e1b2c4e89".into()),
                private_ip: Some("fdaa:0:c037:a7b:c207:e395:9a80:2".into()),
                // Empty counts as unset.
                region: None,
                app_name: None,
                hostname: Some("db-1".into()),
            }
        );
        assert_eq!(Platform::from_env(&vars).hostname, None);
    }

    #[test]
    fn the_name_is_the_machine_id_else_the_hostname() {
        assert_eq!(
            node_name(&fly("3d8d9e1b2c4e89", "fdaa::2")),
            Ok(("3d8d9e1b2c4e89".into(), Origin::Env(MACHINE_ID)))
        );
        let host = Platform {
            hostname: Some("db-1.example.com".into()),
            ..Platform::default()
        };
        assert_eq!(
            node_name(&host),
            Ok(("db-1.example.com".into(), Origin::Hostname))
        );
        for shared in ["localhost", "LOCALHOST.localdomain"] {
            let problem = node_name(&Platform {
                hostname: Some(shared.into()),
                ..Platform::default()
            })
            .unwrap_err();
            assert_eq!(problem.env_var, None);
            assert!(
                problem.message.contains("does not tell nodes apart"),
                "{problem:?}"
            );
        }
        let problem = node_name(&Platform::default()).unwrap_err();
        assert!(
            problem
                .message
                .starts_with("required key missing: set it or PGHA_NAME"),
            "{problem:?}"
        );
    }

    #[test]
    fn the_advertised_host_is_the_private_address_never_the_hostname() {
        assert_eq!(
            advertise_host(&fly("m", "fdaa:0:c037:a7b:c207:e395:9a80:2")),
            Ok((
                "fdaa:0:c037:a7b:c207:e395:9a80:2".into(),
                Origin::Env(PRIVATE_IP)
            ))
        );
        // Brackets and leading zeros go; IPv4 works too.
        assert_eq!(
            advertise_host(&fly("m", "[fdaa:0:0::0002]")).unwrap().0,
            "fdaa::2"
        );
        assert_eq!(advertise_host(&fly("m", "10.0.0.7")).unwrap().0, "10.0.0.7");
        let bad = advertise_host(&fly("m", "fdaa::zz")).unwrap_err();
        assert_eq!(bad.env_var, Some(PRIVATE_IP));
        assert!(bad.message.contains("got \"fdaa::zz\""), "{bad:?}");
        let missing = advertise_host(&Platform {
            hostname: Some("db-1".into()),
            ..Platform::default()
        })
        .unwrap_err();
        assert_eq!(missing.env_var, None);
        assert!(
            missing
                .message
                .starts_with("required key missing: set it or PGHA_POSTGRESQL_ADVERTISE_HOST"),
            "{missing:?}"
        );
    }

    #[test]
    fn the_api_url_brackets_ipv6_literals_and_takes_the_first_listen_port() {
        let listen: Vec<SocketAddr> = vec![
            "[::]:8008".parse().unwrap(),
            "0.0.0.0:9000".parse().unwrap(),
        ];
        assert_eq!(
            api_url("fdaa::2", &listen, false).as_deref(),
            Some("http://[fdaa::2]:8008")
        );
        assert_eq!(
            api_url("n1.internal", &listen[1..], true).as_deref(),
            Some("https://n1.internal:9000")
        );
        assert_eq!(
            api_url("10.0.0.7", &listen, false).as_deref(),
            Some("http://10.0.0.7:8008")
        );
        assert_eq!(api_url("n1", &[], false), None);
        // What comes out parses as the URL the key expects.
        let url = api_url("fdaa:0:c037::2", &listen, false).unwrap();
        crate::net::HttpUrl::parse(&url).unwrap();
    }

    #[test]
    fn the_service_name_is_the_app_s_internal_name() {
        assert_eq!(
            service_names(&fly("m", "fdaa::2")),
            Ok(Some((vec!["mydb.internal".into()], Origin::Env(APP_NAME))))
        );
        assert_eq!(service_names(&Platform::default()), Ok(None));
        let bad = service_names(&Platform {
            app_name: Some("my.db".into()),
            ..Platform::default()
        })
        .unwrap_err();
        assert_eq!(bad.env_var, Some(APP_NAME));
    }

    #[test]
    fn the_region_is_the_machine_s() {
        assert_eq!(
            region(&fly("m", "fdaa::2")),
            Some(("ams".into(), Origin::Env(REGION)))
        );
        assert_eq!(region(&Platform::default()), None);
    }

    #[test]
    fn origins_read_as_their_source() {
        assert_eq!(Origin::Env(MACHINE_ID).to_string(), "$FLY_MACHINE_ID");
        assert_eq!(Origin::Hostname.to_string(), "the hostname");
    }
}
