//! Table tests for every branch of `decide`, and property tests for the
//! safety rules no observation may break.

use proptest::prelude::*;

use super::*;
use crate::config::Tags;

const SYSID: u64 = 7_000_000_000_000_000_001;

fn settings() -> Settings {
    Settings {
        ttl_ms: 10_000,
        fencing_margin_ms: 2_000,
        rewind_after_ms: 5_000,
        handover_timeout_ms: 10_000,
        balancer_window_ms: 2_500,
    }
}

fn member(name: &str, role: MemberRole, state: &str, tl: u32, lsn: u64) -> MemberStatus {
    MemberStatus {
        name: name.into(),
        role,
        state: state.into(),
        timeline: Some(tl),
        wal_position: Some(Lsn(lsn)),
        receive_lsn: (role == MemberRole::Replica).then_some(Lsn(lsn)),
        replay_lsn: (role == MemberRole::Replica).then_some(Lsn(lsn)),
        pg_host: "127.0.0.1".into(),
        pg_port: 5432,
        api_url: format!("http://{name}:8008"),
        nofailover: false,
        noloadbalance: false,
        nosync: false,
        failover_priority: 1,
        tags: Default::default(),
        region: None,
        basebackup: None,
        pending_restart: false,
        replay_paused: false,
        router_rw: None,
        router_ro: None,
        archiver: None,
        updated_at_ms: 0,
        version: "test".into(),
    }
}

fn leader_key(name: &str) -> LeaderKey {
    LeaderKey {
        name: name.into(),
        lease_id: 42,
        mod_revision: 7,
    }
}

fn view(leader: Option<&str>, members: Vec<MemberStatus>) -> DcsView {
    DcsView {
        revision: 10,
        initialize: Some(InitializeKey {
            node: "n1".into(),
            system_identifier: Some(SYSID),
        }),
        leader: leader.map(leader_key),
        members,
        config: DynamicConfig::default(),
        last_leader_lsn: None,
        switchover: None,
        sync: None,
        timeline: None,
        newest_timeline: None,
    }
}

fn running(role: PgRole, tl: u32, lsn: u64) -> LocalPostgres {
    LocalPostgres {
        running: true,
        role: Some(role),
        timeline: Some(tl),
        wal_position: Some(Lsn(lsn)),
        receive_lsn: (role == PgRole::Replica).then_some(Lsn(lsn)),
        replay_lsn: (role == PgRole::Replica).then_some(Lsn(lsn)),
        sync_standbys: Some(SyncSet::none()),
        ..Default::default()
    }
}

fn obs(node: &str, local: LocalPostgres, dcs: Option<DcsView>) -> Observation {
    // A node the view names leader holds the key's lease, renewed at 0.
    let leads = dcs
        .as_ref()
        .and_then(|d| d.leader.as_ref())
        .is_some_and(|k| k.name == node);
    Observation {
        node: node.into(),
        tags: Tags {
            failover_priority: 1,
            ..Default::default()
        },
        region: None,
        may_bootstrap: true,
        data_dir: DataDir::Initialized {
            system_identifier: SYSID,
        },
        local,
        dcs,
        leader_lease: leads.then_some(HeldLease {
            lease_id: 42,
            renewed_at: Tick(0),
        }),
        job: None,
        starting_standby: false,
        pg_down_since: None,
        orphan_slots: Vec::new(),
        last_role: None,
        replica_stalled_since: None,
        needs_rewind: false,
        rewind_failed: false,
        rewind_pending: false,
        member_waits: MemberWaits::default(),
        peers: None,
        wall_ms: 1_000_000,
        handover: None,
        checkpoint_lsn: None,
        shutting_down: false,
        sync_applied: None,
        failsafe_promise_until: None,
        live_primary: None,
        primary_ended_at: None,
    }
}

/// The actions that do something (a `Wait` only logs its reason).
fn actions(o: &Observation, now: u64) -> Vec<Action> {
    decide(o, &settings(), Tick(now))
        .into_iter()
        .map(|s| s.action)
        .filter(|a| *a != Action::Wait)
        .collect()
}

fn healthy_three(leader: &str) -> Vec<MemberStatus> {
    ["n1", "n2", "n3"]
        .iter()
        .map(|n| {
            if *n == leader {
                member(n, MemberRole::Primary, "running", 1, 1000)
            } else {
                member(n, MemberRole::Replica, "streaming", 1, 1000)
            }
        })
        .collect()
}

#[test]
fn etcd_unreachable_primary_without_lease_stops() {
    let o = obs("n1", running(PgRole::Primary, 1, 10), None);
    assert_eq!(actions(&o, 0), vec![Action::Stop { then_rewind: false }]);
}

#[test]
fn etcd_unreachable_primary_with_lease_keeps_renewing_until_the_deadline() {
    let mut o = obs("n1", running(PgRole::Primary, 1, 10), None);
    o.leader_lease = Some(HeldLease {
        lease_id: 42,
        renewed_at: Tick(1_000),
    });
    assert_eq!(
        actions(&o, 8_999),
        vec![Action::RenewLeader { lease_id: 42 }]
    );
    assert_eq!(
        actions(&o, 9_000),
        vec![Action::Stop { then_rewind: false }],
        "ttl 10 s - margin 2 s after renewal"
    );
}

#[test]
fn etcd_unreachable_replica_does_nothing() {
    let o = obs("n2", running(PgRole::Replica, 1, 10), None);
    assert!(actions(&o, 0).is_empty());
}

#[test]
fn fencing_deadline_stops_primary_even_when_etcd_still_names_it() {
    let mut o = obs(
        "n1",
        running(PgRole::Primary, 1, 10),
        Some(view(Some("n1"), healthy_three("n1"))),
    );
    o.leader_lease = Some(HeldLease {
        lease_id: 42,
        renewed_at: Tick(0),
    });
    assert_eq!(
        actions(&o, 8_000),
        vec![Action::Stop { then_rewind: false }]
    );
    let before = actions(&o, 7_999);
    assert!(!before.contains(&Action::Stop { then_rewind: false }));
    assert_eq!(before[0], Action::RenewLeader { lease_id: 42 });
}

#[test]
fn uninitialized_cluster_races_for_initialize() {
    let mut v = view(None, vec![]);
    v.initialize = None;
    let mut o = obs("n1", LocalPostgres::default(), Some(v));
    o.data_dir = DataDir::Empty;
    assert_eq!(
        actions(&o, 0),
        vec![Action::ClaimInitialize {
            system_identifier: None
        }]
    );
    o.data_dir = DataDir::Initialized {
        system_identifier: 5,
    };
    assert_eq!(
        actions(&o, 0),
        vec![Action::ClaimInitialize {
            system_identifier: Some(5)
        }]
    );
    o.data_dir = DataDir::Unusable;
    assert!(matches!(actions(&o, 0)[..], [Action::Refuse { .. }]));
}

#[test]
fn initialize_winner_runs_initdb_then_publishes() {
    let mut v = view(None, vec![]);
    v.initialize = Some(InitializeKey {
        node: "n1".into(),
        system_identifier: None,
    });
    let mut o = obs("n1", LocalPostgres::default(), Some(v.clone()));
    o.data_dir = DataDir::Empty;
    assert_eq!(actions(&o, 0), vec![Action::InitDb]);
    o.data_dir = DataDir::Initialized {
        system_identifier: 99,
    };
    assert_eq!(
        actions(&o, 0),
        vec![Action::PublishSystemIdentifier {
            system_identifier: 99
        }]
    );
    let mut other = obs("n2", LocalPostgres::default(), Some(v));
    other.data_dir = DataDir::Empty;
    assert!(actions(&other, 0).is_empty(), "losers wait for the winner");
}

#[test]
fn foreign_or_unusable_data_directory_is_refused() {
    let mut o = obs(
        "n2",
        LocalPostgres::default(),
        Some(view(Some("n1"), healthy_three("n1"))),
    );
    o.data_dir = DataDir::Initialized {
        system_identifier: SYSID + 1,
    };
    assert!(matches!(actions(&o, 0)[..], [Action::Refuse { .. }]));
    o.data_dir = DataDir::Unusable;
    assert!(matches!(actions(&o, 0)[..], [Action::Refuse { .. }]));
}

#[test]
fn empty_replica_clones_a_running_leader_only() {
    let mut o = obs(
        "n2",
        LocalPostgres::default(),
        Some(view(Some("n1"), healthy_three("n1"))),
    );
    o.data_dir = DataDir::Empty;
    assert_eq!(actions(&o, 0), vec![Action::Clone { from: "n1".into() }]);
    let mut members = healthy_three("n1");
    members[0].state = "starting".into();
    o.dcs = Some(view(Some("n1"), members));
    assert!(actions(&o, 0).is_empty());
    o.dcs = Some(view(None, healthy_three("n1")));
    assert!(actions(&o, 0).is_empty());
}

/// Found by chaos-tests candidate-killed-after-key: a replica took the key,
/// was killed before it promoted, and its restarted agent started the
/// standby's data directory as a primary. Crash recovery stopped on the
/// restartpoint's timeline (6, the cluster was on 8): acknowledged writes
/// lost and a primary on a forked history.
#[test]
fn leader_whose_stopped_data_directory_is_a_standby_starts_it_as_a_standby() {
    let mut o = obs(
        "n1",
        LocalPostgres::default(),
        Some(view(Some("n1"), healthy_three("n1"))),
    );
    o.pg_down_since = Some(Tick(1_000));
    o.last_role = Some(PgRole::Replica);
    assert_eq!(
        actions(&o, 2_000),
        vec![
            Action::RenewLeader { lease_id: 42 },
            Action::StartReplica { upstream: None }
        ]
    );
    // Running as a standby with the key: the usual path promotes it.
    o.local = LocalPostgres {
        running: true,
        role: Some(PgRole::Replica),
        ..LocalPostgres::default()
    };
    o.pg_down_since = None;
    assert!(actions(&o, 3_000)
        .iter()
        .any(|a| matches!(a, Action::Promote { .. })));
}

