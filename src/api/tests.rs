//! Routing, rendering and binding, on hand-made snapshots.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use proptest::prelude::*;
use serde_json::Value;

use super::routes::{parse_query, LagMode, PROMETHEUS_TEXT};
use super::*;
use crate::dcs::HistoryEntry;
use crate::ha::{DynamicConfig, Lsn, MemberRole, MemberStatus};
use crate::snapshot::{LoopHistogram, Snapshot, Transition};

const TTL: Duration = Duration::from_secs(10);
const FRESH: Duration = Duration::from_millis(300);

/// Built through serde, so fields other modules add with a default need no change here.
fn member(name: &str, role: MemberRole, state: &str, wal: u64) -> MemberStatus {
    let replica = role == MemberRole::Replica;
    serde_json::from_value(serde_json::json!({
        "name": name,
        "role": role,
        "state": state,
        "timeline": 1,
        "wal_position": wal,
        "receive_lsn": replica.then_some(wal),
        "replay_lsn": replica.then_some(wal),
        "pg_host": "127.0.0.1",
        "pg_port": 5432,
        "api_url": format!("http://{name}:8008"),
        "failover_priority": 1,
        "tags": {"zone": "a"},
        "updated_at_ms": 0,
        "version": "0.1.0",
    }))
    .expect("member status")
}

/// A three-member cluster (n1 leads) as `me` sees it.
fn cluster(me: &str) -> Snapshot {
    let members = vec![
        member("n1", MemberRole::Primary, "running", 10_000),
        member("n2", MemberRole::Replica, "streaming", 10_000),
        member("n3", MemberRole::Replica, "streaming", 9_000),
    ];
    let mine = members
        .iter()
        .find(|m| m.name == me)
        .expect("member")
        .clone();
    let leads = me == "n1";
    Snapshot {
        taken_at: Instant::now(),
        scope: "demo".into(),
        me: mine,
        leader: Some("n1".into()),
        leader_revision: Some(42),
        members,
        history: vec![HistoryEntry {
            kind: "failover".into(),
            timeline: Some(2),
            lsn: Some(Lsn(100)),
            at_ms: 1,
            old_leader: Some("n0".into()),
            new_leader: "n1".into(),
            reason: "leader key expired".into(),
        }],
        config: Some(DynamicConfig::default()),
        dcs_reachable: true,
        dcs_last_seen: Some(Instant::now()),
        lease_remaining: leads.then_some(Duration::from_secs(9)),
        fencing_remaining: leads.then_some(Duration::from_secs(7)),
        pending_restart: false,
        paused: false,
        sync: None,
        sync_standbys: None,
        switchover: None,
        promotions: 0,
        loop_durations: LoopHistogram::default(),
        last_error: None,
        route: None,
        transition: None,
    }
}

/// Sets `me` in both places a snapshot has it.
fn edit_me(s: &mut Snapshot, f: impl Fn(&mut MemberStatus)) {
    f(&mut s.me);
    let name = s.me.name.clone();
    if let Some(m) = s.members.iter_mut().find(|m| m.name == name) {
        f(m);
    }
}

fn ask_at(s: &Snapshot, age: Duration, method: Method, target: &str) -> Reply {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let r = Rendered::new(Arc::new(s.clone()));
    route(&r, age, TTL, &Live::default(), &method, path, query)
}

fn get(s: &Snapshot, target: &str) -> Reply {
    ask_at(s, FRESH, Method::GET, target)
}

fn code(s: &Snapshot, target: &str) -> u16 {
    get(s, target).status.as_u16()
}

fn json(reply: &Reply) -> Value {
    serde_json::from_slice(&reply.body).unwrap_or_else(|e| panic!("{e}: {:?}", reply.body))
}

const PRIMARY_PATHS: [&str; 4] = ["/", "/primary", "/read-write", "/master"];

#[test]
fn the_leader_passes_the_primary_checks_and_fails_the_replica_checks() {
    let s = cluster("n1");
    for path in PRIMARY_PATHS.iter().chain(&[
        "/leader",
        "/read-only",
        "/health",
        "/liveness",
        "/readiness",
    ]) {
        assert_eq!(code(&s, path), 200, "{path}");
    }
    for path in [
        "/replica",
        "/standby-leader",
        "/standby_leader",
        "/sync",
        "/synchronous",
        "/async",
        "/asynchronous",
    ] {
        assert_eq!(code(&s, path), 503, "{path}");
    }
}

