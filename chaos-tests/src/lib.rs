//! Fault-injection suite for pgha: a compose cluster of real containers
//! (3 etcd members, 3 pgha nodes with PostgreSQL 15, HAProxy), two writers and
//! a role prober as the workload, faults injected with the Docker CLI, and a
//! checker that judges the history (lost writes, split brain, convergence).
#![forbid(unsafe_code)]

pub mod check;
pub mod cluster;
pub mod http;
pub mod netem;
pub mod report;
pub mod scenarios;
pub mod suite;
pub mod workload;