#[test]
fn leader_with_postgres_down_restarts_it_within_primary_start_timeout() {
    let mut o = obs(
        "n1",
        LocalPostgres::default(),
        Some(view(Some("n1"), healthy_three("n1"))),
    );
    o.pg_down_since = Some(Tick(1_000));
    assert_eq!(
        actions(&o, 2_000),
        vec![Action::RenewLeader { lease_id: 42 }, Action::StartPrimary]
    );
    assert_eq!(
        actions(&o, 31_000),
        vec![Action::RenewLeader { lease_id: 42 }, Action::ReleaseLeader]
    );
}

/// Found by the simulator (seeds 412, 1324): a view that still names us
/// leader although our lease expired (answered late, or read by an agent
/// just restarted, holding no lease yet); starting (or promoting) on it ran
/// a primary with no fencing deadline next to the new leader.
#[test]
fn leader_without_a_proven_lease_starts_and_promotes_nothing() {
    let lease = Some(HeldLease {
        lease_id: 42,
        renewed_at: Tick(1_000),
    });
    let mut o = obs(
        "n1",
        LocalPostgres::default(),
        Some(view(Some("n1"), healthy_three("n1"))),
    );
    o.leader_lease = lease;
    o.pg_down_since = Some(Tick(1_000));
    assert_eq!(
        actions(&o, 5_000),
        vec![Action::RenewLeader { lease_id: 42 }, Action::StartPrimary]
    );
    assert_eq!(
        actions(&o, 9_000),
        vec![Action::RenewLeader { lease_id: 42 }],
        "deadline 1000 + 10000 - 2000 passed"
    );
    let mut o = obs(
        "n2",
        running(PgRole::Replica, 1, 1000),
        Some(view(Some("n2"), healthy_three("n1"))),
    );
    o.leader_lease = lease;
    assert_eq!(
        actions(&o, 9_000),
        vec![Action::RenewLeader { lease_id: 42 }]
    );
    o.leader_lease = None;
    assert_eq!(
        actions(&o, 2_000),
        vec![Action::RenewLeader { lease_id: 42 }],
        "restarted agent: renew first, promote on the next pass"
    );
    let mut o = obs(
        "n1",
        LocalPostgres::default(),
        Some(view(Some("n1"), healthy_three("n1"))),
    );
    o.leader_lease = None;
    assert_eq!(
        actions(&o, 2_000),
        vec![Action::RenewLeader { lease_id: 42 }]
    );
}

/// Found by the simulator (seeds 366, 462, 495): synchronous mode with a
/// claim of nothing, `pgha switchover` without a target. The leader handed
/// over and released the key, but the target was named nowhere in etcd, the
/// claim let nobody else lead, and the old leader waited in its handover
/// forever: no primary.
#[test]
fn old_leader_rejoins_the_election_once_its_handover_is_stale() {
    let mut v = view(None, healthy_three("n1"));
    v.config.synchronous_mode = SyncMode::On;
    v.sync = Some(SyncKey {
        leader: "n1".into(),
        set: SyncSet::none(),
    });
    let mut o = obs("n1", LocalPostgres::default(), Some(v));
    o.last_role = Some(PgRole::Primary);
    o.handover = Some(Handover {
        since: Tick(1_000),
        to: "n2".into(),
        force: false,
    });
    assert_eq!(actions(&o, 20_999), vec![]);
    assert_eq!(
        actions(&o, 21_000),
        vec![Action::StartReplica { upstream: None }],
        "handover_timeout + ttl later"
    );
    o.local = running(PgRole::Replica, 1, 1000);
    o.handover = None;
    o.peers = Some(Vec::new());
    assert_eq!(
        actions(&o, 22_000),
        vec![Action::AcquireLeader],
        "its own claim lets it lead"
    );
}

/// Found by the simulator (seed 3785, synchronous_mode on): n1's host froze
/// for 23 s; n2 was promoted, acknowledged commits on n3, then lost etcd and
/// its key expired. n1 resumed with its last probe (a running primary), took
/// the key back without any check and started as primary: n2's commits lost.
#[test]
fn primary_does_not_take_the_key_back_after_another_leader_claimed() {
    let mut v = view(None, healthy_three("n1"));
    v.config.synchronous_mode = SyncMode::On;
    v.sync = Some(SyncKey {
        leader: "n2".into(),
        set: SyncSet::none(),
    });
    let o = obs("n1", running(PgRole::Primary, 1, 1000), Some(v.clone()));
    assert_eq!(actions(&o, 0), vec![Action::Stop { then_rewind: false }]);
    v.sync = Some(SyncKey {
        leader: "n1".into(),
        set: SyncSet::new(vec!["n2".into()], 1),
    });
    let o = obs("n1", running(PgRole::Primary, 1, 1000), Some(v));
    assert_eq!(actions(&o, 0), vec![Action::AcquireLeader]);
}

/// Found by the simulator (seed 4929, synchronous_mode quorum): n1 led,
/// claimed 1 of [n2,n3], was cut off and fenced, later won an election again
/// as the most advanced replica. Its old claim was still in etcd, so it did
/// not publish an empty one, promoted and acknowledged commits waiting for
/// nobody under a claim saying they were on n2 or n3; n2 was promoted on it.
#[test]
fn promotion_weakens_our_own_earlier_claim() {
    let mut v = view(Some("n1"), healthy_three("n2"));
    v.config.synchronous_mode = SyncMode::Quorum;
    v.sync = Some(SyncKey {
        leader: "n1".into(),
        set: SyncSet::new(vec!["n2".into(), "n3".into()], 1),
    });
    let mut local = running(PgRole::Replica, 1, 1000);
    local.sync_standbys = Some(SyncSet::new(vec!["n2".into(), "n3".into()], 1));
    local.slots = vec!["n2".into(), "n3".into()];
    let o = obs("n1", local, Some(v));
    assert_eq!(
        actions(&o, 0),
        vec![
            Action::RenewLeader { lease_id: 42 },
            Action::PublishSync {
                set: SyncSet::none()
            },
            Action::SetSyncStandbys {
                set: SyncSet::none()
            },
            Action::ReserveTimeline { timeline: 2 },
            Action::Promote { timeline: 2 }
        ]
    );
}

/// Found by the simulator (seed 15683): the handover target never
/// confirmed; at the timeout the old leader, its lease long expired and the
/// key another node's (its view still showed it), started as primary again.
#[test]
fn aborted_handover_restarts_the_primary_only_on_a_proven_lease() {
    let v = with_switchover(Some("n1"), switchover("n1", Some("n3")));
    let mut o = obs("n1", LocalPostgres::default(), Some(v));
    o.last_role = Some(PgRole::Primary);
    o.handover = Some(Handover {
        since: Tick(0),
        to: "n3".into(),
        force: false,
    });
    o.leader_lease = Some(HeldLease {
        lease_id: 42,
        renewed_at: Tick(9_000),
    });
    assert_eq!(
        actions(&o, 10_000)[1..],
        [Action::StartPrimary, Action::ClearSwitchover]
    );
    o.leader_lease = Some(HeldLease {
        lease_id: 42,
        renewed_at: Tick(0),
    });
    assert_eq!(actions(&o, 10_000)[1..], [Action::ClearSwitchover]);
}

/// Found by the simulator (asynchronous mode, no WAL archive): n3 promoted
/// to timeline 2 and vanished; n2, which never streamed from n3, would
/// promote to timeline 2 as well, and pg_rewind takes two histories with one
/// number for the same. The promotion goes past every timeline known.
#[test]
fn promotion_reserves_a_timeline_above_every_known_one() {
    let promote_to = |v: DcsView| -> Vec<Action> {
        let o = obs("n2", running(PgRole::Replica, 1, 1000), Some(v));
        actions(&o, 0)
            .into_iter()
            .filter(|a| matches!(a, Action::ReserveTimeline { .. } | Action::Promote { .. }))
            .collect()
    };
    let reserve = |t| {
        vec![
            Action::ReserveTimeline { timeline: t },
            Action::Promote { timeline: t },
        ]
    };
    let mut v = view(Some("n2"), healthy_three("n1"));
    assert_eq!(promote_to(v.clone()), reserve(2), "nothing newer known");
    v.timeline = Some(TimelineKey {
        timeline: 2,
        by: "n3".into(),
    });
    assert_eq!(
        promote_to(v.clone()),
        reserve(3),
        "n3 reserved 2 and vanished"
    );
    v.newest_timeline = Some(4);
    assert_eq!(promote_to(v.clone()), reserve(5), "the history records 4");
    v.members[2].timeline = Some(6);
    assert_eq!(promote_to(v.clone()), reserve(7), "a member runs on 6");
    v.timeline = Some(TimelineKey {
        timeline: 9,
        by: "n2".into(),
    });
    assert_eq!(
        promote_to(v.clone()),
        reserve(9),
        "our own reservation from a pass that did not promote is reused"
    );
    v.members[2].timeline = Some(9);
    assert_eq!(
        promote_to(v),
        reserve(10),
        "but not once someone runs on it"
    );
}

