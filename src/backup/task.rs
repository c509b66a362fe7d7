//! The agent's backup task: on the node that leads (and runs the primary) it
//! makes sure the stanza exists, takes the scheduled base backups and the
//! ones an operator asks for, one at a time across the cluster (an etcd key
//! under the task's own lease), and publishes what it knows for the API and
//! the metrics. It reads the snapshot and never blocks the agent loop: a
//! backup runs as pgBackRest's process while the loop goes on.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

use super::{BackupError, Kind, Pgbackrest, RepoInfo};
use crate::dcs::Etcd;
use crate::ha::MemberRole;
use crate::snapshot::Snapshot;

/// What the task knows, for `/status`, `/backups` and the metrics.
#[derive(Debug, Clone, Default)]
pub struct BackupStatus {
    /// The stanza exists and belongs to this cluster (checked this term).
    pub stanza_ready: bool,
    /// A backup this node runs now: its type and start (Unix seconds).
    pub running: Option<(Kind, u64)>,
    /// The newest successful backup of each type (Unix seconds at its end),
    /// from the repository and this node's own runs.
    pub last_success: BTreeMap<Kind, u64>,
    /// How long this node's last successful backup of each type took.
    pub last_duration: BTreeMap<Kind, Duration>,
    /// Backups this node began that failed.
    pub failed_total: u64,
    /// The last failure (stanza, backup), until something succeeds.
    pub last_error: Option<String>,
}

/// A backup asked for through the API.
struct Request {
    kind: Kind,
    /// Ok(message) once the backup has begun (not finished), or why not.
    reply: oneshot::Sender<Result<String, String>>,
}

/// The API's side of the task.
#[derive(Clone)]
pub struct BackupHandle {
    requests: mpsc::Sender<Request>,
    pub status: watch::Receiver<BackupStatus>,
    pgbackrest: Pgbackrest,
}

impl BackupHandle {
    /// Asks this node to begin a backup now. Refused unless it leads, runs
    /// the primary and no backup runs anywhere in the cluster.
    pub async fn request(&self, kind: Kind) -> Result<String, String> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request { kind, reply })
            .await
            .map_err(|_| "the backup task has stopped".to_owned())?;
        answer
            .await
            .map_err(|_| "the backup task has stopped".to_owned())?
    }

    /// The repository's contents, read now (any node can: the repository
    /// is shared).
    pub async fn info(&self) -> Result<RepoInfo, BackupError> {
        self.pgbackrest.info().await
    }
}

/// Whether this node is the one to back up: it holds the leader key and
/// runs Postgres as the primary, within its fencing deadline.
pub fn on_duty(s: &Snapshot, now: Instant) -> bool {
    let age = now.saturating_duration_since(s.taken_at);
    s.leader.as_deref() == Some(s.me.name.as_str())
        && s.me.role == MemberRole::Primary
        && s.me.state == "running"
        && s.fencing_remaining.is_some_and(|r| r > age)
}

/// The scheduled backup that is due, if any: a full one when the newest
/// full is older than `full_every` (or there is none), else a differential
/// one when the newest full or diff is older than `diff_every`.
pub fn due(
    now: u64,
    last: &BTreeMap<Kind, u64>,
    full_every: Option<Duration>,
    diff_every: Option<Duration>,
) -> Option<Kind> {
    let older = |t: Option<&u64>, every: Duration| {
        t.is_none_or(|t| now.saturating_sub(*t) >= every.as_secs())
    };
    let full = last.get(&Kind::Full);
    if full_every.is_some_and(|every| older(full, every)) {
        return Some(Kind::Full);
    }
    let newest = full.max(last.get(&Kind::Diff));
    // A diff needs a full to build on.
    (full.is_some() && diff_every.is_some_and(|every| older(newest, every))).then_some(Kind::Diff)
}

/// How often the task looks at the snapshot and the schedule.
const TICK: Duration = Duration::from_secs(5);
/// After a failed stanza-create or backup, the next try waits this long.
const RETRY_AFTER: Duration = Duration::from_secs(60);

/// Starts the task; it ends when `stop` is cancelled (a running backup's
/// process is killed with it, and its lock's lease revoked).
pub fn start(
    pgbackrest: Pgbackrest,
    etcd: Etcd,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    lock_ttl: Duration,
    stop: CancellationToken,
) -> (BackupHandle, tokio::task::JoinHandle<()>) {
    let (requests, inbox) = mpsc::channel(8);
    let (status_tx, status) = watch::channel(BackupStatus::default());
    let handle = BackupHandle {
        requests,
        status,
        pgbackrest: pgbackrest.clone(),
    };
    let task = Task {
        pgbackrest,
        etcd,
        snapshots,
        status: status_tx,
        lock_ttl,
        stanza_term: None,
        retry_at: None,
        running: None,
    };
    let join = tokio::spawn(task.run(inbox, stop).in_current_span());
    (handle, join)
}

