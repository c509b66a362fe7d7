#!/usr/bin/env bash
# The router in every agent beside a direct connection and HAProxy, in one
# run (issue 17): a three-node cluster with its routers on (release build,
# real etcd, Postgres 15, pgbench, HAProxy as in config/haproxy.cfg) on free
# loopback ports under /tmp. Measures pgbench select-only and TPC-B tps, new
# connections per second and their p99, the memory of 10,000 idle
# connections, and across switchovers and SIGKILLs the time from the
# promotion to the first write through each, and connections landing on the
# wrong role. Writes bench/router-results.md; stops everything it started.
#
# Usage: bench/router.sh   (about 12 minutes)
# Environment: PGHA_BENCH_SECS (pgbench run length, default 30),
# PGHA_BENCH_CLIENTS (8), PGHA_BENCH_IDLE (10000), PGHA_BENCH_ROUNDS (3).
# Targets: router >= 0.9 x direct (select-only) and >= 0.95 x (TPC-B), and
# >= HAProxy; < 64 MiB extra agent RSS for 10,000 idle connections;
# promotion to first write through the router < 100 ms; 0 wrong-role
# connections through the router.
set -euo pipefail
source "$(dirname "$0")/../scripts/lib.sh"
cd "$PGHA_ROOT"

ensure_prereqs haproxy
# Each idle connection costs the client, the proxy and the agent a file
# descriptor or two; Postgres forks a backend for each.
# Raise the limit when this machine lets us (CAP_SYS_RESOURCE); without
# it the benchmark holds as many as the hard limit allows and says so.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
log "building (release) and running the router benchmark"
exec cargo test --release --test bench_router -- --ignored --nocapture