#[test]
fn new_leader_creates_slots_then_promotes() {
    let o = obs(
        "n2",
        running(PgRole::Replica, 1, 1000),
        Some(view(Some("n2"), healthy_three("n1"))),
    );
    assert_eq!(
        actions(&o, 0),
        vec![
            Action::RenewLeader { lease_id: 42 },
            Action::CreateSlots {
                names: vec!["n1".into(), "n3".into()]
            },
            Action::ReserveTimeline { timeline: 2 },
            Action::Promote { timeline: 2 }
        ]
    );
}

#[test]
fn primary_drops_orphan_slots_after_the_grace_period() {
    let mut local = running(PgRole::Primary, 1, 1000);
    local.slots = vec!["n2".into(), "n3".into(), "gone".into()];
    let mut o = obs("n1", local, Some(view(Some("n1"), healthy_three("n1"))));
    o.orphan_slots = vec![OrphanSlot {
        name: "gone".into(),
        missing_since: Tick(0),
    }];
    o.leader_lease = Some(HeldLease {
        lease_id: 42,
        renewed_at: Tick(29_000),
    });
    assert_eq!(
        actions(&o, 29_999),
        vec![Action::RenewLeader { lease_id: 42 }]
    );
    assert_eq!(
        actions(&o, 30_000),
        vec![
            Action::RenewLeader { lease_id: 42 },
            Action::DropSlots {
                names: vec!["gone".into()]
            }
        ]
    );
}

#[test]
fn second_primary_is_stopped() {
    let o = obs(
        "n3",
        running(PgRole::Primary, 1, 1000),
        Some(view(Some("n1"), healthy_three("n1"))),
    );
    assert_eq!(actions(&o, 0), vec![Action::Stop { then_rewind: false }]);
}

#[test]
fn replica_repoints_to_the_current_leader() {
    let mut local = running(PgRole::Replica, 1, 1000);
    local.following = Some("n3".into());
    let o = obs("n2", local, Some(view(Some("n1"), healthy_three("n1"))));
    assert_eq!(
        actions(&o, 0),
        vec![Action::Follow {
            upstream: "n1".into()
        }]
    );
}

#[test]
fn stalled_replica_on_an_older_timeline_is_stopped_for_rewind() {
    let mut members = healthy_three("n1");
    members[0].timeline = Some(3);
    let mut local = running(PgRole::Replica, 2, 1000);
    local.following = Some("n1".into());
    let mut o = obs("n2", local, Some(view(Some("n1"), members)));
    o.replica_stalled_since = Some(Tick(0));
    assert!(actions(&o, 4_999).is_empty());
    assert_eq!(actions(&o, 5_000), vec![Action::Stop { then_rewind: true }]);
    o.local.timeline = Some(3);
    assert!(
        actions(&o, 60_000).is_empty(),
        "same timeline: a rewind would not help"
    );
}

#[test]
fn stopped_former_primary_rewinds_before_following() {
    let mut o = obs(
        "n3",
        LocalPostgres::default(),
        Some(view(Some("n1"), healthy_three("n1"))),
    );
    o.last_role = Some(PgRole::Primary);
    assert_eq!(actions(&o, 0), vec![Action::Rewind { from: "n1".into() }]);
    o.last_role = Some(PgRole::Replica);
    assert_eq!(
        actions(&o, 0),
        vec![Action::StartReplica {
            upstream: Some("n1".into())
        }]
    );
    o.needs_rewind = true;
    assert_eq!(actions(&o, 0), vec![Action::Rewind { from: "n1".into() }]);
}

#[test]
fn without_leader_a_stopped_node_starts_read_only() {
    let o = obs(
        "n2",
        LocalPostgres::default(),
        Some(view(None, healthy_three("n1"))),
    );
    assert_eq!(
        actions(&o, 0),
        vec![Action::StartReplica { upstream: None }]
    );
}

#[test]
fn without_leader_a_running_primary_retakes_the_key() {
    let o = obs(
        "n1",
        running(PgRole::Primary, 1, 1000),
        Some(view(None, healthy_three("n1"))),
    );
    assert_eq!(actions(&o, 0), vec![Action::AcquireLeader]);
}

fn replicas(positions: &[(&str, u32, u64)]) -> Vec<MemberStatus> {
    positions
        .iter()
        .map(|(n, tl, lsn)| member(n, MemberRole::Replica, "running", *tl, *lsn))
        .collect()
}

#[test]
fn most_advanced_replica_takes_the_key() {
    let v = view(None, replicas(&[("n2", 1, 2000), ("n3", 1, 1000)]));
    assert_eq!(
        actions(
            &obs("n2", running(PgRole::Replica, 1, 2000), Some(v.clone())),
            0
        ),
        vec![Action::AcquireLeader]
    );
    assert!(actions(&obs("n3", running(PgRole::Replica, 1, 1000), Some(v)), 0).is_empty());
}

#[test]
fn newer_timeline_beats_a_higher_lsn() {
    let v = view(None, replicas(&[("n2", 2, 1000), ("n3", 1, 5000)]));
    assert!(actions(
        &obs("n3", running(PgRole::Replica, 1, 5000), Some(v.clone())),
        0
    )
    .is_empty());
    assert_eq!(
        actions(&obs("n2", running(PgRole::Replica, 2, 1000), Some(v)), 0),
        vec![Action::AcquireLeader]
    );
}

#[test]
fn ties_go_to_priority_then_name() {
    let mut members = replicas(&[("n2", 1, 1000), ("n3", 1, 1000)]);
    let v = view(None, members.clone());
    assert_eq!(
        actions(
            &obs("n2", running(PgRole::Replica, 1, 1000), Some(v.clone())),
            0
        ),
        vec![Action::AcquireLeader]
    );
    assert!(actions(&obs("n3", running(PgRole::Replica, 1, 1000), Some(v)), 0).is_empty());
    members[1].failover_priority = 5;
    let v = view(None, members);
    let mut n3 = obs("n3", running(PgRole::Replica, 1, 1000), Some(v));
    n3.tags.failover_priority = 5;
    assert_eq!(actions(&n3, 0), vec![Action::AcquireLeader]);
}

#[test]
fn nofailover_lagging_and_waiting_candidates_stay_replicas() {
    let v = view(None, replicas(&[("n2", 1, 1000), ("n3", 1, 1000)]));
    let mut o = obs("n2", running(PgRole::Replica, 1, 1000), Some(v.clone()));
    o.tags.nofailover = true;
    assert!(actions(&o, 0).is_empty(), "nofailover");

    let mut lagging = v.clone();
    lagging.last_leader_lsn = Some(Lsn(1000 + 2 * 1024 * 1024));
    assert!(
        actions(
            &obs("n2", running(PgRole::Replica, 1, 1000), Some(lagging)),
            0
        )
        .is_empty(),
        "lag above maximum_lag_on_failover"
    );

    let mut paused = running(PgRole::Replica, 1, 1000 + 2 * 1024 * 1024);
    paused.replay_lsn = Some(Lsn(1000));
    let mut recent = v.clone();
    recent.last_leader_lsn = Some(Lsn(1000 + 2 * 1024 * 1024));
    assert!(
        actions(&obs("n2", paused, Some(recent)), 0).is_empty(),
        "received everything but replay is paused far behind"
    );

    let mut starting = v;
    starting.members[1].state = "starting".into();
    assert!(
        actions(
            &obs("n2", running(PgRole::Replica, 1, 1000), Some(starting)),
            0
        )
        .is_empty(),
        "a member has not reported yet"
    );
}

/// Issue 26: a member stuck in `starting` (a standby that waits for a
/// primary to become consistent) kept every election waiting for good.
#[test]
fn a_member_starting_without_a_position_is_waited_for_at_most_primary_start_timeout() {
    let mut members = replicas(&[("n2", 14, 5000), ("n3", 14, 4000)]);
    let mut stuck = member("n1", MemberRole::Replica, "starting", 13, 0);
    stuck.wal_position = None;
    stuck.receive_lsn = None;
    stuck.replay_lsn = None;
    members.insert(0, stuck);
    let v = view(None, members);
    let bound = v.config.primary_start_timeout_ms;
    let mut n2 = obs("n2", running(PgRole::Replica, 14, 5000), Some(v.clone()));
    n2.member_waits.observe(&v, Tick(1_000));

    // Within the bound: wait, and say so (the reason is logged every pass).
    let steps = decide(&n2, &settings(), Tick(1_000 + bound - 1));
    assert_eq!(steps.len(), 1, "{steps:?}");
    assert_eq!(steps[0].action, Action::Wait);
    assert!(
        steps[0].reason.contains("n1 is starting"),
        "{}",
        steps[0].reason
    );
    assert!(
        steps[0].reason.contains("primary_start_timeout"),
        "{}",
        steps[0].reason
    );

    // Past it: the most advanced of the others runs, and says whom it passed over.
    let steps = decide(&n2, &settings(), Tick(1_000 + bound));
    assert_eq!(steps.len(), 1, "{steps:?}");
    assert_eq!(steps[0].action, Action::AcquireLeader);
    assert!(
        steps[0].reason.contains("no longer waiting for n1"),
        "{}",
        steps[0].reason
    );
    // ...and only the most advanced: n3 still yields to n2.
    let mut n3 = obs("n3", running(PgRole::Replica, 14, 4000), Some(v.clone()));
    n3.member_waits.observe(&v, Tick(1_000));
    assert!(actions(&n3, 1_000 + bound).is_empty());

    // Once it reports a position it is a candidate like any other: the
    // wait starts again from zero if it loses it.
    let mut waits = n2.member_waits.clone();
    let mut reported = v.clone();
    reported.members[0].replay_lsn = Some(Lsn(100));
    waits.observe(&reported, Tick(2_000));
    assert_eq!(waits.waited_ms("n1", Tick(50_000)), 0);
    waits.observe(&v, Tick(50_000));
    assert_eq!(waits.waited_ms("n1", Tick(50_100)), 100);
}