struct Task {
    pgbackrest: Pgbackrest,
    etcd: Etcd,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    status: watch::Sender<BackupStatus>,
    lock_ttl: Duration,
    /// The term the stanza was checked in.
    stanza_term: Option<i64>,
    /// No stanza-create or scheduled backup before this.
    retry_at: Option<Instant>,
    running: Option<Running>,
}

struct Running {
    kind: Kind,
    began: Instant,
    lease: i64,
    done: oneshot::Receiver<Result<(), BackupError>>,
    keepalive: tokio::task::JoinHandle<()>,
}

impl Task {
    async fn run(mut self, mut inbox: mpsc::Receiver<Request>, stop: CancellationToken) {
        self.refresh_info().await;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = tick.tick() => self.pass().await,
                Some(req) = inbox.recv() => {
                    let answer = self.begin_requested(req.kind).await;
                    let _ = req.reply.send(answer);
                }
                done = async { (&mut self.running.as_mut().expect("guarded").done).await }, if self.running.is_some() => {
                    self.finished(done.unwrap_or_else(|_| Err(BackupError::Refused("the backup job vanished".into())))).await;
                }
            }
        }
        if let Some(r) = self.running.take() {
            r.keepalive.abort();
            let _ = self.etcd.revoke_lease(r.lease).await;
            warn!(kind = %r.kind, "backup: stopped while a backup ran; pgBackRest's process was ended");
        }
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(&self.snapshots.borrow())
    }

    /// One look: the stanza once per term, then the schedule.
    async fn pass(&mut self) {
        let s = self.snapshot();
        if !on_duty(&s, Instant::now()) || self.running.is_some() {
            return;
        }
        if self.retry_at.is_some_and(|t| Instant::now() < t) {
            return;
        }
        let term = s.leader_revision;
        if self.stanza_term != term || !self.status.borrow().stanza_ready {
            if let Err(e) = self.ensure_stanza(term).await {
                warn!(term, error = %e, "backup: the stanza is not usable; archiving and backups wait (retried in 60 s)");
                self.fail(format!("stanza-create: {e}"));
                self.retry_at = Some(Instant::now() + RETRY_AFTER);
                return;
            }
        }
        let cfg = self.pgbackrest.config();
        let last = self.status.borrow().last_success.clone();
        if let Some(kind) = due(
            crate::clock::epoch_secs(),
            &last,
            cfg.full_every,
            cfg.diff_every,
        ) {
            info!(term, kind = %kind, "backup: a scheduled backup is due");
            if let Err(why) = self.begin(kind).await {
                info!(term, kind = %kind, reason = %why, "backup: scheduled backup not begun");
            }
        }
    }

    async fn ensure_stanza(&mut self, term: Option<i64>) -> Result<(), BackupError> {
        self.pgbackrest.stanza_create().await?;
        info!(term, stanza = %self.pgbackrest.config().stanza, "backup: stanza ready");
        self.stanza_term = term;
        self.status.send_modify(|st| {
            st.stanza_ready = true;
            st.last_error = None;
        });
        Ok(())
    }

    async fn begin_requested(&mut self, kind: Kind) -> Result<String, String> {
        let s = self.snapshot();
        if !on_duty(&s, Instant::now()) {
            return Err(format!(
                "this node ({}) is not the leader running the primary (leader: {}): ask the leader",
                s.me.name,
                s.leader.as_deref().unwrap_or("none")
            ));
        }
        if !self.status.borrow().stanza_ready {
            self.ensure_stanza(s.leader_revision)
                .await
                .map_err(|e| format!("the stanza is not usable: {e}"))?;
        }
        self.begin(kind).await
    }

    /// Takes the cluster's backup lock and starts pgBackRest.
    async fn begin(&mut self, kind: Kind) -> Result<String, String> {
        if let Some(r) = &self.running {
            return Err(format!("a {} backup is running on this node", r.kind));
        }
        let name = self.snapshot().me.name.clone();
        let lease = self
            .etcd
            .grant_lease(self.lock_ttl)
            .await
            .map_err(|e| format!("etcd: {e}"))?;
        match self.etcd.claim_backup(&name, lease).await {
            Ok(true) => {}
            Ok(false) => {
                let _ = self.etcd.revoke_lease(lease).await;
                let holder = self.etcd.backup_holder().await.ok().flatten();
                return Err(format!(
                    "a backup is running on {}",
                    holder.as_deref().unwrap_or("another node")
                ));
            }
            Err(e) => {
                let _ = self.etcd.revoke_lease(lease).await;
                return Err(format!("etcd: {e}"));
            }
        }
        let etcd = self.etcd.clone();
        let every = self.lock_ttl / 3;
        let keepalive = tokio::spawn(
            async move {
                loop {
                    tokio::time::sleep(every).await;
                    if let Ok(false) = etcd.keep_alive(lease).await {
                        warn!("backup: the backup lock's lease ran out");
                        return;
                    }
                }
            }
            .in_current_span(),
        );
        let (tx, done) = oneshot::channel();
        let pgbackrest = self.pgbackrest.clone();
        tokio::spawn(
            async move {
                let _ = tx.send(pgbackrest.backup(kind).await);
            }
            .in_current_span(),
        );
        let began = crate::clock::epoch_secs();
        info!(kind = %kind, "backup: began");
        self.status
            .send_modify(|st| st.running = Some((kind, began)));
        self.running = Some(Running {
            kind,
            began: Instant::now(),
            lease,
            done,
            keepalive,
        });
        Ok(format!("{kind} backup begun on {name}"))
    }

    async fn finished(&mut self, result: Result<(), BackupError>) {
        let Some(r) = self.running.take() else { return };
        r.keepalive.abort();
        if let Err(e) = self.etcd.revoke_lease(r.lease).await {
            warn!(error = %e, "backup: could not free the backup lock (it frees itself with its lease)");
        }
        let took = r.began.elapsed();
        match result {
            Ok(()) => {
                info!(kind = %r.kind, seconds = took.as_secs_f64(), "backup: finished");
                self.retry_at = None;
                self.status.send_modify(|st| {
                    st.running = None;
                    st.last_success.insert(r.kind, crate::clock::epoch_secs());
                    st.last_duration.insert(r.kind, took);
                    st.last_error = None;
                });
            }
            Err(e) => {
                warn!(kind = %r.kind, seconds = took.as_secs_f64(), error = %e, "backup: failed (a scheduled one is retried in 60 s)");
                self.retry_at = Some(Instant::now() + RETRY_AFTER);
                self.status.send_modify(|st| {
                    st.running = None;
                    st.failed_total += 1;
                });
                self.fail(format!("{} backup: {e}", r.kind));
            }
        }
        self.refresh_info().await;
    }

    fn fail(&self, why: String) {
        self.status.send_modify(|st| st.last_error = Some(why));
    }

    /// Reads the repository; its newest backups count as successes.
    async fn refresh_info(&mut self) {
        match self.pgbackrest.info().await {
            Ok(repo) => self.status.send_modify(|st| {
                for b in &repo.backups {
                    let t = st.last_success.entry(b.kind).or_default();
                    *t = (*t).max(b.stop_epoch);
                }
            }),
            // A repository without the stanza yet answers too; this is
            // pgBackRest failing to read it at all.
            Err(e) => warn!(error = %e, "backup: cannot read the repository"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: u64 = 3600;

    #[test]
    fn a_full_backup_is_due_first_then_diffs_between_fulls() {
        let day = Some(Duration::from_secs(24 * H));
        let six = Some(Duration::from_secs(6 * H));
        let mut last = BTreeMap::new();
        // Nothing yet: a full, even with diffs scheduled.
        assert_eq!(due(100 * H, &last, day, six), Some(Kind::Full));
        // Only on request: nothing.
        assert_eq!(due(100 * H, &last, None, None), None);
        // No full to build on: no diff either.
        assert_eq!(due(100 * H, &last, None, six), None);
        last.insert(Kind::Full, 100 * H);
        assert_eq!(due(101 * H, &last, day, six), None);
        assert_eq!(due(106 * H, &last, day, six), Some(Kind::Diff));
        last.insert(Kind::Diff, 106 * H);
        assert_eq!(due(111 * H, &last, day, six), None);
        assert_eq!(due(112 * H, &last, day, six), Some(Kind::Diff));
        assert_eq!(due(124 * H, &last, day, six), Some(Kind::Full));
        assert_eq!(due(124 * H, &last, day, None), Some(Kind::Full));
        assert_eq!(due(123 * H, &last, day, None), None);
    }
}