#[test]
fn a_streaming_replica_passes_the_replica_checks_and_fails_the_primary_checks() {
    let s = cluster("n2");
    for path in [
        "/replica",
        "/read-only",
        "/async",
        "/asynchronous",
        "/health",
        "/liveness",
        "/readiness",
    ] {
        assert_eq!(code(&s, path), 200, "{path}");
    }
    for path in PRIMARY_PATHS
        .iter()
        .chain(&["/leader", "/standby-leader", "/sync", "/synchronous"])
    {
        assert_eq!(code(&s, path), 503, "{path}");
    }
}

#[test]
fn status_endpoints_answer_200_whatever_the_role() {
    for me in ["n1", "n2"] {
        let s = cluster(me);
        for path in [
            "/status", "/patroni", "/cluster", "/history", "/config", "/metrics",
        ] {
            assert_eq!(code(&s, path), 200, "{me} {path}");
        }
    }
}

#[test]
fn a_stale_snapshot_fails_every_health_check_but_still_reports() {
    for me in ["n1", "n2"] {
        let s = cluster(me);
        let stale = TTL + Duration::from_millis(1);
        for path in PRIMARY_PATHS.iter().chain(&[
            "/leader",
            "/replica",
            "/read-only",
            "/async",
            "/health",
            "/liveness",
            "/readiness",
        ]) {
            assert_eq!(
                ask_at(&s, stale, Method::GET, path).status,
                503,
                "{me} {path}"
            );
        }
        let status = ask_at(&s, stale, Method::GET, "/status");
        assert_eq!(status.status, 200);
        assert_eq!(json(&status)["snapshot_age_ms"], 10_001);
        assert_eq!(
            ask_at(&s, TTL, Method::GET, "/health").status,
            200,
            "{me}: the threshold itself is fresh"
        );
    }
}

#[test]
fn a_leader_past_its_fencing_deadline_is_no_primary() {
    let s = cluster("n1");
    // The snapshot said 7 s to the deadline; 8 s later it has passed.
    let late = Duration::from_secs(8);
    assert_eq!(ask_at(&s, late, Method::GET, "/primary").status, 503);
    assert_eq!(
        ask_at(&s, late, Method::GET, "/leader").status,
        200,
        "the lease itself still runs"
    );
    let mut s = cluster("n1");
    s.lease_remaining = None;
    s.fencing_remaining = None;
    assert_eq!(
        code(&s, "/primary"),
        503,
        "the key names us but we hold no lease"
    );
    assert_eq!(code(&s, "/leader"), 503);
}

/// The role checks of `me`'s snapshot with `transition` under way:
/// (leader, primary, replica, running).
fn checks(me: &str, transition: Option<Transition>) -> (bool, bool, bool, bool) {
    let mut s = cluster(me);
    s.transition = transition;
    let h = health::Health::of(&s, FRESH, TTL);
    (h.leader, h.primary, h.replica, h.running)
}

#[test]
fn a_role_change_under_way_fails_the_checks_of_the_role_being_left() {
    use Transition::*;
    let table = [
        // The primary's own checks go before its Postgres changes.
        ("n1", None, (true, true, false, true)),
        ("n1", Some(SteppingDown), (false, false, false, true)),
        ("n1", Some(Stopping), (false, false, false, true)),
        // A replica being promoted is no replica, and no primary yet.
        ("n2", None, (false, false, true, true)),
        ("n2", Some(Promoting), (false, false, false, true)),
        ("n2", Some(Stopping), (false, false, false, true)),
        ("n2", Some(SteppingDown), (false, false, true, true)),
    ];
    for (me, transition, want) in table {
        assert_eq!(checks(me, transition), want, "{me} {transition:?}");
    }
}

#[test]
fn a_primary_stepping_down_answers_503_on_every_writer_path_while_postgres_still_runs() {
    for transition in [Transition::SteppingDown, Transition::Stopping] {
        let mut s = cluster("n1");
        s.transition = Some(transition);
        for path in PRIMARY_PATHS
            .iter()
            .chain(&["/leader", "/read-only", "/readiness", "/replica"])
        {
            assert_eq!(code(&s, path), 503, "{transition:?} {path}");
        }
        assert_eq!(code(&s, "/health"), 200, "{transition:?}: Postgres runs");
        assert_eq!(code(&s, "/liveness"), 200);
    }
}