#[test]
fn the_start_wait_never_overrides_the_sync_claim() {
    // synchronous_mode on, the claim names n1 (stuck starting): n2 may not
    // lead however long n1 takes, because only n1 holds every commit.
    let mut members = replicas(&[("n2", 1, 5000)]);
    let mut stuck = member("n1", MemberRole::Replica, "starting", 1, 0);
    stuck.wal_position = None;
    stuck.receive_lsn = None;
    stuck.replay_lsn = None;
    members.push(stuck);
    let mut v = view(None, members);
    v.config.synchronous_mode = SyncMode::On;
    v.sync = Some(SyncKey {
        leader: "n3".into(),
        set: SyncSet::new(vec!["n1".into()], 1),
    });
    let mut n2 = obs("n2", running(PgRole::Replica, 1, 5000), Some(v.clone()));
    n2.member_waits.observe(&v, Tick(0));
    n2.peers = Some(vec![]);
    assert!(actions(&n2, 10_000_000).is_empty());
}

#[test]
fn an_unfinished_rewind_never_starts_and_finishes_against_the_leader() {
    // No leader: not started (it would wait for a primary for good), not a candidate.
    let mut o = obs(
        "n1",
        LocalPostgres::default(),
        Some(view(None, replicas(&[("n2", 2, 5000), ("n3", 2, 5000)]))),
    );
    o.rewind_pending = true;
    o.last_role = Some(PgRole::Replica);
    let steps = decide(&o, &settings(), Tick(0));
    assert_eq!(
        steps.iter().map(|s| &s.action).collect::<Vec<_>>(),
        vec![&Action::Wait]
    );
    assert!(
        steps[0].reason.contains("not a candidate"),
        "{}",
        steps[0].reason
    );

    // A leader whose Postgres runs: rewind against it, never a plain start.
    let mut members = healthy_three("n2");
    members.retain(|m| m.name != "n1");
    o.dcs = Some(view(Some("n2"), members.clone()));
    assert_eq!(actions(&o, 0), vec![Action::Rewind { from: "n2".into() }]);
    // Even after a clean handover (which otherwise needs no rewind).
    o.last_role = Some(PgRole::Primary);
    o.handover = Some(Handover {
        since: Tick(0),
        to: "n2".into(),
        force: false,
    });
    assert_eq!(actions(&o, 0), vec![Action::Rewind { from: "n2".into() }]);
    // The leader's Postgres is not up yet: wait for it.
    members[0].state = "starting".into();
    o.dcs = Some(view(Some("n2"), members));
    assert!(actions(&o, 0).is_empty());
    // The rewind failed again: auto_reinit reclones, otherwise it stays down.
    let mut v = view(Some("n2"), healthy_three("n2"));
    o.rewind_failed = true;
    o.dcs = Some(v.clone());
    assert!(actions(&o, 0).is_empty());
    v.config.auto_reinit = true;
    o.dcs = Some(v);
    assert_eq!(actions(&o, 0), vec![Action::MoveAside]);

    // Holding the key (it cannot run as primary): hand the key over.
    let mut l = obs(
        "n1",
        LocalPostgres::default(),
        Some(view(Some("n1"), healthy_three("n1"))),
    );
    l.rewind_pending = true;
    assert_eq!(
        actions(&l, 0),
        vec![Action::RenewLeader { lease_id: 42 }, Action::ReleaseLeader]
    );
}

#[test]
fn a_replica_whose_replay_is_paused_is_no_candidate_and_blocks_no_one() {
    // Equal received positions, lag far below maximum_lag_on_failover: only
    // the pause tells them apart (n2 would win the tie on its name).
    let pos = 1000 + 64 * 1024;
    let mut v = view(None, replicas(&[("n2", 1, pos), ("n3", 1, pos)]));
    v.last_leader_lsn = Some(Lsn(pos));
    let mut paused = running(PgRole::Replica, 1, pos);
    paused.replay_paused = true;
    paused.replay_lsn = Some(Lsn(pos - 16 * 1024));
    let n2 = obs("n2", paused, Some(v.clone()));
    assert!(actions(&n2, 0).is_empty(), "n2 must not take the key");
    let why = super::decide::candidacy(&n2, &v, Tick(0)).unwrap_err();
    assert!(why.contains("replay is paused"), "{why}");

    // n3 sees the pause in n2's member key, or in its live answer.
    v.members[0].replay_paused = true;
    let n3 = obs("n3", running(PgRole::Replica, 1, pos), Some(v.clone()));
    assert_eq!(actions(&n3, 0), vec![Action::AcquireLeader]);
    v.members[0].replay_paused = false;
    let mut n3 = obs("n3", running(PgRole::Replica, 1, pos), Some(v));
    n3.peers = Some(vec![PeerPosition {
        name: "n2".into(),
        timeline: Some(1),
        lsn: Lsn(pos),
        replay_lsn: Lsn(pos - 16 * 1024),
        saw_no_leader: true,
        replay_paused: true,
    }]);
    assert_eq!(actions(&n3, 0), vec![Action::AcquireLeader]);
}

#[test]
fn a_replica_too_far_behind_in_replay_does_not_block_the_others() {
    let far = 1000 + 4 * 1024 * 1024;
    let mut v = view(None, replicas(&[("n2", 1, far), ("n3", 1, far)]));
    v.members[0].replay_lsn = Some(Lsn(1000));
    v.last_leader_lsn = Some(Lsn(far));
    assert_eq!(
        actions(
            &obs("n3", running(PgRole::Replica, 1, far), Some(v.clone())),
            0
        ),
        vec![Action::AcquireLeader]
    );
    let mut n3 = obs("n3", running(PgRole::Replica, 1, far), Some(v));
    n3.peers = Some(vec![PeerPosition {
        name: "n2".into(),
        timeline: Some(1),
        lsn: Lsn(far + 10),
        replay_lsn: Lsn(1000),
        saw_no_leader: true,
        replay_paused: false,
    }]);
    assert_eq!(
        actions(&n3, 0),
        vec![Action::AcquireLeader],
        "live answer: received more, replayed far less"
    );
}

#[test]
fn nofailover_member_does_not_block_others() {
    let mut members = replicas(&[("n2", 1, 1000), ("n3", 1, 9000)]);
    members[1].nofailover = true;
    let v = view(None, members);
    assert_eq!(
        actions(&obs("n2", running(PgRole::Replica, 1, 1000), Some(v)), 0),
        vec![Action::AcquireLeader]
    );
}

#[test]
fn primary_region_limits_bootstrap_and_promotion() {
    let mut v = view(None, vec![]);
    v.initialize = None;
    let mut o = obs("n1", LocalPostgres::default(), Some(v));
    o.data_dir = DataDir::Empty;
    o.may_bootstrap = false;
    assert!(
        actions(&o, 0).is_empty(),
        "outside the primary region: no bootstrap"
    );

    let mut members = replicas(&[("n2", 1, 1000), ("n3", 1, 9000)]);
    members[0].region = Some("ams".into());
    members[1].region = Some("syd".into());
    let mut v = view(None, members);
    v.config.primary_region = Some("ams".into());
    let mut n2 = obs("n2", running(PgRole::Replica, 1, 1000), Some(v.clone()));
    n2.region = Some("ams".into());
    assert_eq!(
        actions(&n2, 0),
        vec![Action::AcquireLeader],
        "n3 is ahead but outside the primary region"
    );
    let mut n3 = obs("n3", running(PgRole::Replica, 1, 9000), Some(v));
    n3.region = Some("syd".into());
    assert!(actions(&n3, 0).is_empty());
}

#[test]
fn live_peer_positions_override_etcd_and_unreachable_peers_are_ignored() {
    let v = view(None, replicas(&[("n2", 1, 1000), ("n3", 1, 1000)]));
    let mut n3 = obs("n3", running(PgRole::Replica, 1, 1000), Some(v));
    assert!(
        actions(&n3, 0).is_empty(),
        "tie on etcd data: n2 wins by name"
    );
    n3.peers = Some(vec![PeerPosition {
        name: "n2".into(),
        timeline: Some(1),
        lsn: Lsn(500),
        replay_lsn: Lsn(500),
        saw_no_leader: true,
        replay_paused: false,
    }]);
    assert_eq!(
        actions(&n3, 0),
        vec![Action::AcquireLeader],
        "n2 answered with an older position"
    );
    n3.peers = Some(vec![]);
    assert_eq!(
        actions(&n3, 0),
        vec![Action::AcquireLeader],
        "n2 did not answer"
    );
    n3.peers = Some(vec![PeerPosition {
        name: "n2".into(),
        timeline: Some(1),
        lsn: Lsn(1500),
        replay_lsn: Lsn(1500),
        saw_no_leader: true,
        replay_paused: false,
    }]);
    assert!(actions(&n3, 0).is_empty(), "n2 is ahead");
}

#[test]
fn failed_rewind_reclones_only_with_auto_reinit() {
    let mut o = obs(
        "n3",
        LocalPostgres::default(),
        Some(view(Some("n1"), healthy_three("n1"))),
    );
    o.last_role = Some(PgRole::Primary);
    o.rewind_failed = true;
    assert!(actions(&o, 0).is_empty(), "waits for an operator");
    let mut v = view(Some("n1"), healthy_three("n1"));
    v.config.auto_reinit = true;
    o.dcs = Some(v);
    assert_eq!(actions(&o, 0), vec![Action::MoveAside]);
}

