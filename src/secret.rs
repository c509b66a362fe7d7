//! Secrets (passwords, tokens, private keys) as a type that never prints its
//! value. A leaf module: config, tls and api all hold secrets, and none of
//! them needs the others for it.

use std::fmt;

/// A password or other secret: never printed by `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}
