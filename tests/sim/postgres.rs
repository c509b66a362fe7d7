//! Simulated Postgres of one node: a WAL made of unique record ids (so two
//! histories can be compared exactly), a timeline, standby.signal, the
//! synchronous_standby_names file, and commits that wait for the standbys
//! in effect. Replication and the world's clock live in `world.rs`.

use pgha::ha::{Lsn, PgRole, SyncSet};

/// Bytes per simulated WAL record.
pub const RECORD_BYTES: u64 = 1000;

/// WAL position after `len` records.
pub fn lsn(len: usize) -> Lsn {
    Lsn(0x0100_0000 + len as u64 * RECORD_BYTES)
}

/// A data directory. The WAL is a list of globally unique record ids: a
/// record is on a node iff its id is in the node's WAL.
#[derive(Debug, Clone)]
pub struct DataDir {
    pub wal: Vec<u64>,
    pub timeline: u32,
    /// Highest timeline whose history this node has seen (a promotion picks
    /// the next one, as Postgres does from the history files in pg_wal).
    pub newest_timeline: u32,
    /// standby.signal is present (last ran, or will start, as a standby).
    pub standby: bool,
    /// Index of the last checkpoint record.
    pub checkpoint: usize,
    /// pg_controldata says "shut down": a primary's fast shutdown wrote
    /// its checkpoint as the last WAL record (not after a crash or SIGQUIT).
    pub shut_down: bool,
    /// pgha.sync.conf: survives restarts.
    pub sync_conf: SyncSet,
    /// Left part rewound: started as a standby it never becomes
    /// consistent (never reports a position) while no primary runs.
    pub inconsistent: bool,
}

impl DataDir {
    /// This WAL is a prefix of `other` (ids are unique, so one equal
    /// record at the same index proves the whole prefix equal).
    pub fn is_prefix_of(&self, other: &DataDir) -> bool {
        let n = self.wal.len();
        n == 0 || (other.wal.len() >= n && other.wal[n - 1] == self.wal[n - 1])
    }
}

#[derive(Debug, Clone, Default)]
pub struct Pg {
    /// `None`: empty data directory.
    pub dir: Option<DataDir>,
    pub running: bool,
    /// Fast shutdown under way: no session, no new connection.
    pub stopping: bool,
    pub role: Option<PgRole>,
    /// primary_conninfo.
    pub upstream: Option<String>,
    /// The WAL receiver streams from this member.
    pub streaming_from: Option<String>,
    pub slots: Vec<String>,
    /// synchronous_standby_names as the backends apply it (a reload
    /// reaches them a little after the file changed).
    pub effective_sync: SyncSet,
    /// Commits written, waiting for the synchronous standbys: (record id, WAL length after it).
    pub waiting: Vec<(u64, usize)>,
    /// The postmaster exited since the agent last looked.
    pub exited: bool,
    /// The fence guard stopped the postmaster while it was starting.
    pub start_killed: bool,
    /// The agent's rewind marker beside the data directory (on disk:
    /// survives agent and host crashes).
    pub rewind_marker: bool,
}

impl Pg {
    pub fn len(&self) -> usize {
        self.dir.as_ref().map_or(0, |d| d.wal.len())
    }

    pub fn timeline(&self) -> u32 {
        self.dir.as_ref().map_or(0, |d| d.timeline)
    }

    pub fn accepts_writes(&self) -> bool {
        self.running && !self.stopping && self.role == Some(PgRole::Primary)
    }

    /// Immediate stop (crash, SIGQUIT): no checkpoint, waiting commits are
    /// never acknowledged.
    pub fn crash(&mut self) {
        if self.running {
            self.exited = true;
        }
        self.running = false;
        self.stopping = false;
        self.role = None;
        self.streaming_from = None;
        self.waiting.clear();
    }
}