#[test]
fn paused_cluster_neither_fails_over_nor_restarts() {
    let mut v = view(None, replicas(&[("n2", 1, 1000), ("n3", 1, 900)]));
    v.config.paused = true;
    assert!(
        actions(
            &obs("n2", running(PgRole::Replica, 1, 1000), Some(v.clone())),
            0
        )
        .is_empty(),
        "no failover"
    );
    assert!(
        actions(&obs("n2", LocalPostgres::default(), Some(v)), 0).is_empty(),
        "no automatic start"
    );

    let mut v = view(Some("n1"), healthy_three("n1"));
    v.config.paused = true;
    let mut leader = obs("n1", LocalPostgres::default(), Some(v.clone()));
    leader.pg_down_since = Some(Tick(0));
    assert_eq!(
        actions(&leader, 60_000),
        vec![Action::RenewLeader { lease_id: 42 }],
        "keeps the key, no restart, no release"
    );
    let mut old = obs("n3", LocalPostgres::default(), Some(v));
    old.last_role = Some(PgRole::Primary);
    assert!(
        actions(&old, 0).is_empty(),
        "no rewind or start while paused"
    );
}

fn switchover(from: &str, to: Option<&str>) -> SwitchoverKey {
    SwitchoverKey {
        from: from.into(),
        to: to.map(Into::into),
        at_ms: None,
        requested_ms: 1_000_000,
        force: false,
        released_to: None,
    }
}

fn with_switchover(leader: Option<&str>, sw: SwitchoverKey) -> DcsView {
    let mut v = view(leader, healthy_three("n1"));
    v.switchover = Some(sw);
    v
}

#[test]
fn due_switchover_stops_the_leader_for_a_healthy_target() {
    let o = obs(
        "n1",
        running(PgRole::Primary, 1, 1000),
        Some(with_switchover(Some("n1"), switchover("n1", Some("n3")))),
    );
    assert_eq!(
        actions(&o, 0),
        vec![
            Action::RenewLeader { lease_id: 42 },
            Action::HandoverStop { to: "n3".into() }
        ]
    );
    let o = obs(
        "n1",
        running(PgRole::Primary, 1, 1000),
        Some(with_switchover(Some("n1"), switchover("n1", None))),
    );
    assert_eq!(
        actions(&o, 0)[1],
        Action::HandoverStop { to: "n2".into() },
        "best replica, ties by name"
    );
}

#[test]
fn switchover_to_an_unfit_target_is_refused_and_cleared() {
    let mut v = with_switchover(Some("n1"), switchover("n1", Some("n3")));
    v.members[2].nofailover = true;
    let o = obs("n1", running(PgRole::Primary, 1, 1000), Some(v.clone()));
    assert_eq!(actions(&o, 0)[1..], [Action::ClearSwitchover]);
    v.members[2].nofailover = false;
    v.members[2].state = "running".into();
    let o = obs("n1", running(PgRole::Primary, 1, 1000), Some(v.clone()));
    assert_eq!(
        actions(&o, 0)[1..],
        [Action::ClearSwitchover],
        "not streaming"
    );
    v.members[2].state = "streaming".into();
    v.members[2].replay_lsn = Some(Lsn(0));
    v.members[0].wal_position = Some(Lsn(5 * 1024 * 1024));
    let o = obs("n1", running(PgRole::Primary, 1, 5 * 1024 * 1024), Some(v));
    assert_eq!(actions(&o, 0)[1..], [Action::ClearSwitchover], "lagging");
}

#[test]
fn scheduled_switchover_waits_for_its_time() {
    let mut sw = switchover("n1", Some("n2"));
    sw.at_ms = Some(2_000_000);
    let mut local = running(PgRole::Primary, 1, 1000);
    local.slots = vec!["n2".into(), "n3".into()];
    let mut o = obs("n1", local, Some(with_switchover(Some("n1"), sw)));
    assert_eq!(actions(&o, 0), vec![Action::RenewLeader { lease_id: 42 }]);
    o.wall_ms = 2_000_000;
    assert_eq!(actions(&o, 0)[1], Action::HandoverStop { to: "n2".into() });
}

#[test]
fn stopped_leader_releases_only_when_the_target_has_its_last_wal() {
    let mut o = obs(
        "n1",
        LocalPostgres::default(),
        Some(with_switchover(Some("n1"), switchover("n1", Some("n2")))),
    );
    o.handover = Some(Handover {
        since: Tick(0),
        to: "n2".into(),
        force: false,
    });
    o.checkpoint_lsn = Some(Lsn(2000));
    o.peers = Some(vec![PeerPosition {
        name: "n2".into(),
        timeline: Some(1),
        lsn: Lsn(1999),
        replay_lsn: Lsn(1999),
        saw_no_leader: true,
        replay_paused: false,
    }]);
    assert_eq!(
        actions(&o, 5_000),
        vec![Action::RenewLeader { lease_id: 42 }],
        "waits"
    );
    // Renewed every pass while it waits.
    o.leader_lease = Some(HeldLease {
        lease_id: 42,
        renewed_at: Tick(9_500),
    });
    assert_eq!(
        actions(&o, 10_000),
        vec![
            Action::RenewLeader { lease_id: 42 },
            Action::StartPrimary,
            Action::ClearSwitchover
        ],
        "gives up after handover_timeout and runs as primary again"
    );
    o.peers = Some(vec![PeerPosition {
        name: "n2".into(),
        timeline: Some(1),
        lsn: Lsn(2100),
        replay_lsn: Lsn(2100),
        saw_no_leader: true,
        replay_paused: false,
    }]);
    assert_eq!(
        actions(&o, 5_000),
        vec![
            Action::RenewLeader { lease_id: 42 },
            Action::HandOverKey { to: "n2".into() }
        ]
    );
    // The target's agent stops as well (the whole fleet stopped at once):
    // no waiting out the timeout.
    o.peers = Some(Vec::new());
    o.shutting_down = true;
    if let Some(v) = o.dcs.as_mut() {
        v.members.retain(|m| m.name != "n2");
    }
    assert_eq!(
        actions(&o, 5_000),
        vec![
            Action::RenewLeader { lease_id: 42 },
            Action::ClearSwitchover
        ]
    );
}

#[test]
fn switchover_target_takes_the_key_and_others_wait() {
    let mut sw = switchover("n1", Some("n3"));
    sw.released_to = Some("n3".into());
    let mut v = with_switchover(None, sw);
    // The old leader stopped for the handover and handed the key over.
    v.members[0].state = "stopped".into();
    assert_eq!(
        actions(
            &obs("n3", running(PgRole::Replica, 1, 1000), Some(v.clone())),
            0
        ),
        vec![Action::AcquireLeader]
    );
    assert!(
        actions(
            &obs("n2", running(PgRole::Replica, 1, 9000), Some(v.clone())),
            0
        )
        .is_empty(),
        "n2 is ahead but not the target"
    );
    let mut late = obs("n2", running(PgRole::Replica, 1, 9000), Some(v));
    late.wall_ms = 1_000_000 + 30_001;
    assert_eq!(
        actions(&late, 0),
        vec![Action::AcquireLeader],
        "a stale request no longer binds"
    );
}

/// Found by the docker test: during its stop job a forced failover's leader
/// published itself as a stopping replica, so a bystander took the key in
/// an ordinary election. Only the hand-over mark in the switchover key counts.
#[test]
fn forced_failover_goes_to_the_member_the_key_was_handed_to() {
    let mut sw = switchover("n1", Some("n2"));
    sw.force = true;
    let mut v = with_switchover(None, sw);
    v.members[0].role = MemberRole::Replica;
    v.members[0].state = "stopping".into();
    let bystander = |v: &DcsView| obs("n3", running(PgRole::Replica, 1, 9000), Some(v.clone()));
    let target = |v: &DcsView| obs("n2", running(PgRole::Replica, 1, 1000), Some(v.clone()));
    assert_eq!(
        actions(&bystander(&v), 0),
        vec![Action::AcquireLeader],
        "nothing handed over (the leader's lease ran out): an ordinary election"
    );
    if let Some(sw) = v.switchover.as_mut() {
        sw.released_to = Some("n2".into());
    }
    assert!(
        actions(&bystander(&v), 0).is_empty(),
        "n2 was handed the key"
    );
    assert_eq!(actions(&target(&v), 0), vec![Action::AcquireLeader]);
}

/// Found by the simulator (seed 429, synchronous_mode strict): a switchover
/// to n4 was requested while the leader n1 was cut off; n1 never stopped for
/// it, its lease expired, and n4 took the key as the switchover's target
/// without the synchronous proof: n3 held the acknowledged commits, n4 did not.
#[test]
fn switchover_target_of_a_vanished_leader_needs_the_usual_proof() {
    let mut v = with_switchover(None, switchover("n1", Some("n3")));
    v.config.synchronous_mode = SyncMode::Strict;
    v.sync = Some(SyncKey {
        leader: "n1".into(),
        set: SyncSet::new(vec!["n2".into()], 1),
    });
    let mut target = obs("n3", running(PgRole::Replica, 1, 1000), Some(v.clone()));
    target.peers = Some(Vec::new());
    assert_eq!(
        actions(&target, 0),
        vec![],
        "n1 still shows running: no handover"
    );
    let mut sync = obs("n2", running(PgRole::Replica, 1, 1000), Some(v.clone()));
    sync.peers = Some(Vec::new());
    assert_eq!(actions(&sync, 0), vec![Action::AcquireLeader]);
    // Found by the simulator too: n1 stopped for the handover, but its
    // lease ran out before n3 confirmed n1's last WAL. A stopped leader is
    // no proof; only the handover recorded with the key's deletion is.
    v.members[0].state = "stopped".into();
    target.dcs = Some(v.clone());
    assert_eq!(
        actions(&target, 0),
        vec![],
        "n1 stopped but never handed the key over: the usual proof applies"
    );
    if let Some(sw) = v.switchover.as_mut() {
        sw.released_to = Some("n3".into());
    }
    target.dcs = Some(v);
    assert_eq!(
        actions(&target, 0),
        vec![Action::AcquireLeader],
        "n1 handed the key over to n3: it takes over"
    );
}

