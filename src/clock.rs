//! Wall-clock time as the cluster's documents carry it: Unix milliseconds
//! and seconds, and RFC 3339 (UTC, whole seconds) for people.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Now, in Unix milliseconds (0 on a clock before 1970).
pub fn epoch_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Now, in Unix seconds (0 on a clock before 1970).
pub fn epoch_secs() -> u64 {
    epoch_ms() / 1000
}

/// Unix milliseconds as RFC 3339, UTC, whole seconds.
pub fn rfc3339_ms(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}