#[test]
fn a_replica_being_promoted_answers_503_on_replica_paths_and_is_no_primary_yet() {
    let mut s = cluster("n2");
    // It holds the key already: the promotion step runs under it.
    s.leader = Some("n2".into());
    s.lease_remaining = Some(Duration::from_secs(9));
    s.fencing_remaining = Some(Duration::from_secs(7));
    s.transition = Some(Transition::Promoting);
    for path in
        PRIMARY_PATHS
            .iter()
            .chain(&["/replica", "/read-only", "/async", "/sync", "/readiness"])
    {
        assert_eq!(code(&s, path), 503, "{path}");
    }
    assert_eq!(code(&s, "/leader"), 200);
    assert_eq!(code(&s, "/health"), 200);
    // What the agent publishes once the promotion is confirmed.
    s.transition = None;
    edit_me(&mut s, |m| {
        m.role = MemberRole::Primary;
        m.state = "running".into();
    });
    for path in PRIMARY_PATHS.iter().chain(&["/leader", "/read-only"]) {
        assert_eq!(code(&s, path), 200, "promoted: {path}");
    }
    assert_eq!(code(&s, "/replica"), 503);
}

#[test]
fn a_transition_shows_in_the_role_metrics_too() {
    let mut s = cluster("n1");
    s.transition = Some(Transition::SteppingDown);
    let text = String::from_utf8(get(&s, "/metrics").body.to_vec()).unwrap();
    assert!(
        text.contains("pgha_primary{scope=\"demo\",name=\"n1\"} 0\n"),
        "{text}"
    );
}

#[test]
fn a_primary_that_is_not_running_fails_primary_but_keeps_leader() {
    let mut s = cluster("n1");
    edit_me(&mut s, |m| m.state = "stopped".into());
    assert_eq!(code(&s, "/primary"), 503);
    assert_eq!(code(&s, "/health"), 503);
    assert_eq!(code(&s, "/leader"), 200);
    assert_eq!(code(&s, "/liveness"), 200);
}

#[test]
fn a_replica_that_runs_without_streaming_is_a_replica_but_not_ready() {
    let mut s = cluster("n2");
    edit_me(&mut s, |m| m.state = "running".into());
    assert_eq!(code(&s, "/replica"), 200);
    assert_eq!(code(&s, "/replica?replication_state=streaming"), 503);
    assert_eq!(code(&s, "/readiness"), 503);
    assert_eq!(code(&s, "/health"), 200);
}

#[test]
fn noloadbalance_removes_a_replica_from_replica_and_read_only_only() {
    let mut s = cluster("n2");
    edit_me(&mut s, |m| m.noloadbalance = true);
    assert_eq!(code(&s, "/replica"), 503);
    assert_eq!(code(&s, "/read-only"), 503);
    assert_eq!(code(&s, "/async"), 200);
    assert_eq!(code(&s, "/health"), 200);
    assert_eq!(code(&s, "/readiness"), 200);
}

#[test]
fn replica_lag_filters_measure_replay_by_default_and_receive_with_mode_write() {
    // n3 received and replayed 1000 bytes less than the leader published.
    let s = cluster("n3");
    assert_eq!(code(&s, "/replica?lag=0"), 503);
    assert_eq!(code(&s, "/replica?lag=999"), 503);
    assert_eq!(code(&s, "/replica?lag=1000"), 200);
    assert_eq!(code(&s, "/replica?lag=1kB"), 200);
    assert_eq!(code(&s, "/replica?lag=16MB"), 200);
    assert_eq!(code(&s, "/replica?lag=16%20MB"), 200);
    assert_eq!(code(&s, "/replica?lag=16+MB"), 200);
    assert_eq!(code(&s, "/read-only?lag=0"), 503);
    assert_eq!(code(&s, "/async?lag=0"), 503);

    // Replay paused: received everything, replayed nothing new.
    let mut s = cluster("n2");
    edit_me(&mut s, |m| m.replay_lsn = Some(Lsn(4_000)));
    assert_eq!(code(&s, "/replica?lag=0"), 503);
    assert_eq!(code(&s, "/replica?lag=0&mode=write"), 200);
    assert_eq!(code(&s, "/replica?lag=6000"), 200);
    assert_eq!(code(&s, "/replica"), 200);
    let cluster_doc = json(&get(&s, "/cluster"));
    let n2 = &cluster_doc["members"][1];
    assert_eq!(
        (n2["lag_bytes"].as_u64(), n2["replay_lag_bytes"].as_u64()),
        (Some(0), Some(6_000))
    );
}