#[test]
fn handed_over_leader_follows_without_rewind_and_new_leader_clears_the_request() {
    let v = with_switchover(Some("n2"), switchover("n1", Some("n2")));
    let mut old = obs("n1", LocalPostgres::default(), Some(v.clone()));
    old.last_role = Some(PgRole::Primary);
    old.handover = Some(Handover {
        since: Tick(0),
        to: "n2".into(),
        force: false,
    });
    let mut members = healthy_three("n2");
    members.iter_mut().for_each(|m| {
        m.state = if m.name == "n2" {
            "running".into()
        } else {
            m.state.clone()
        }
    });
    let mut v2 = v.clone();
    v2.members = members;
    old.dcs = Some(v2.clone());
    assert_eq!(
        actions(&old, 0),
        vec![Action::StartReplica {
            upstream: Some("n2".into())
        }]
    );
    let new = obs("n2", running(PgRole::Primary, 2, 1000), Some(v2));
    assert!(actions(&new, 0).contains(&Action::ClearSwitchover));
}

#[test]
fn a_stopped_primary_stays_down_until_load_balancers_have_taken_it_out() {
    let mut old = obs(
        "n1",
        LocalPostgres::default(),
        Some(view(Some("n2"), healthy_three("n2"))),
    );
    old.last_role = Some(PgRole::Primary);
    old.handover = Some(Handover {
        since: Tick(1_000),
        to: "n2".into(),
        force: false,
    });
    old.primary_ended_at = Some(Tick(1_000));
    let steps = decide(&old, &settings(), Tick(2_000));
    assert_eq!(steps.len(), 1);
    assert_eq!(steps[0].action, Action::Wait);
    assert!(
        steps[0].reason.contains("1000 ms ago") && steps[0].reason.contains("2500 ms"),
        "the wait says why and for how long: {}",
        steps[0].reason
    );
    assert_eq!(
        actions(&old, 3_500),
        vec![Action::StartReplica {
            upstream: Some("n2".into())
        }],
        "the window is over: follow the new leader"
    );
    // A demoted primary that must rewind waits the same way first.
    old.handover = None;
    assert!(actions(&old, 3_499).is_empty());
    assert_eq!(
        actions(&old, 3_500),
        vec![Action::Rewind { from: "n2".into() }]
    );
    // Off (router only): no wait at all.
    let off = Settings {
        balancer_window_ms: 0,
        ..settings()
    };
    assert!(decide(&old, &off, Tick(1_000))
        .iter()
        .any(|s| s.action == Action::Rewind { from: "n2".into() }));
}

#[test]
fn shutting_down_starts_nothing() {
    let mut o = obs(
        "n2",
        LocalPostgres::default(),
        Some(view(Some("n1"), healthy_three("n1"))),
    );
    o.shutting_down = true;
    assert!(actions(&o, 0).is_empty());
    let mut leader = obs(
        "n1",
        LocalPostgres::default(),
        Some(view(Some("n1"), healthy_three("n1"))),
    );
    leader.shutting_down = true;
    assert_eq!(
        actions(&leader, 0),
        vec![Action::RenewLeader { lease_id: 42 }]
    );
}

#[test]
fn running_job_only_renews() {
    let mut o = obs(
        "n1",
        LocalPostgres::default(),
        Some(view(Some("n1"), healthy_three("n1"))),
    );
    o.job = Some(Job::Start);
    assert_eq!(actions(&o, 0), vec![Action::RenewLeader { lease_id: 42 }]);
    o.dcs = Some(view(Some("n2"), healthy_three("n2")));
    assert!(actions(&o, 0).is_empty());
}

#[test]
fn a_standby_still_starting_is_pointed_at_the_leader_that_runs() {
    // It started while no leader ran (no upstream): n2 leads now.
    let mut o = obs(
        "n1",
        LocalPostgres::default(),
        Some(view(Some("n2"), healthy_three("n2"))),
    );
    o.job = Some(Job::Start);
    o.starting_standby = true;
    let steps = decide(&o, &settings(), Tick(0));
    assert_eq!(
        steps.iter().map(|s| &s.action).collect::<Vec<_>>(),
        vec![&Action::Follow {
            upstream: "n2".into()
        }]
    );
    assert!(
        steps[0].reason.contains("without an upstream"),
        "{}",
        steps[0].reason
    );
    // Already pointed at it: the start goes on.
    o.local.following = Some("n2".into());
    assert!(actions(&o, 0).is_empty());
    // It follows a member that no longer leads.
    o.local.following = Some("n3".into());
    let steps = decide(&o, &settings(), Tick(0));
    assert_eq!(
        steps.iter().map(|s| &s.action).collect::<Vec<_>>(),
        vec![&Action::Follow {
            upstream: "n2".into()
        }]
    );
    assert!(steps[0].reason.contains("not n3"), "{}", steps[0].reason);
    // The leader's Postgres is not up yet: nothing to stream from.
    let mut members = healthy_three("n2");
    members[1].state = "starting".into();
    assert_eq!(members[1].name, "n2");
    o.dcs = Some(view(Some("n2"), members));
    assert!(actions(&o, 0).is_empty());
    // A start of a primary, a stop or shutting down: left alone.
    o.dcs = Some(view(Some("n2"), healthy_three("n2")));
    o.starting_standby = false;
    assert!(actions(&o, 0).is_empty());
    o.starting_standby = true;
    o.shutting_down = true;
    assert!(actions(&o, 0).is_empty());
    o.shutting_down = false;
    o.job = Some(Job::Stop);
    assert!(actions(&o, 0).is_empty());
}

// ---------------------------------------------------------------------------
// Synchronous replication
// ---------------------------------------------------------------------------

fn set(members: &[&str], quorum: u32) -> SyncSet {
    SyncSet::new(members.iter().map(|m| m.to_string()).collect(), quorum)
}

fn streaming(name: &str, flush: u64) -> Replication {
    Replication {
        name: name.into(),
        state: "streaming".into(),
        flush_lsn: Lsn(flush),
    }
}

/// n1 leads with a running primary at LSN 1000, both replicas streaming.
fn sync_leader(mode: SyncMode, in_pg: SyncSet, claim: Option<SyncSet>) -> Observation {
    let mut v = view(Some("n1"), healthy_three("n1"));
    v.config.synchronous_mode = mode;
    v.sync = claim.map(|set| SyncKey {
        leader: "n1".into(),
        set,
    });
    let mut local = running(PgRole::Primary, 1, 1000);
    local.slots = vec!["n2".into(), "n3".into()];
    local.sync_standbys = Some(in_pg);
    local.replication = vec![streaming("n2", 1000), streaming("n3", 900)];
    let mut o = obs("n1", local, Some(v));
    o.leader_lease = Some(HeldLease {
        lease_id: 42,
        renewed_at: Tick(0),
    });
    o
}

fn sync_actions(o: &Observation) -> Vec<Action> {
    actions(o, 100)
        .into_iter()
        .filter(|a| !matches!(a, Action::RenewLeader { .. }))
        .collect()
}

#[test]
fn sync_set_claims_compose() {
    let a = set(&["n2"], 1);
    let b = set(&["n3"], 1);
    assert!(!b.implies(&a), "commits on n3 say nothing about n2");
    let both = a.weakest_of(&b);
    assert_eq!(both, set(&["n2", "n3"], 1));
    assert!(a.implies(&both) && b.implies(&both));
    assert!(set(&["n2", "n3"], 2).implies(&a));
    assert!(set(&["n2"], 1).implies(&SyncSet::none()));
    assert!(!set(&["*"], 1).implies(&a));
    for s in [
        set(&["n2"], 1),
        set(&["a b", "x\"y"], 2),
        SyncSet::none(),
        set(&["*"], 1),
    ] {
        assert_eq!(
            sync::parse_standby_names(&sync::standby_names(&s)),
            Some(s.clone())
        );
    }
    assert_eq!(
        sync::standby_names(&set(&["n2", "n3"], 1)),
        "ANY 1 (\"n2\", \"n3\")"
    );
    assert_eq!(sync::parse_standby_names("FIRST 1 (n2)"), None);
}

#[test]
fn sync_on_publishes_a_weaker_claim_before_waiting_for_a_standby() {
    // Asynchronous so far, no claim: publish "n2, claims nothing" first.
    let o = sync_leader(SyncMode::On, SyncSet::none(), None);
    assert_eq!(
        sync_actions(&o),
        vec![
            Action::PublishSync {
                set: set(&["n2"], 0)
            },
            Action::SetSyncStandbys {
                set: set(&["n2"], 1)
            },
        ]
    );
}

#[test]
fn sync_claim_strengthens_only_after_the_standby_flushed_past_the_mark() {
    let mut o = sync_leader(SyncMode::On, set(&["n2"], 1), Some(set(&["n2"], 0)));
    // Applied, but the settle time has not passed: no mark yet.
    o.sync_applied = Some(SyncApplied {
        set: set(&["n2"], 1),
        at: Tick(0),
        mark: None,
    });
    assert_eq!(sync_actions(&o), vec![]);
    o.sync_applied.as_mut().unwrap().mark = Some(Lsn(1200));
    assert_eq!(sync_actions(&o), vec![], "n2 flushed 1000 < mark 1200");
    o.local.replication[0].flush_lsn = Lsn(1200);
    assert_eq!(
        sync_actions(&o),
        vec![Action::PublishSync {
            set: set(&["n2"], 1)
        }]
    );
    // Unknown since when Postgres waits (agent restarted): apply again.
    o.sync_applied = None;
    assert_eq!(
        sync_actions(&o),
        vec![Action::SetSyncStandbys {
            set: set(&["n2"], 1)
        }]
    );
}

