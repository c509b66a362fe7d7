//! pgha: a PostgreSQL high-availability agent. One agent per Postgres host
//! elects a leader through an etcd lease, supervises and replicates its local
//! Postgres, and reports health over HTTP.
#![forbid(unsafe_code)]

pub mod agent;
pub mod api;
pub mod backup;
pub mod cli;
pub mod clock;
pub mod config;
pub mod ctl;
pub mod dcs;
pub mod failsafe;
pub mod fence;
pub mod ha;
pub mod lease;
pub mod net;
pub mod operator;
pub mod postgres;
pub mod reaper;
pub mod router;
pub mod secret;
pub mod snapshot;
pub mod tls;
