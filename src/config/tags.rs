//! The `[tags]` section: how this node takes part in elections and routing.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::env::EnvKind;

/// The validated section is the decision core's own type.
pub use crate::ha::Tags;

const DEFAULT_FAILOVER_PRIORITY: i32 = 1;

pub(super) const KEYS: &[(&str, EnvKind)] = &[
    ("tags.nofailover", EnvKind::Boolean),
    ("tags.noloadbalance", EnvKind::Boolean),
    ("tags.nosync", EnvKind::Boolean),
    ("tags.failover_priority", EnvKind::Integer),
];

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct FileTags {
    nofailover: Option<bool>,
    noloadbalance: Option<bool>,
    nosync: Option<bool>,
    failover_priority: Option<i32>,
    #[serde(default)]
    extra: BTreeMap<String, String>,
}

impl FileTags {
    pub(super) fn validate(self) -> Tags {
        Tags {
            nofailover: self.nofailover.unwrap_or(false),
            noloadbalance: self.noloadbalance.unwrap_or(false),
            nosync: self.nosync.unwrap_or(false),
            failover_priority: self.failover_priority.unwrap_or(DEFAULT_FAILOVER_PRIORITY),
            extra: self.extra,
        }
    }
}