#[test]
fn a_replica_without_a_known_leader_position_fails_any_lag_filter() {
    let mut s = cluster("n2");
    s.leader = None;
    assert_eq!(code(&s, "/replica"), 200);
    assert_eq!(code(&s, "/replica?lag=1GB"), 503);
}

#[test]
fn readiness_of_a_replica_uses_maximum_lag_on_failover() {
    let mut s = cluster("n3");
    s.config = Some(DynamicConfig {
        maximum_lag_on_failover: 999,
        ..DynamicConfig::default()
    });
    assert_eq!(code(&s, "/readiness"), 503);
    assert_eq!(code(&s, "/readiness?lag=1000"), 200, "an explicit lag wins");
    s.config = Some(DynamicConfig {
        maximum_lag_on_failover: 1000,
        ..DynamicConfig::default()
    });
    assert_eq!(code(&s, "/readiness"), 200);
    s.config = None;
    assert_eq!(
        code(&s, "/readiness"),
        200,
        "the default (1 MiB) before the config is read"
    );
}

#[test]
fn tag_filters_compare_free_tags_and_the_builtin_ones() {
    let s = cluster("n2");
    assert_eq!(code(&s, "/replica?tag_zone=a"), 200);
    assert_eq!(code(&s, "/replica?tag_zone=b"), 503);
    assert_eq!(code(&s, "/replica?tag_rack=a"), 503);
    assert_eq!(code(&s, "/replica?tag_nofailover=false&tag_zone=a"), 200);
    assert_eq!(code(&s, "/replica?tag_nofailover=true"), 503);
    let primary = cluster("n1");
    assert_eq!(code(&primary, "/read-only?tag_zone=a"), 200);
    assert_eq!(code(&primary, "/read-only?tag_zone=b"), 503);
}

#[test]
fn head_and_options_answer_the_status_without_a_body() {
    for (me, path, want) in [
        ("n1", "/primary", 200),
        ("n2", "/primary", 503),
        ("n2", "/metrics", 200),
    ] {
        let s = cluster(me);
        for method in [Method::HEAD, Method::OPTIONS] {
            let r = ask_at(&s, FRESH, method.clone(), path);
            assert_eq!(r.status, want, "{me} {method} {path}");
            assert!(r.body.is_empty(), "{me} {method} {path}");
            assert_eq!(r.allow, method == Method::OPTIONS);
        }
    }
}

#[test]
fn health_bodies_are_this_nodes_status_even_on_503() {
    let s = cluster("n2");
    let r = get(&s, "/primary");
    assert_eq!(r.status, 503);
    let v = json(&r);
    assert_eq!(v["name"], "n2");
    assert_eq!(v["role"], "replica");
    assert_eq!(v["state"], "streaming");
    assert_eq!(v["replication_state"], "streaming");
    assert_eq!(v["cluster_leader"], "n1");
    assert_eq!(v["leader"], false);
    assert_eq!(v["scope"], "demo");
    assert_eq!(v["patroni"]["scope"], "demo");
    assert_eq!(v["xlog"]["replayed_location"], 10_000);
    assert_eq!(v["snapshot_age_ms"], 300);
    assert_eq!(get(&s, "/status").body, r.body);
}

#[test]
fn status_counts_the_lease_down_from_the_snapshot_to_the_answer() {
    // The leader's snapshot said 9 s of lease and 7 s to the fencing
    // deadline; the answer comes 300 ms later.
    let v = json(&get(&cluster("n1"), "/status"));
    assert_eq!(v["snapshot_age_ms"], 300);
    assert_eq!(v["lease_remaining_ms"], 8_700);
    assert_eq!(v["fencing_remaining_ms"], 6_700);
    let v = json(&get(&cluster("n2"), "/status"));
    assert!(v["lease_remaining_ms"].is_null() && v["fencing_remaining_ms"].is_null());
}

