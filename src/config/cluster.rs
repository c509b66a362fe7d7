//! The `[cluster]` section: seeds of the dynamic cluster configuration,
//! written to etcd by the node that bootstraps the cluster.

use std::time::Duration;

use serde::Deserialize;

use super::context::Context;
use super::env::EnvKind;
use super::values::{ByteSize, FileDuration};
use super::ConfigError;

#[derive(Debug, Clone)]
pub struct ClusterDefaults {
    /// Replicas lagging more than this many bytes are not promoted.
    pub maximum_lag_on_failover: u64,
    /// How long a crashed primary may take to come back before the key is released.
    pub primary_start_timeout: Duration,
    /// How long the primary keeps the slot of a member gone from etcd.
    pub member_slot_grace: Duration,
    /// Only nodes of this region may become primary.
    pub primary_region: Option<String>,
    /// Reclone a former primary whose rewind failed (the old data directory
    /// is moved aside, never deleted).
    pub auto_reinit: bool,
    /// Written to the dynamic config when this node bootstraps the cluster.
    pub failsafe_mode: bool,
    pub synchronous_mode: crate::ha::SyncMode,
    pub synchronous_node_count: u32,
}

const DEFAULT_MAXIMUM_LAG_ON_FAILOVER: u64 = 1024 * 1024;
const DEFAULT_PRIMARY_START_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_MEMBER_SLOT_GRACE: Duration = Duration::from_secs(30);

pub(super) const KEYS: &[(&str, EnvKind)] = &[
    ("cluster.maximum_lag_on_failover", EnvKind::Text),
    ("cluster.primary_start_timeout", EnvKind::Text),
    ("cluster.member_slot_grace", EnvKind::Text),
    ("cluster.primary_region", EnvKind::Text),
    ("cluster.auto_reinit", EnvKind::Boolean),
    ("cluster.failsafe_mode", EnvKind::Boolean),
    ("cluster.synchronous_mode", EnvKind::Text),
    ("cluster.synchronous_node_count", EnvKind::Integer),
];

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct FileCluster {
    maximum_lag_on_failover: Option<ByteSize>,
    primary_start_timeout: Option<FileDuration>,
    member_slot_grace: Option<FileDuration>,
    primary_region: Option<String>,
    auto_reinit: Option<bool>,
    failsafe_mode: Option<bool>,
    synchronous_mode: Option<crate::ha::SyncMode>,
    synchronous_node_count: Option<u32>,
}

impl FileCluster {
    pub(super) fn validate(self, cx: &Context<'_>) -> Result<ClusterDefaults, ConfigError> {
        let synchronous_node_count = self.synchronous_node_count.unwrap_or(1);
        if synchronous_node_count == 0 {
            return Err(cx.invalid("cluster.synchronous_node_count", "expected at least 1"));
        }
        Ok(ClusterDefaults {
            failsafe_mode: self.failsafe_mode.unwrap_or(false),
            synchronous_mode: self.synchronous_mode.unwrap_or_default(),
            synchronous_node_count,
            maximum_lag_on_failover: self
                .maximum_lag_on_failover
                .map_or(DEFAULT_MAXIMUM_LAG_ON_FAILOVER, |b| b.0),
            primary_start_timeout: self
                .primary_start_timeout
                .map_or(DEFAULT_PRIMARY_START_TIMEOUT, |d| d.0),
            member_slot_grace: self
                .member_slot_grace
                .map_or(DEFAULT_MEMBER_SLOT_GRACE, |d| d.0),
            primary_region: self.primary_region.filter(|r| !r.is_empty()),
            auto_reinit: self.auto_reinit.unwrap_or(false),
        })
    }
}
