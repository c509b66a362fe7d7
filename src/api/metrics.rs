//! `/metrics`: the snapshot in Prometheus text format 0.0.4. Every series
//! carries `scope` and `name`, so one dashboard serves every cluster. Written
//! by hand into one buffer: a scrape costs a few microseconds.

use std::fmt::{Display, Write};
use std::time::{Duration, SystemTime};

use super::health::Health;
use super::status::{lag_bytes, replay_lag_bytes};
use crate::ha::MemberRole;
use crate::snapshot::{Snapshot, LOOP_BUCKETS};

/// Escapes a label value: backslash, double quote and newline.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// A sample value in the exposition format (`+Inf`, not Rust's `inf`).
fn float(v: f64) -> String {
    if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        v.to_string()
    }
}

fn seconds(d: Duration) -> String {
    float(d.as_secs_f64())
}

struct Exposition {
    out: String,
    /// `scope="..",name=".."`, on every series.
    base: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        let _ = write!(self.out, "{name}{{{}", self.base);
        for (k, v) in labels {
            let _ = write!(self.out, ",{k}=\"{}\"", escape(v));
        }
        let _ = writeln!(self.out, "}} {value}");
    }

    /// A family with one unlabelled sample.
    fn single(&mut self, name: &str, kind: &str, help: &str, value: impl Display) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
}

/// What `/metrics` reads at the time of a request rather than from the
/// snapshot: the certificates' expiries, the router's counters and the
/// backup task's state.
#[derive(Default)]
pub struct Live<'a> {
    pub certificates: &'a [(&'a str, SystemTime)],
    pub router: Option<&'a crate::router::RouterMetrics>,
    /// The backup task's state, when backups are on.
    pub backup: Option<&'a crate::backup::BackupStatus>,
}

fn flag(b: bool) -> u8 {
    u8::from(b)
}

/// Renders the metrics of snapshot `s` taken `age` ago, with what `live`
/// holds now (certificate expiries, the router's counters).
pub fn render(s: &Snapshot, age: Duration, stale_after: Duration, live: &Live<'_>) -> String {
    let h = Health::of(s, age, stale_after);
    let me = &s.me;
    let mut m = Exposition {
        out: String::with_capacity(4096),
        base: format!(
            "scope=\"{}\",name=\"{}\"",
            escape(&s.scope),
            escape(&me.name)
        ),
    };
    m.single(
        "pgha_up",
        "gauge",
        "1 while the agent loop publishes its state (snapshot younger than the TTL).",
        flag(h.fresh),
    );
    m.family("pgha_version_info", "gauge", "pgha version of this agent.");
    m.sample(
        "pgha_version_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1,
    );
    m.single(
        "pgha_postgres_running",
        "gauge",
        "1 when Postgres runs (as /health).",
        flag(h.running),
    );
    m.single(
        "pgha_primary",
        "gauge",
        "1 when this node holds the leader key and runs the primary (as /primary).",
        flag(h.primary),
    );
    m.single(
        "pgha_replica",
        "gauge",
        "1 when Postgres runs as a replica.",
        flag(h.replica),
    );
    m.single(
        "pgha_sync_standby",
        "gauge",
        "1 when the leader's published synchronous set names this node.",
        flag(h.replica && s.is_sync_standby(&me.name)),
    );
    m.single(
        "pgha_sync_fallback",
        "gauge",
        "1 when this leader runs synchronous_mode on without a synchronous standby (asynchronous fallback).",
        flag(s.sync_fallback()),
    );
    m.family("pgha_timeline", "gauge", "Postgres timeline of this node.");
    if let Some(tl) = me.timeline {
        m.sample("pgha_timeline", &[], tl);
    }
    m.family(
        "pgha_wal_current_lsn_bytes",
        "gauge",
        "Primary: current WAL write position, in bytes.",
    );
    if let (MemberRole::Primary, Some(lsn)) = (me.role, me.wal_position) {
        m.sample("pgha_wal_current_lsn_bytes", &[], lsn.0);
    }
    m.family(
        "pgha_wal_received_lsn_bytes",
        "gauge",
        "Replica: last WAL position received and flushed, in bytes.",
    );
    if let Some(lsn) = me.receive_lsn {
        m.sample("pgha_wal_received_lsn_bytes", &[], lsn.0);
    }
    m.family(
        "pgha_wal_replayed_lsn_bytes",
        "gauge",
        "Replica: last WAL position replayed, in bytes.",
    );
    if let Some(lsn) = me.replay_lsn {
        m.sample("pgha_wal_replayed_lsn_bytes", &[], lsn.0);
    }
    let leader = s.leader.as_deref();
    m.family(
        "pgha_replication_lag_bytes",
        "gauge",
        "Bytes each member's received or replayed WAL is behind the leader's published position.",
    );
    for member in &s.members {
        if let Some(lag) = lag_bytes(&s.members, leader, member) {
            m.sample(
                "pgha_replication_lag_bytes",
                &[("member", &member.name)],
                lag,
            );
        }
    }
    m.family(
        "pgha_replication_replay_lag_bytes",
        "gauge",
        "Bytes each member's replayed WAL is behind the leader's published position.",
    );
    for member in &s.members {
        if let Some(lag) = replay_lag_bytes(&s.members, leader, member) {
            m.sample(
                "pgha_replication_replay_lag_bytes",
                &[("member", &member.name)],
                lag,
            );
        }
    }
    m.single(
        "pgha_leader_lease_remaining_seconds",
        "gauge",
        "Seconds before this node's leader lease may expire (0 when it holds none).",
        seconds(s.lease_remaining.unwrap_or_default().saturating_sub(age)),
    );
    m.single(
        "pgha_fencing_deadline_remaining_seconds",
        "gauge",
        "Seconds before this primary must stop taking writes unless it renews its lease (0 when it holds none).",
        seconds(s.fencing_remaining.unwrap_or_default().saturating_sub(age)),
    );
    m.single(
        "pgha_dcs_reachable",
        "gauge",
        "1 when the last etcd read succeeded.",
        flag(s.dcs_reachable),
    );
    m.family(
        "pgha_dcs_last_seen_seconds",
        "gauge",
        "Seconds since etcd last answered a read.",
    );
    if let Some(seen) = s.dcs_last_seen {
        let since = s.taken_at.saturating_duration_since(seen) + age;
        m.sample("pgha_dcs_last_seen_seconds", &[], seconds(since));
    }
    let count = |kind: &str| s.history.iter().filter(|e| e.kind == kind).count();
    m.single(
        "pgha_failovers_total",
        "counter",
        "Failovers recorded in the cluster's history.",
        count("failover"),
    );
    m.single(
        "pgha_switchovers_total",
        "counter",
        "Switchovers recorded in the cluster's history.",
        count("switchover"),
    );
    m.single(
        "pgha_promotions_total",
        "counter",
        "Promotions this agent performed since it started.",
        s.promotions,
    );
    let hist = &s.loop_durations;
    m.family(
        "pgha_loop_duration_seconds",
        "histogram",
        "Duration of the agent loop's passes.",
    );
    for (bound, n) in LOOP_BUCKETS.iter().zip(hist.buckets.iter()) {
        m.sample(
            "pgha_loop_duration_seconds_bucket",
            &[("le", &float(*bound))],
            n,
        );
    }
    m.sample(
        "pgha_loop_duration_seconds_bucket",
        &[("le", "+Inf")],
        hist.count,
    );
    m.sample(
        "pgha_loop_duration_seconds_sum",
        &[],
        float(hist.sum_seconds),
    );
    m.sample("pgha_loop_duration_seconds_count", &[], hist.count);
    m.single(
        "pgha_pending_restart",
        "gauge",
        "1 when Postgres has settings that take effect only after a restart.",
        flag(s.pending_restart),
    );
    m.single(
        "pgha_paused",
        "gauge",
        "1 in maintenance mode (no automatic failover).",
        flag(s.paused),
    );
    m.single(
        "pgha_snapshot_age_seconds",
        "gauge",
        "Seconds since the agent loop published the state served here.",
        seconds(age),
    );
    m.family(
        "pgha_tls_certificate_expiry_seconds",
        "gauge",
        "Seconds until this node's certificate expires (ca, server, replication).",
    );
    let now = SystemTime::now();
    for &(certificate, not_after) in live.certificates {
        m.sample(
            "pgha_tls_certificate_expiry_seconds",
            &[("certificate", certificate)],
            crate::tls::pki::seconds_until(not_after, now),
        );
    }
    if let Some(router) = live.router {
        router.render_into(&mut m.out, &m.base);
    }
    if let Some(a) = &me.archiver {
        archiver_metrics(&mut m, a);
    }
    if let Some(b) = live.backup {
        backup_metrics(&mut m, b);
    }
    m.out
}