#[test]
fn sync_standby_lost_is_replaced_through_the_union_claim() {
    let mut o = sync_leader(SyncMode::On, set(&["n2"], 1), Some(set(&["n2"], 1)));
    o.local.replication.remove(0);
    assert_eq!(
        sync_actions(&o),
        vec![
            Action::PublishSync {
                set: set(&["n2", "n3"], 1)
            },
            Action::SetSyncStandbys {
                set: set(&["n3"], 1)
            },
        ]
    );
}

#[test]
fn sync_on_falls_back_strict_keeps_waiting_quorum_waits_for_any() {
    let mut o = sync_leader(SyncMode::On, set(&["n2"], 1), Some(set(&["n2"], 1)));
    o.local.replication.clear();
    assert_eq!(
        sync_actions(&o),
        vec![
            Action::PublishSync {
                set: set(&["n2"], 0)
            },
            Action::SetSyncStandbys {
                set: SyncSet::none()
            },
        ]
    );
    let mut strict = sync_leader(SyncMode::Strict, set(&["n2"], 1), Some(set(&["n2"], 1)));
    strict.local.replication.clear();
    assert_eq!(
        sync_actions(&strict),
        vec![],
        "strict: commits keep waiting"
    );
    let quorum = sync_leader(SyncMode::Quorum, SyncSet::none(), None);
    assert_eq!(
        sync_actions(&quorum),
        vec![
            Action::PublishSync {
                set: set(&["n2", "n3"], 0)
            },
            Action::SetSyncStandbys {
                set: set(&["n2", "n3"], 1)
            },
        ]
    );
    // nosync members are never chosen.
    let mut nosync = sync_leader(SyncMode::On, SyncSet::none(), None);
    nosync.dcs.as_mut().unwrap().members[1].nosync = true;
    assert_eq!(
        sync_actions(&nosync),
        vec![
            Action::PublishSync {
                set: set(&["n3"], 0)
            },
            Action::SetSyncStandbys {
                set: set(&["n3"], 1)
            },
        ]
    );
}

#[test]
fn sync_mode_off_stops_waiting_before_withdrawing_the_claim() {
    let o = sync_leader(SyncMode::Off, set(&["n2"], 1), Some(set(&["n2"], 1)));
    assert_eq!(
        sync_actions(&o),
        vec![Action::SetSyncStandbys {
            set: SyncSet::none()
        }]
    );
    let o = sync_leader(SyncMode::Off, SyncSet::none(), Some(set(&["n2"], 1)));
    assert_eq!(sync_actions(&o), vec![Action::DeleteSync]);
}

/// No leader; n1 was the primary; n2 and n3 are replicas with live answers.
fn sync_election(me: &str, claim: SyncSet, positions: &[(&str, u64)]) -> Observation {
    let mut v = view(None, replicas(&[("n2", 1, 1000), ("n3", 1, 1000)]));
    v.config.synchronous_mode = SyncMode::On;
    v.sync = Some(SyncKey {
        leader: "n1".into(),
        set: claim,
    });
    let my_lsn = positions.iter().find(|p| p.0 == me).unwrap().1;
    let mut o = obs(me, running(PgRole::Replica, 1, my_lsn), Some(v));
    o.peers = Some(
        positions
            .iter()
            .filter(|p| p.0 != me)
            .map(|(n, l)| PeerPosition {
                name: n.to_string(),
                timeline: Some(1),
                lsn: Lsn(*l),
                replay_lsn: Lsn(*l),
                saw_no_leader: true,
                replay_paused: false,
            })
            .collect(),
    );
    o
}

#[test]
fn only_a_member_of_the_published_set_is_promoted() {
    // n3 is further ahead but only n2 is synchronous.
    let claim = set(&["n2"], 1);
    let n2 = sync_election("n2", claim.clone(), &[("n2", 1000), ("n3", 2000)]);
    assert_eq!(actions(&n2, 0), vec![Action::AcquireLeader]);
    let n3 = sync_election("n3", claim, &[("n2", 1000), ("n3", 2000)]);
    assert_eq!(actions(&n3, 0), vec![]);
    assert!(decide::candidacy(&n3, n3.dcs.as_ref().unwrap(), Tick(0))
        .unwrap_err()
        .contains("not in the synchronous set"));
    // A claim of nothing (fallback) promotes nobody automatically...
    let none = sync_election("n2", set(&["n2"], 0), &[("n2", 1000), ("n3", 1000)]);
    assert_eq!(actions(&none, 0), vec![]);
    // ...but the leader that published it, back as a replica, may lead again.
    let mut former = sync_election("n2", set(&["n3"], 0), &[("n2", 1000), ("n3", 1000)]);
    former.dcs.as_mut().unwrap().sync.as_mut().unwrap().leader = "n2".into();
    assert_eq!(actions(&former, 0), vec![Action::AcquireLeader]);
}

#[test]
fn quorum_promotion_needs_enough_members_to_prove_it() {
    // ANY 1 (n2, n3): a candidate must see both (3 - ... = 2 members).
    let claim = set(&["n2", "n3"], 1);
    let mut alone = sync_election("n2", claim.clone(), &[("n2", 1000), ("n3", 900)]);
    alone.peers = Some(vec![]);
    assert_eq!(actions(&alone, 0), vec![]);
    assert!(
        decide::candidacy(&alone, alone.dcs.as_ref().unwrap(), Tick(0))
            .unwrap_err()
            .contains("sees 1 of the 2")
    );
    let both = sync_election("n2", claim.clone(), &[("n2", 1000), ("n3", 900)]);
    assert_eq!(actions(&both, 0), vec![Action::AcquireLeader]);
    // n3's answer predates its noticing the leader gone: it proves nothing.
    let mut early = both.clone();
    early.peers.as_mut().unwrap()[0].saw_no_leader = false;
    assert_eq!(actions(&early, 0), vec![]);
    let behind = sync_election("n3", claim, &[("n2", 1000), ("n3", 900)]);
    assert_eq!(actions(&behind, 0), vec![]);
    // Without live answers nothing is proven.
    let mut blind = sync_election("n2", set(&["n2"], 1), &[("n2", 1000), ("n3", 900)]);
    blind.peers = None;
    assert_eq!(actions(&blind, 0), vec![]);
}

#[test]
fn new_leader_publishes_its_empty_claim_before_promoting() {
    let mut v = view(Some("n2"), replicas(&[("n2", 1, 1000), ("n3", 1, 1000)]));
    v.config.synchronous_mode = SyncMode::Strict;
    v.sync = Some(SyncKey {
        leader: "n1".into(),
        set: set(&["n2"], 1),
    });
    let mut local = running(PgRole::Replica, 1, 1000);
    local.slots = vec!["n3".into()];
    local.sync_standbys = Some(SyncSet::none());
    let o = obs("n2", local, Some(v));
    assert_eq!(
        sync_actions(&o),
        vec![
            Action::PublishSync {
                set: SyncSet::none()
            },
            Action::SetSyncStandbys {
                set: set(&["n3"], 1)
            },
            Action::ReserveTimeline { timeline: 2 },
            Action::Promote { timeline: 2 },
        ]
    );
}

#[test]
fn a_replica_that_confirmed_the_leader_in_failsafe_or_sees_a_live_primary_does_not_run() {
    let v = view(None, replicas(&[("n2", 1, 1000), ("n3", 1, 900)]));
    let mut o = obs("n2", running(PgRole::Replica, 1, 1000), Some(v));
    o.peers = Some(vec![]);
    assert_eq!(actions(&o, 5_000), vec![Action::AcquireLeader]);
    o.failsafe_promise_until = Some(Tick(6_000));
    assert_eq!(actions(&o, 5_000), vec![], "promised until 6 s");
    assert_eq!(actions(&o, 6_000), vec![Action::AcquireLeader]);
    o.live_primary = Some("n1".into());
    assert_eq!(actions(&o, 6_000), vec![], "n1 still runs a primary");
}

fn arb_local() -> impl Strategy<Value = LocalPostgres> {
    (
        any::<bool>(),
        prop::option::of(prop_oneof![Just(PgRole::Primary), Just(PgRole::Replica)]),
        1u32..4,
        0u64..5000,
        prop::option::of("n[1-3]"),
    )
        .prop_map(|(running, role, tl, lsn, following)| LocalPostgres {
            running,
            role: if running { role } else { None },
            timeline: Some(tl),
            wal_position: Some(Lsn(lsn)),
            receive_lsn: Some(Lsn(lsn)),
            replay_lsn: Some(Lsn(lsn)),
            following,
            ..Default::default()
        })
}

