//! The pure decision core: observation in, steps out. No I/O, no async, no
//! clock reads; the agent loop feeds it and carries out what it returns.

pub mod action;
pub mod decide;
pub mod handover;
pub mod memory;
pub mod route;
pub mod settings;
pub mod state;
pub mod sync;

pub use action::{Action, Step};
pub use decide::{decide, slot_name};
pub use memory::{leaderless_replica, lease_still_ours, member_status, Memory};
pub use route::{route, RouteChoice};
pub use settings::Settings;
pub use state::*;

#[cfg(test)]
mod tests;