/// `pg_stat_archiver` of a primary that archives.
fn archiver_metrics(m: &mut Exposition, a: &crate::ha::Archiver) {
    let now = crate::clock::epoch_secs();
    m.single(
        "pgha_wal_archived_total",
        "counter",
        "WAL files this primary's archive_command archived (pg_stat_archiver).",
        a.archived_count,
    );
    m.single(
        "pgha_wal_archive_failed_total",
        "counter",
        "Failed archive_command runs on this primary (pg_stat_archiver).",
        a.failed_count,
    );
    m.single(
        "pgha_wal_archive_last_success_timestamp_seconds",
        "gauge",
        "Unix time of this primary's last archived WAL file (0: none yet).",
        a.last_archived_at.unwrap_or(0),
    );
    m.single(
        "pgha_wal_archive_failing_seconds",
        "gauge",
        "Seconds archiving has been failing on this primary (0: not failing).",
        a.failing_for(now).unwrap_or(0),
    );
}

/// The backup task's families (`[backup]` on).
fn backup_metrics(m: &mut Exposition, b: &crate::backup::BackupStatus) {
    use crate::backup::Kind;
    m.family(
        "pgha_backup_last_success_timestamp_seconds",
        "gauge",
        "Unix time the newest successful base backup of each type ended (0: none), as the repository and this node know it.",
    );
    for kind in Kind::ALL {
        let t = b.last_success.get(&kind).copied().unwrap_or(0);
        m.sample(
            "pgha_backup_last_success_timestamp_seconds",
            &[("type", kind.as_str())],
            t,
        );
    }
    m.family(
        "pgha_backup_duration_seconds",
        "gauge",
        "How long this node's last successful base backup of each type took.",
    );
    for (kind, took) in &b.last_duration {
        m.sample(
            "pgha_backup_duration_seconds",
            &[("type", kind.as_str())],
            took.as_secs_f64(),
        );
    }
    m.single(
        "pgha_backup_running",
        "gauge",
        "1 while this node runs a base backup.",
        flag(b.running.is_some()),
    );
    m.single(
        "pgha_backup_failed_total",
        "counter",
        "Base backups this node began that failed.",
        b.failed_total,
    );
    m.single(
        "pgha_backup_stanza_ready",
        "gauge",
        "1 once this node (as the leader) found the pgBackRest stanza usable.",
        flag(b.stanza_ready),
    );
}
