//! The `[timing]` section: lease TTL, loop interval, operation timeout and
//! shutdown deadline, checked against each other.

use std::time::Duration;

use serde::Deserialize;

use super::context::Context;
use super::env::EnvKind;
use super::values::FileDuration;
use super::ConfigError;

#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Lease TTL of the leader key and member keys.
    pub ttl: Duration,
    /// Interval between two passes of the agent loop when nothing wakes it.
    pub loop_wait: Duration,
    /// Timeout of one etcd or Postgres operation before it counts as failed.
    pub retry_timeout: Duration,
    /// How long a graceful stop (SIGINT/SIGTERM) may take, handover included.
    pub shutdown_timeout: Duration,
}

const DEFAULT_TTL: Duration = Duration::from_secs(10);
const DEFAULT_LOOP_WAIT: Duration = Duration::from_secs(1);
const DEFAULT_RETRY_TIMEOUT: Duration = Duration::from_secs(3);
const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(45);

/// Below this the leader lease cannot survive one slow etcd round trip.
const MIN_TTL: Duration = Duration::from_secs(3);

pub(super) const KEYS: &[(&str, EnvKind)] = &[
    ("timing.ttl", EnvKind::Text),
    ("timing.loop_wait", EnvKind::Text),
    ("timing.retry_timeout", EnvKind::Text),
    ("timing.shutdown_timeout", EnvKind::Text),
];

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct FileTiming {
    ttl: Option<FileDuration>,
    loop_wait: Option<FileDuration>,
    retry_timeout: Option<FileDuration>,
    shutdown_timeout: Option<FileDuration>,
}

impl FileTiming {
    pub(super) fn validate(self, cx: &Context<'_>) -> Result<Timing, ConfigError> {
        let ttl = self.ttl.map_or(DEFAULT_TTL, |d| d.0);
        let loop_wait = self.loop_wait.map_or(DEFAULT_LOOP_WAIT, |d| d.0);
        let retry_timeout = self.retry_timeout.map_or(DEFAULT_RETRY_TIMEOUT, |d| d.0);
        let show = |d: Duration| humantime::format_duration(d).to_string();
        if ttl < MIN_TTL {
            return Err(cx.invalid(
                "timing.ttl",
                format!("must be at least {}, got {}", show(MIN_TTL), show(ttl)),
            ));
        }
        if ttl.subsec_nanos() != 0 {
            return Err(cx.invalid(
                "timing.ttl",
                format!(
                    "must be whole seconds (etcd lease TTLs are), got {}",
                    show(ttl)
                ),
            ));
        }
        if loop_wait.is_zero() {
            return Err(cx.invalid("timing.loop_wait", "must be more than 0s"));
        }
        if retry_timeout.is_zero() {
            return Err(cx.invalid("timing.retry_timeout", "must be more than 0s"));
        }
        // Checked: absurd durations like "1000000y" must fail, not overflow.
        let needed = retry_timeout
            .checked_mul(2)
            .and_then(|d| d.checked_add(loop_wait))
            .unwrap_or(Duration::MAX);
        if needed > ttl {
            return Err(cx.invalid(
                "timing",
                format!(
                    "loop_wait ({}) + 2 × retry_timeout ({}) = {} must not exceed ttl ({})",
                    show(loop_wait),
                    show(retry_timeout),
                    show(needed),
                    show(ttl)
                ),
            ));
        }
        let shutdown_timeout = self
            .shutdown_timeout
            .map_or(DEFAULT_SHUTDOWN_TIMEOUT, |d| d.0);
        if shutdown_timeout.is_zero() {
            return Err(cx.invalid("timing.shutdown_timeout", "must be more than 0s"));
        }
        Ok(Timing {
            ttl,
            loop_wait,
            retry_timeout,
            shutdown_timeout,
        })
    }
}
