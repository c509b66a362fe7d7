//! The `[api]` section: where the HTTP API listens, the URL others use, and
//! the credentials of operator requests.

use std::net::SocketAddr;

use serde::Deserialize;

use super::context::Context;
use super::env::EnvKind;
use super::values::OneOrMany;
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
}

const DEFAULT_API_PORT: u16 = 8008;

pub(super) const KEYS: &[(&str, EnvKind)] = &[
    ("api.listen", EnvKind::List),
    ("api.advertise_url", EnvKind::Text),
    ("api.token", EnvKind::Text),
    ("api.username", EnvKind::Text),
    ("api.password", EnvKind::Text),
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileApi {
    listen: Option<OneOrMany>,
    advertise_url: String,
    token: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

impl FileApi {
    pub(super) fn validate(
        self,
        cx: &Context<'_>,
        family: IpFamily,
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
        let url = self.advertise_url.trim().trim_end_matches('/');
        if let Err(why) = HttpUrl::parse(url) {
            return Err(cx.invalid(
                "api.advertise_url",
                format!(
                    "expected a URL like \"http://n1.internal:8008\" or \"http://[fdaa::2]:8008\" ({why}), got {:?}",
                    self.advertise_url
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
        Ok(ApiConfig {
            listen,
            advertise_url: url.to_owned(),
            token: self.token.map(Secret::new),
            username: self.username,
            password: self.password.map(Secret::new),
        })
    }
}
