//! The `[api]` section: where the HTTP API listens, the URL others use, and
//! the credentials of operator requests.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::context::Context;
use super::env::EnvKind;
use super::identity::{self, Defaulted, Origin};
use super::values::{FileDuration, OneOrMany};
use super::{ConfigError, Secret};
use crate::net::{HttpUrl, IpFamily};

#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub listen: Vec<SocketAddr>,
    /// URL other members and the CLI use to reach this API.
    pub advertise_url: String,
    /// Bearer token that authorizes operator requests.
    pub token: Option<Secret>,
    /// Basic-auth credentials that authorize operator requests.
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// How long a load balancer polling `/primary` takes to take a node out
    /// after its check turned 503 (HAProxy: `inter × fall`). A primary that
    /// stops being one keeps Postgres down this long before it runs as a
    /// standby. 0 when only pgha's router (which follows the lease) or
    /// multi-host libpq strings route clients.
    pub balancer_window: Duration,
}

const DEFAULT_API_PORT: u16 = 8008;
/// `inter 1s fall 2` as in `config/haproxy.cfg`: the second failed check
/// comes at most 2 s after the 503, and half a second covers its answer.
pub const DEFAULT_BALANCER_WINDOW: Duration = Duration::from_millis(2_500);
const MAX_BALANCER_WINDOW: Duration = Duration::from_secs(60);

pub(super) const KEYS: &[(&str, EnvKind)] = &[
    ("api.listen", EnvKind::List),
    ("api.advertise_url", EnvKind::Text),
    ("api.token", EnvKind::Text),
    ("api.username", EnvKind::Text),
    ("api.password", EnvKind::Text),
    ("api.balancer_window", EnvKind::Text),
];

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct FileApi {
    listen: Option<OneOrMany>,
    advertise_url: Option<String>,
    token: Option<String>,
    username: Option<String>,
    password: Option<String>,
    balancer_window: Option<FileDuration>,
}

impl FileApi {
    /// Without `advertise_url`, the URL is built from `advertise_host` (of
    /// `[postgresql]`), the first listen port and `https` (`tls.api`), and
    /// noted in `defaulted`.
    pub(super) fn validate(
        self,
        cx: &Context<'_>,
        family: IpFamily,
        advertise_host: &str,
        https: bool,
        defaulted: &mut Vec<Defaulted>,
    ) -> Result<ApiConfig, ConfigError> {
        let listen = match self.listen {
            Some(list) => list
                .0
                .iter()
                // A string may hold several, as in postgresql.conf.
                .flat_map(|entry| entry.split(','))
                .enumerate()
                .map(|(index, text)| {
                    let key = format!("api.listen[{index}]");
                    let addr = text.trim().parse::<SocketAddr>().map_err(|_| {
                        cx.invalid(
                            &key,
                            format!(
                                "expected an address like \"[::]:8008\", \"[fdaa::2]:8008\" or \"0.0.0.0:8008\", got {text:?}"
                            ),
                        )
                    })?;
                    if family.allows(addr.ip()) {
                        Ok(addr)
                    } else {
                        Err(cx.invalid(
                            &key,
                            format!(
                                "{text:?} is not an address of ip_family {:?}",
                                family.as_str()
                            ),
                        ))
                    }
                })
                .collect::<Result<Vec<_>, _>>()?,
            None => vec![SocketAddr::new(family.wildcard(), DEFAULT_API_PORT)],
        };
        if listen.is_empty() {
            return Err(cx.invalid(
                "api.listen",
                "expected at least one address, like \"[::]:8008\"",
            ));
        }
        let given = self.advertise_url.as_deref().map(str::trim);
        let url = match given {
            Some(text) => text.trim_end_matches('/').to_owned(),
            None => {
                let url =
                    identity::api_url(advertise_host, &listen, https).expect("listen is not empty");
                defaulted.push(Defaulted {
                    key: "api.advertise_url",
                    value: url.clone(),
                    origin: Origin::Derived("postgresql.advertise_host and api.listen"),
                });
                url
            }
        };
        if let Err(why) = HttpUrl::parse(&url) {
            return Err(cx.invalid(
                "api.advertise_url",
                format!(
                    "expected a URL like \"http://n1.internal:8008\" or \"http://[fdaa::2]:8008\" ({why}), got {:?}",
                    given.unwrap_or(&url)
                ),
            ));
        }
        if self.username.is_some() != self.password.is_some() {
            return Err(cx.invalid(
                "api.username",
                "api.username and api.password go together: set both or neither",
            ));
        }
        for (key, value) in [("api.token", &self.token), ("api.password", &self.password)] {
            if value.as_deref().is_some_and(str::is_empty) {
                return Err(cx.invalid(key, "must not be empty"));
            }
        }
        let balancer_window = self
            .balancer_window
            .map_or(DEFAULT_BALANCER_WINDOW, |d| d.0);
        if balancer_window > MAX_BALANCER_WINDOW {
            return Err(cx.invalid(
                "api.balancer_window",
                format!(
                    "expected at most {} (a load balancer's inter × fall), got {}",
                    humantime::format_duration(MAX_BALANCER_WINDOW),
                    humantime::format_duration(balancer_window)
                ),
            ));
        }
        Ok(ApiConfig {
            balancer_window,
            listen,
            advertise_url: url,
            token: self.token.map(Secret::new),
            username: self.username,
            password: self.password.map(Secret::new),
        })
    }
}