#[test]
fn cluster_history_and_config_are_their_documents() {
    let s = cluster("n1");
    let c = json(&get(&s, "/cluster"));
    assert_eq!(c["leader"], "n1");
    assert_eq!(c["term"], 42);
    let names: Vec<&str> = c["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["n1", "n2", "n3"]);
    assert_eq!(c["members"][2]["lag_bytes"], 1_000);
    assert_eq!(c["members"][0]["role"], "primary");
    assert_eq!(c["members"][0]["leader"], true);
    let h = json(&get(&s, "/history"));
    assert_eq!(h[0]["kind"], "failover");
    assert_eq!(h[0]["new_leader"], "n1");
    let cfg = json(&get(&s, "/config"));
    assert_eq!(cfg["maximum_lag_on_failover"], 1024 * 1024);
    assert_eq!(c["dcs_reachable"], true);
    let mut s = s;
    s.config = None;
    assert_eq!(code(&s, "/config"), 503);
    // Cut off from etcd, a node still answers, and says its view is old.
    s.dcs_reachable = false;
    assert_eq!(json(&get(&s, "/cluster"))["dcs_reachable"], false);
}

#[test]
fn ipv6_literal_hosts_are_printed_in_brackets() {
    let mut s = cluster("n2");
    s.members[1].pg_host = "fdaa:0:c037::2".into();
    s.members[1].api_url = "http://[fdaa:0:c037::2]:8008".into();
    s.me = s.members[1].clone();
    s.members[2].pg_host = "n3.internal".into();
    let c = json(&get(&s, "/cluster"));
    assert_eq!(c["members"][1]["host"], "[fdaa:0:c037::2]:5432");
    assert_eq!(c["members"][1]["pg_host"], "fdaa:0:c037::2");
    assert_eq!(c["members"][1]["api_url"], "http://[fdaa:0:c037::2]:8008");
    assert_eq!(c["members"][2]["host"], "n3.internal:5432");
    assert_eq!(c["members"][0]["host"], "127.0.0.1:5432");
    let status = json(&get(&s, "/status"));
    assert_eq!(status["host"], "[fdaa:0:c037::2]:5432");
}

#[test]
fn unknown_paths_wrong_methods_and_bad_queries_are_refused_with_a_reason() {
    let s = cluster("n1");
    for path in ["/nope", "/primary/", "//primary", "/Primary", ""] {
        let r = get(&s, path);
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{path:?}");
        assert!(json(&r)["error"]
            .as_str()
            .unwrap()
            .contains("no such endpoint"));
    }
    for method in [
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
        Method::TRACE,
        Method::CONNECT,
    ] {
        let r = ask_at(&s, FRESH, method.clone(), "/primary");
        assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{method}");
        assert!(r.allow, "{method}: Allow header");
    }
    assert_eq!(
        ask_at(&s, FRESH, Method::POST, "/nope").status,
        404,
        "an unknown path is 404 whatever the method"
    );
    for query in [
        "lag=abc",
        "lag=",
        "lag",
        "lag=-1",
        "lag=99999999999TB",
        "mode=sideways",
        "tag_zone",
        "lag=%zz",
        "x=%4",
        "x=%ff",
    ] {
        let r = get(&s, &format!("/replica?{query}"));
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{query}");
        assert!(!json(&r)["error"].as_str().unwrap().is_empty());
    }
    assert_eq!(
        code(&s, "/primary?lb=haproxy&&x"),
        200,
        "unknown parameters are ignored"
    );
}

#[test]
fn queries_decode_escapes_and_collect_filters() {
    let f = parse_query(
        "lag=16%20MB&mode=write&replication_state=streaming&tag_zone=eu%2Dwest&tag_x=a+b",
    )
    .unwrap();
    assert_eq!(f.lag, Some(16 << 20));
    assert_eq!(f.mode, LagMode::Write);
    assert_eq!(f.replication_state.as_deref(), Some("streaming"));
    assert_eq!(
        f.tags,
        [
            ("zone".to_string(), "eu-west".to_string()),
            ("x".to_string(), "a b".to_string())
        ]
    );
    assert_eq!(parse_query("").unwrap(), Default::default());
}

fn metric_lines(text: &str) -> Vec<&str> {
    text.lines().filter(|l| !l.starts_with('#')).collect()
}

#[test]
fn metrics_name_every_series_with_scope_and_name_and_describe_every_family() {
    let mut s = cluster("n1");
    s.loop_durations.observe(Duration::from_millis(3));
    s.loop_durations.observe(Duration::from_millis(30));
    s.loop_durations.observe(Duration::from_secs(9));
    s.promotions = 1;
    let r = get(&s, "/metrics");
    assert_eq!(r.content_type, PROMETHEUS_TEXT);
    let text = std::str::from_utf8(&r.body).unwrap();
    for line in metric_lines(text) {
        assert!(line.contains("{scope=\"demo\",name=\"n1\""), "{line}");
    }
    let families: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .collect();
    for name in [
        "pgha_up gauge",
        "pgha_version_info gauge",
        "pgha_postgres_running gauge",
        "pgha_primary gauge",
        "pgha_replica gauge",
        "pgha_sync_standby gauge",
        "pgha_timeline gauge",
        "pgha_wal_current_lsn_bytes gauge",
        "pgha_wal_received_lsn_bytes gauge",
        "pgha_wal_replayed_lsn_bytes gauge",
        "pgha_replication_lag_bytes gauge",
        "pgha_leader_lease_remaining_seconds gauge",
        "pgha_fencing_deadline_remaining_seconds gauge",
        "pgha_dcs_reachable gauge",
        "pgha_dcs_last_seen_seconds gauge",
        "pgha_failovers_total counter",
        "pgha_switchovers_total counter",
        "pgha_loop_duration_seconds histogram",
        "pgha_pending_restart gauge",
        "pgha_paused gauge",
        "pgha_snapshot_age_seconds gauge",
    ] {
        assert!(families.contains(&name), "missing family {name}");
        let bare = name.split(' ').next().unwrap();
        assert!(
            text.contains(&format!("# HELP {bare} ")),
            "missing HELP of {bare}"
        );
    }
    for sample in [
        "pgha_up{scope=\"demo\",name=\"n1\"} 1",
        "pgha_primary{scope=\"demo\",name=\"n1\"} 1",
        "pgha_replica{scope=\"demo\",name=\"n1\"} 0",
        "pgha_sync_standby{scope=\"demo\",name=\"n1\"} 0",
        "pgha_timeline{scope=\"demo\",name=\"n1\"} 1",
        "pgha_wal_current_lsn_bytes{scope=\"demo\",name=\"n1\"} 10000",
        "pgha_replication_lag_bytes{scope=\"demo\",name=\"n1\",member=\"n3\"} 1000",
        "pgha_replication_lag_bytes{scope=\"demo\",name=\"n1\",member=\"n1\"} 0",
        "pgha_leader_lease_remaining_seconds{scope=\"demo\",name=\"n1\"} 8.7",
        "pgha_fencing_deadline_remaining_seconds{scope=\"demo\",name=\"n1\"} 6.7",
        "pgha_failovers_total{scope=\"demo\",name=\"n1\"} 1",
        "pgha_switchovers_total{scope=\"demo\",name=\"n1\"} 0",
        "pgha_promotions_total{scope=\"demo\",name=\"n1\"} 1",
        "pgha_loop_duration_seconds_bucket{scope=\"demo\",name=\"n1\",le=\"0.005\"} 1",
        "pgha_loop_duration_seconds_bucket{scope=\"demo\",name=\"n1\",le=\"0.05\"} 2",
        "pgha_loop_duration_seconds_bucket{scope=\"demo\",name=\"n1\",le=\"5\"} 2",
        "pgha_loop_duration_seconds_bucket{scope=\"demo\",name=\"n1\",le=\"+Inf\"} 3",
        "pgha_loop_duration_seconds_count{scope=\"demo\",name=\"n1\"} 3",
        "pgha_snapshot_age_seconds{scope=\"demo\",name=\"n1\"} 0.3",
    ] {
        assert!(
            text.lines().any(|l| l == sample),
            "missing {sample} in\n{text}"
        );
    }
    assert!(text
        .lines()
        .any(|l| l.starts_with("pgha_version_info{scope=\"demo\",name=\"n1\",version=\"")));
}

#[test]
fn metric_label_values_are_escaped() {
    let mut s = cluster("n2");
    s.scope = "a\"b\\c\nd".into();
    let text = super::metrics::render(&s, FRESH, TTL, &Live::default());
    assert!(
        text.contains("pgha_up{scope=\"a\\\"b\\\\c\\nd\",name=\"n2\"} 1"),
        "{text}"
    );
    assert_eq!(
        metric_lines(&text)
            .iter()
            .filter(|l| l.starts_with("pgha_replica{"))
            .count(),
        1
    );
}

#[test]
fn certificate_expiries_are_metrics() {
    let s = cluster("n1");
    let in_an_hour = std::time::SystemTime::now() + Duration::from_secs(3600);
    let text = super::metrics::render(
        &s,
        FRESH,
        TTL,
        &Live {
            certificates: &[("ca", in_an_hour), ("server", in_an_hour)],
            router: None,
            backup: None,
        },
    );
    for certificate in ["ca", "server"] {
        let line = metric_lines(&text)
            .into_iter()
            .find(|l| {
                l.starts_with(&format!(
                    "pgha_tls_certificate_expiry_seconds{{scope=\"demo\",name=\"n1\",certificate=\"{certificate}\"}}"
                ))
            })
            .unwrap_or_else(|| panic!("no {certificate} expiry in {text}"));
        let left: i64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!((3590..=3600).contains(&left), "{line}");
    }
    let without = super::metrics::render(&s, FRESH, TTL, &Live::default());
    assert!(!without.contains("certificate=\""), "{without}");
}

#[test]
fn a_stale_agent_reports_itself_down_in_metrics() {
    let s = cluster("n1");
    let text = super::metrics::render(&s, TTL * 2, TTL, &Live::default());
    assert!(text.contains("pgha_up{scope=\"demo\",name=\"n1\"} 0"));
    assert!(text.contains("pgha_primary{scope=\"demo\",name=\"n1\"} 0"));
    assert!(text.contains("pgha_leader_lease_remaining_seconds{scope=\"demo\",name=\"n1\"} 0\n"));
}

#[tokio::test]
async fn an_ipv6_wildcard_accepts_ipv4_and_ipv6_clients() {
    let listeners = bind_all(&["[::]:0".parse().unwrap()]).unwrap();
    let port = listeners[0].local_addr().unwrap().port();
    for client in [format!("127.0.0.1:{port}"), format!("[::1]:{port}")] {
        let connect = tokio::net::TcpStream::connect(&client);
        let (conn, accepted) = tokio::join!(connect, listeners[0].accept());
        conn.unwrap_or_else(|e| panic!("{client}: {e}"));
        accepted.unwrap();
    }
}

#[tokio::test]
async fn an_ipv6_only_wildcard_refuses_ipv4_clients() {
    let listeners = bind_all_in(&["[::]:0".parse().unwrap()], IpFamily::Ipv6).unwrap();
    let port = listeners[0].local_addr().unwrap().port();
    let v6 = tokio::net::TcpStream::connect(format!("[::1]:{port}"));
    let (conn, accepted) = tokio::join!(v6, listeners[0].accept());
    conn.unwrap();
    accepted.unwrap();
    tokio::net::TcpStream::connect(format!("127.0.0.1:{port}"))
        .await
        .expect_err("IPv4 on an IPv6-only socket");
}

#[tokio::test]
async fn an_ipv6_wildcard_beside_an_ipv4_wildcard_on_the_same_port_binds_both() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addrs = [
        format!("0.0.0.0:{port}").parse().unwrap(),
        format!("[::]:{port}").parse().unwrap(),
    ];
    let listeners = bind_all(&addrs).unwrap();
    assert_eq!(listeners.len(), 2);
    let err = bind_all(&[format!("0.0.0.0:{port}").parse().unwrap()]).unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("api.listen 0.0.0.0:{port}")),
        "{err}"
    );
}