fn arb_obs() -> impl Strategy<Value = (Observation, u64)> {
    (
        "n[1-3]",
        arb_local(),
        prop::option::of((
            prop::option::of("n[1-3]"),
            prop::option::of(prop::option::of(prop_oneof![Just(SYSID), Just(SYSID + 1)])),
            "n[1-3]",
        )),
        prop_oneof![
            Just(DataDir::Empty),
            Just(DataDir::Unusable),
            Just(DataDir::Initialized {
                system_identifier: SYSID
            }),
            Just(DataDir::Initialized {
                system_identifier: SYSID + 1
            })
        ],
        prop::option::of(0u64..20_000),
        0u64..40_000,
        any::<bool>(),
    )
        .prop_map(|(node, local, dcs, data_dir, renewed, now, rewind)| {
            let dcs = dcs.map(|(leader, init, init_node)| {
                let mut v = view(
                    leader.as_deref(),
                    healthy_three(leader.as_deref().unwrap_or("n1")),
                );
                v.initialize = init.map(|sysid| InitializeKey {
                    node: init_node,
                    system_identifier: sysid,
                });
                v
            });
            let mut o = obs(&node, local, dcs);
            o.data_dir = data_dir;
            o.leader_lease = renewed.map(|t| HeldLease {
                lease_id: 42,
                renewed_at: Tick(t),
            });
            o.needs_rewind = rewind;
            // An unfinished rewind on about a third of the observations.
            o.rewind_pending = now % 3 == 0;
            (o, now)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 20_000, ..ProptestConfig::default() })]

    #[test]
    fn never_promotes_or_starts_primary_without_holding_the_key((o, now) in arb_obs()) {
        let holds = o.dcs.as_ref().and_then(|d| d.leader.as_ref()).is_some_and(|l| l.name == o.node);
        for a in actions(&o, now) {
            if matches!(a, Action::Promote { .. } | Action::StartPrimary) {
                prop_assert!(holds, "{a:?} without the key: {o:?}");
            }
            if a == Action::StartPrimary {
                prop_assert!(o.last_role != Some(PgRole::Replica), "a standby's data directory started as primary: {o:?}");
            }
        }
    }

    #[test]
    fn never_starts_a_data_directory_with_an_unfinished_rewind((o, now) in arb_obs()) {
        // (The agent reads the marker only while Postgres is down.)
        if o.rewind_pending && !o.local.running {
            for a in actions(&o, now) {
                prop_assert!(
                    !matches!(a, Action::StartPrimary | Action::StartReplica { .. } | Action::AcquireLeader),
                    "{a:?} with an unfinished rewind: {o:?}"
                );
            }
        }
    }

    #[test]
    fn never_keeps_a_writable_primary_past_the_fencing_deadline((o, now) in arb_obs()) {
        let past = o.leader_lease.is_some_and(|l| Tick(now) >= settings().fencing_deadline(l.renewed_at));
        let primary = o.local.running && o.local.role == Some(PgRole::Primary);
        if past && primary {
            prop_assert_eq!(actions(&o, now), vec![Action::Stop { then_rewind: false }]);
        }
    }

    #[test]
    fn never_writes_into_a_data_directory_that_is_not_empty((o, now) in arb_obs()) {
        for a in actions(&o, now) {
            if matches!(a, Action::InitDb | Action::Clone { .. }) {
                prop_assert_eq!(o.data_dir, DataDir::Empty);
            }
            if matches!(a, Action::Rewind { .. } | Action::StartPrimary | Action::StartReplica { .. }) {
                let cluster = o.dcs.as_ref().and_then(|d| d.initialize.as_ref()).and_then(|i| i.system_identifier);
                prop_assert_eq!(o.data_dir, DataDir::Initialized { system_identifier: cluster.expect("initialized cluster") });
            }
        }
    }

    #[test]
    fn a_primary_without_etcd_and_without_lease_never_stays_writable((o, now) in arb_obs()) {
        let mut o = o;
        o.dcs = None;
        o.leader_lease = None;
        if o.local.running && o.local.role == Some(PgRole::Primary) {
            prop_assert_eq!(actions(&o, now), vec![Action::Stop { then_rewind: false }]);
        }
    }
}

// ---------------------------------------------------------------------------
// The router's route
// ---------------------------------------------------------------------------

#[test]
fn the_route_names_the_running_leader_and_streaming_replicas_within_lag() {
    let o = obs(
        "n2",
        running(PgRole::Replica, 1, 1000),
        Some(view(Some("n1"), healthy_three("n1"))),
    );
    let r = route(&o, &read_at(500), 2_000);
    assert_eq!(r.primary.as_deref(), Some("n1"));
    assert_eq!(r.replicas, vec!["n2".to_string(), "n3".to_string()]);
    assert_eq!(
        r.valid_until,
        Some(Tick(2_500)),
        "a fence window from the read"
    );

    // A replica too far behind, or tagged noloadbalance, takes no reads.
    let mut members = healthy_three("n1");
    members[1].receive_lsn = Some(Lsn(0));
    members[1].replay_lsn = Some(Lsn(0));
    members[1].wal_position = Some(Lsn(0));
    let mut v = view(Some("n1"), members.clone());
    v.config.maximum_lag_on_failover = 500;
    let mut o2 = o.clone();
    o2.dcs = Some(v);
    assert_eq!(
        route(&o2, &read_at(0), 2_000).replicas,
        vec!["n3".to_string()]
    );
    members[1] = healthy_three("n1")[1].clone();
    members[2].noloadbalance = true;
    o2.dcs = Some(view(Some("n1"), members));
    assert_eq!(
        route(&o2, &read_at(0), 2_000).replicas,
        vec!["n2".to_string()]
    );
}

#[test]
fn no_route_without_a_view_a_leader_or_a_running_primary() {
    let mut o = obs("n2", running(PgRole::Replica, 1, 1000), None);
    assert_eq!(route(&o, &read_at(0), 2_000), RouteChoice::default());
    o.dcs = Some(view(None, healthy_three("n1")));
    assert_eq!(route(&o, &read_at(0), 2_000).primary, None);
    // The leader's Postgres is not up (yet): hold new connections.
    let mut members = healthy_three("n1");
    members[0].state = "starting".into();
    o.dcs = Some(view(Some("n1"), members));
    assert_eq!(route(&o, &read_at(0), 2_000).primary, None);
}

#[test]
fn the_leaders_own_route_lasts_until_its_fencing_deadline_and_follows_its_probe() {
    // Our lease was renewed at 0: the fence guard stops us at the window.
    let mut o = obs(
        "n1",
        running(PgRole::Primary, 1, 1000),
        Some(view(Some("n1"), healthy_three("n1"))),
    );
    let r = route(&o, &read_at(700), 2_000);
    assert_eq!(r.primary.as_deref(), Some("n1"));
    assert_eq!(r.valid_until, Some(Tick(2_000)));
    // Promoted this pass, the member key not yet republished: the probe counts.
    let mut members = healthy_three("n1");
    members[0].role = MemberRole::Replica;
    members[0].state = "streaming".into();
    o.dcs = Some(view(Some("n1"), members));
    assert_eq!(
        route(&o, &read_at(700), 2_000).primary.as_deref(),
        Some("n1")
    );
    // Our Postgres is still a replica: nothing takes writes yet.
    o.local = running(PgRole::Replica, 1, 1000);
    assert_eq!(route(&o, &read_at(700), 2_000).primary, None);
    // A key under a lease we do not hold: no validity of ours.
    o.local = running(PgRole::Primary, 1, 1000);
    o.leader_lease = None;
    assert_eq!(route(&o, &read_at(700), 2_000).valid_until, None);
}

/// HA memory whose last etcd view was read at `sent`.
fn read_at(sent: u64) -> Memory {
    let mut memory = Memory::default();
    memory.last_view_at = Tick(sent);
    memory
}

#[test]
fn a_failed_read_keeps_the_last_views_route_until_it_runs_out() {
    // Read at 500; this pass's read failed (no view in the observation).
    let seen = view(Some("n1"), healthy_three("n1"));
    let mut memory = read_at(500);
    memory.last_view = Some(seen);
    let o = obs("n2", running(PgRole::Replica, 1, 1000), None);
    let r = route(&o, &memory, 2_000);
    assert_eq!(r.primary.as_deref(), Some("n1"), "a hiccup drops nothing");
    assert_eq!(r.valid_until, Some(Tick(2_500)), "still from the last read");

    // The leader cut off from etcd: its route follows its own lease, which
    // failsafe confirmations renew, so they keep its clients connected.
    let mut o = obs(
        "n1",
        running(PgRole::Primary, 1, 1000),
        Some(view(Some("n1"), healthy_three("n1"))),
    );
    memory.last_view = o.dcs.take();
    let before = route(&o, &memory, 2_000).valid_until;
    o.leader_lease.as_mut().expect("leader lease").renewed_at = Tick(3_000);
    let after = route(&o, &memory, 2_000);
    assert_eq!(after.primary.as_deref(), Some("n1"));
    assert_eq!(before, Some(Tick(2_000)));
    assert_eq!(after.valid_until, Some(Tick(5_000)));
}

#[test]
fn a_leader_that_began_to_stop_routes_no_new_connection_to_itself() {
    let mut o = obs(
        "n1",
        running(PgRole::Primary, 1, 1000),
        Some(view(Some("n1"), healthy_three("n1"))),
    );
    let mut memory = read_at(0);
    assert_eq!(route(&o, &memory, 2_000).primary.as_deref(), Some("n1"));
    // A plain stop (its job runs, Postgres still up).
    o.job = Some(Job::Stop);
    assert_eq!(route(&o, &memory, 2_000).primary, None);
    // A handover: from HandoverStop on, before the checkpoint ends.
    o.job = None;
    memory.handover = Some(Handover {
        since: Tick(0),
        to: "n2".into(),
        force: false,
    });
    assert_eq!(route(&o, &memory, 2_000).primary, None);
    // The other nodes see its member key say so.
    let mut members = healthy_three("n1");
    members[0].state = "stopping".into();
    let o2 = obs(
        "n2",
        running(PgRole::Replica, 1, 1000),
        Some(view(Some("n1"), members)),
    );
    assert_eq!(route(&o2, &read_at(0), 2_000).primary, None);
}
