//! The fencing token of a leader's writes: the leader key still names this
//! node and is bound to the lease the decision to lead was made under. Every
//! etcd write that depends on leadership is guarded by it, so a decision
//! taken under a lease that has since been lost can never land.

use etcd_client::{Compare, CompareOp};

use crate::ha::LeaderKey;

/// This node's claim on the leader key: its name and the lease it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaderToken<'a> {
    pub node: &'a str,
    pub lease_id: i64,
}

impl<'a> LeaderToken<'a> {
    pub fn new(node: &'a str, lease_id: i64) -> LeaderToken<'a> {
        LeaderToken { node, lease_id }
    }

    /// The transaction guard: the leader key `key` still holds this token.
    pub fn compares(&self, key: &str) -> [Compare; 2] {
        [
            Compare::value(key, CompareOp::Equal, self.node.as_bytes()),
            Compare::lease(key, CompareOp::Equal, self.lease_id),
        ]
    }

    /// The same check against a leader key read from a view.
    pub fn held_by(&self, key: &LeaderKey) -> bool {
        key.is_held_by(self.node, self.lease_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_by_needs_both_name_and_lease() {
        let token = LeaderToken::new("n1", 7);
        let key = |name: &str, lease_id| LeaderKey {
            name: name.into(),
            lease_id,
            mod_revision: 42,
        };
        assert!(token.held_by(&key("n1", 7)));
        assert!(!token.held_by(&key("n1", 8)));
        assert!(!token.held_by(&key("n2", 7)));
    }
}
