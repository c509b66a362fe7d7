//! The local Postgres: data directory inspection, the files the agent owns,
//! process control (initdb, start, stop, pg_basebackup, pg_rewind) and SQL
//! probes. Postgres runs as the agent's child so a crash is seen at once.

pub mod conf;
mod marker;
mod probe;
mod process;
mod run_as;

pub use conf::Upstream;
pub use marker::{JobMarker, Unfinished};
pub use process::{LocalPg, PgError};
pub use run_as::RunAs;
