//! SQL against the local Postgres over its Unix socket: the probe that fills
//! `LocalPostgres`, and the few statements the executor runs.

use std::time::Duration;

use tokio_postgres::NoTls;
use tracing::Instrument;

use super::process::{LocalPg, PgError, Result};
use crate::ha::{LocalPostgres, Lsn, PgRole, Replication, SyncSet};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Far above what any statement takes: only a hung Postgres reaches it.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(65);
/// How long a promotion may take, and how often the agent asks whether it is done.
const PROMOTE_TIMEOUT: Duration = Duration::from_secs(60);
const PROMOTE_POLL: Duration = Duration::from_millis(2);

/// One `pg_stat_replication` row as the probe renders it: `name state lsn`
/// (the name last-but-two words from the end, so it may hold spaces).
fn parse_replication(row: &str) -> Option<Replication> {
    let (rest, flush) = row.rsplit_once(' ')?;
    let (name, state) = rest.rsplit_once(' ')?;
    Some(Replication {
        name: name.to_string(),
        state: state.to_string(),
        flush_lsn: Lsn::parse(flush)?,
    })
}

fn lsn(s: Option<String>) -> Option<Lsn> {
    s.as_deref().and_then(Lsn::parse)
}

impl LocalPg {
    /// A fresh connection over the Unix socket as the superuser.
    pub(super) async fn connect(&self) -> Result<tokio_postgres::Client> {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host_path(&self.cfg.socket_dir)
            .port(self.cfg.port)
            .user(&self.cfg.superuser.username)
            .dbname("postgres")
            .application_name("pgha")
            .connect_timeout(CONNECT_TIMEOUT);
        let (client, conn) = cfg.connect(NoTls).await?;
        tokio::spawn(conn.in_current_span());
        Ok(client)
    }