fn arb_method() -> impl Strategy<Value = Method> {
    prop_oneof![
        Just(Method::GET),
        Just(Method::HEAD),
        Just(Method::OPTIONS),
        Just(Method::POST),
        Just(Method::DELETE),
        "[A-Z]{1,10}".prop_map(|m| Method::from_bytes(m.as_bytes()).unwrap()),
    ]
}

fn arb_path() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "/",
            "/primary",
            "/replica",
            "/read-only",
            "/readiness",
            "/async",
            "/sync",
            "/metrics",
            "/cluster",
            "/status",
            "/config",
            "/history",
            "/liveness",
            "/health",
            "/leader",
        ])
        .prop_map(String::from),
        "/[ -~]{0,40}",
        ".{0,20}",
    ]
}

fn arb_query() -> impl Strategy<Value = String> {
    let pair = prop_oneof![
        "(lag|mode|replication_state|tag_zone|tag_|x)=[ -~]{0,12}",
        "lag=[0-9]{1,25}(kB|MB|GB|TB|B|)",
        "[%+=&a-z0-9]{0,10}",
        ".{0,10}",
    ];
    prop::collection::vec(pair, 0..5).prop_map(|v| v.join("&"))
}

proptest! {
    #[test]
    fn the_router_answers_every_request_with_a_known_status(
        method in arb_method(),
        path in arb_path(),
        query in arb_query(),
        me in prop::sample::select(vec!["n1", "n2", "n3"]),
        age_ms in 0u64..20_000,
    ) {
        let s = cluster(me);
        let r = Rendered::new(Arc::new(s));
        let reply = route(&r, Duration::from_millis(age_ms), TTL, &Live::default(), &method, &path, &query);
        prop_assert!([200, 400, 404, 405, 503].contains(&reply.status.as_u16()), "{:?}", reply);
        if method == Method::GET && reply.content_type == super::routes::JSON {
            prop_assert!(serde_json::from_slice::<Value>(&reply.body).is_ok(), "{:?}", reply.body);
        }
        if method == Method::HEAD || method == Method::OPTIONS {
            prop_assert!(reply.body.is_empty() || reply.status.as_u16() >= 400);
        }
    }
}