    /// Runs `f` on the cached connection, reconnecting once if it was closed.
    async fn with_client<T>(
        &self,
        f: impl for<'c> Fn(
            &'c tokio_postgres::Client,
        ) -> std::pin::Pin<
            Box<
                dyn std::future::Future<Output = std::result::Result<T, tokio_postgres::Error>>
                    + Send
                    + 'c,
            >,
        >,
    ) -> Result<T> {
        let mut guard = self.client.lock().await;
        if guard.as_ref().is_none_or(|c| c.is_closed()) {
            *guard = Some(self.connect().await?);
        }
        let client = guard.as_ref().expect("just connected");
        // No statement may hold the agent loop on a hung Postgres.
        match tokio::time::timeout(STATEMENT_TIMEOUT, f(client)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if client.is_closed() {
                    *guard = None;
                }
                Err(PgError::Sql(e))
            }
            Err(_) => {
                *guard = None;
                Err(PgError::Other(format!(
                    "postgres did not answer within {STATEMENT_TIMEOUT:?}"
                )))
            }
        }
    }

    /// Observes the running Postgres. `running = false` when it does not answer.
    /// A Postgres that does not answer within `PROBE_TIMEOUT` (hung,
    /// SIGSTOPped, stuck on I/O) counts as not running; its connection is
    /// dropped so the next probe starts afresh.
    pub async fn probe(&self) -> LocalPostgres {
        match tokio::time::timeout(PROBE_TIMEOUT, self.probe_once()).await {
            Ok(local) => local,
            Err(_) => {
                tracing::warn!(timeout = ?PROBE_TIMEOUT, "postgres did not answer the probe");
                *self.client.lock().await = None;
                LocalPostgres::default()
            }
        }
    }

    async fn probe_once(&self) -> LocalPostgres {
        let row = self
            .with_client(|c| {
                Box::pin(c.query_one(
                    "SELECT pg_is_in_recovery(),
                            CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn()::text END,
                            pg_last_wal_receive_lsn()::text,
                            pg_last_wal_replay_lsn()::text,
                            CASE WHEN pg_is_in_recovery()
                                 THEN (SELECT received_tli FROM pg_stat_wal_receiver)
                                 ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END,
                            (SELECT sender_host || ':' || sender_port FROM pg_stat_wal_receiver WHERE status = 'streaming'),
                            CASE WHEN pg_is_in_recovery()
                                 THEN pg_get_wal_replay_pause_state() <> 'not paused'
                                 ELSE false END,
                            (SELECT timeline_id FROM pg_control_checkpoint()),
                            ARRAY(SELECT slot_name::text FROM pg_replication_slots WHERE slot_type = 'physical'),
                            EXISTS (SELECT 1 FROM pg_settings WHERE pending_restart),
                            current_setting('synchronous_standby_names'),
                            ARRAY(SELECT application_name || ' ' || state || ' ' || COALESCE(flush_lsn, '0/0')::text
                                  FROM pg_stat_replication WHERE NOT pg_is_in_recovery()),
                            (current_setting('archive_mode') <> 'off' AND NOT pg_is_in_recovery()),
                            a.archived_count, a.failed_count, a.last_archived_wal, a.last_failed_wal,
                            extract(epoch FROM a.last_archived_time)::bigint,
                            extract(epoch FROM a.last_failed_time)::bigint
                     FROM pg_stat_archiver a",
                    &[],
                ))
            })
            .await;
        let row = match row {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "postgres probe failed");
                return LocalPostgres::default();
            }
        };
        let in_recovery: bool = row.get(0);
        let current = lsn(row.get(1));
        let receive = lsn(row.get(2));
        let replay = lsn(row.get(3));
        let tli: Option<i32> = row.get(4);
        let checkpoint_tli: Option<i32> = row.get(7);
        LocalPostgres {
            running: true,
            role: Some(if in_recovery {
                PgRole::Replica
            } else {
                PgRole::Primary
            }),
            timeline: tli.or(checkpoint_tli).map(|t| t as u32),
            wal_position: if in_recovery { replay } else { current },
            receive_lsn: receive,
            replay_lsn: replay,
            streaming_from: row.get(5),
            replay_paused: row.get(6),
            // Which member we follow is the agent's own bookkeeping.
            following: None,
            slots: row.get(8),
            pending_restart: row.get(9),
            sync_standbys: crate::ha::sync::parse_standby_names(row.get(10)),
            replication: row
                .get::<_, Vec<String>>(11)
                .iter()
                .filter_map(|r| parse_replication(r))
                .collect(),
            archiver: row.get::<_, bool>(12).then(|| {
                let secs = |i: usize| row.get::<_, Option<i64>>(i).map(|t| t.max(0) as u64);
                crate::ha::Archiver {
                    archived_count: row.get::<_, i64>(13).max(0) as u64,
                    failed_count: row.get::<_, i64>(14).max(0) as u64,
                    last_archived_wal: row.get(15),
                    last_failed_wal: row.get(16),
                    last_archived_at: secs(17),
                    last_failed_at: secs(18),
                }
            }),
        }
    }

    /// Promotes, and returns once Postgres takes writes.
    pub async fn promote(&self) -> Result<()> {
        let signalled: bool = self
            .with_client(|c| {
                Box::pin(async move {
                    c.query_one("SELECT pg_promote(false)", &[])
                        .await
                        .map(|r| r.get(0))
                })
            })
            .await?;
        if !signalled {
            return Err(PgError::Other(
                "pg_promote could not signal the postmaster".into(),
            ));
        }
        // pg_promote's own wait looks every 100 ms: asking every few ms
        // lets the agent announce the new role within milliseconds of the
        // first write Postgres could take.
        let deadline = tokio::time::Instant::now() + PROMOTE_TIMEOUT;
        loop {
            let in_recovery = self
                .with_client(|c| {
                    Box::pin(async move {
                        c.query_one("SELECT pg_is_in_recovery()", &[])
                            .await
                            .map(|r| r.get::<_, bool>(0))
                    })
                })
                .await;
            if matches!(in_recovery, Ok(false)) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(PgError::Other(format!(
                    "still in recovery {PROMOTE_TIMEOUT:?} after pg_promote: {in_recovery:?}"
                )));
            }
            tokio::time::sleep(PROMOTE_POLL).await;
        }
    }

    /// CHECKPOINT on a fresh connection, so the probe connection stays free.
    /// After a promotion it writes the new timeline into pg_control, which
    /// pg_rewind on the former primary reads.
    pub async fn checkpoint(&self) -> Result<()> {
        let client = self.connect().await?;
        client.batch_execute("CHECKPOINT").await?;
        Ok(())
    }

    pub async fn reload(&self) -> Result<()> {
        self.with_client(|c| {
            Box::pin(async move { c.execute("SELECT pg_reload_conf()", &[]).await })
        })
        .await
        .map(|_| ())
    }

    /// Makes Postgres wait for `set`: writes pgha.sync.conf, reloads, and
    /// returns once a fresh session sees the new setting.
    pub async fn set_sync_standbys(&self, set: &SyncSet) -> Result<()> {
        let names = crate::ha::sync::standby_names(set);
        self.write_sync_conf(&names)?;
        self.reload().await?;
        let client = self.connect().await?;
        for _ in 0..50 {
            let row = client
                .query_one("SELECT current_setting('synchronous_standby_names')", &[])
                .await?;
            let now: String = row.get(0);
            if now == names {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(PgError::Other(format!(
            "synchronous_standby_names did not become {names:?} after a reload"
        )))
    }

    pub async fn create_slot(&self, name: &str) -> Result<()> {
        let name = name.to_string();
        self.with_client(move |c| {
            let name = name.clone();
            Box::pin(async move {
                c.execute(
                    "SELECT pg_create_physical_replication_slot($1, true) WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
                    &[&name],
                )
                .await
            })
        })
        .await
        .map(|_| ())
    }

    pub async fn drop_slot(&self, name: &str) -> Result<()> {
        let name = name.to_string();
        self.with_client(move |c| {
            let name = name.clone();
            Box::pin(async move {
                c.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1 AND NOT active", &[&name]).await
            })
        })
        .await
        .map(|_| ())
    }

    /// Creates or updates the replication role (on the bootstrap primary).
    /// Waits until Postgres has finished recovery (a restored copy reaching
    /// its target and promoting), at most `within`.
    pub async fn wait_out_of_recovery(&self, within: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let in_recovery = self
                .with_client(|c| Box::pin(c.query_one("SELECT pg_is_in_recovery()", &[])))
                .await
                .map(|row| row.get::<_, bool>(0));
            if let Ok(false) = in_recovery {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(PgError::Other(format!(
                    "recovery did not finish within {within:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn ensure_replication_role(&self) -> Result<()> {
        let user = self.cfg.replication.username.replace('"', "\"\"");
        let password = self
            .cfg
            .replication
            .password
            .as_ref()
            .map(|p| p.expose().replace('\'', "''"));
        let pw_clause = password
            .map(|p| format!(" PASSWORD '{p}'"))
            .unwrap_or_default();
        let sql = format!(
            "DO $$BEGIN
               IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{u}') THEN
                 CREATE ROLE \"{user}\" WITH LOGIN REPLICATION{pw};
               ELSE
                 ALTER ROLE \"{user}\" WITH LOGIN REPLICATION{pw};
               END IF;
             END$$",
            u = self.cfg.replication.username.replace('\'', "''"),
            pw = pw_clause
        );
        self.with_client(move |c| {
            let sql = sql.clone();
            Box::pin(async move { c.batch_execute(&sql).await })
        })
        .await
    }
}