#[test]
fn the_router_shows_in_cluster_status_and_metrics_only_when_on() {
    let mut s = cluster("n2");
    let c = json(&get(&s, "/cluster"));
    assert!(c["members"][1].get("router_rw").is_none(), "{c}");
    assert!(json(&get(&s, "/status")).get("router").is_none());
    let metrics = super::metrics::render(&s, FRESH, TTL, &Live::default());
    assert!(!metrics.contains("pgha_router_"), "{metrics}");

    s.me.router_rw = Some("[fdaa::2]:5432".into());
    s.me.router_ro = Some("[fdaa::2]:5434".into());
    s.members[1] = s.me.clone();
    s.route = Some(crate::ha::RouteChoice {
        primary: Some("n1".into()),
        replicas: vec!["n2".into(), "n3".into()],
        valid_until: None,
    });
    let c = json(&get(&s, "/cluster"));
    assert_eq!(c["members"][1]["router_rw"], "[fdaa::2]:5432");
    assert_eq!(c["members"][1]["router_ro"], "[fdaa::2]:5434");
    let status = json(&get(&s, "/status"));
    assert_eq!(status["router"]["rw"], "[fdaa::2]:5432");
    assert_eq!(status["router"]["primary"], "n1");
    assert_eq!(status["router"]["replicas"][1], "n3");

    let router = crate::router::RouterMetrics::default();
    let mut backup = crate::backup::BackupStatus::default();
    backup
        .last_success
        .insert(crate::backup::Kind::Full, 1_796_695_070);
    backup.failed_total = 2;
    let live = Live {
        certificates: &[],
        router: Some(&router),
        backup: Some(&backup),
    };
    let metrics = super::metrics::render(&s, FRESH, TTL, &live);
    for line in [
        "pgha_router_connections{scope=\"demo\",name=\"n2\",listener=\"rw\"} 0",
        "pgha_router_closed_by_fence_total{scope=\"demo\",name=\"n2\",listener=\"ro\"} 0",
        "pgha_backup_last_success_timestamp_seconds{scope=\"demo\",name=\"n2\",type=\"full\"} 1796695070",
        "pgha_backup_last_success_timestamp_seconds{scope=\"demo\",name=\"n2\",type=\"diff\"} 0",
        "pgha_backup_failed_total{scope=\"demo\",name=\"n2\"} 2",
        "pgha_backup_running{scope=\"demo\",name=\"n2\"} 0",
    ] {
        assert!(metrics.lines().any(|l| l == line), "no {line} in {metrics}");
    }
}
