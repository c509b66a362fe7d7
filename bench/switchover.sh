#!/usr/bin/env bash
# Planned-maintenance benchmark: a three-node cluster (one etcd, three pgha
# agents with Postgres 15, release build, synchronous_mode on, default
# timings) on free loopback ports under /tmp, a client inserting a row every
# 20 ms through a multi-host connection string. Measures the write outage the
# client sees in 10 switchovers and in each step of a rolling restart (SIGINT
# to each agent in turn, then start it again), and the acknowledged writes
# lost. Everything started is stopped at the end.
#
# Usage: bench/switchover.sh [ROUNDS]   (default 10 switchovers; ~3 minutes)
# Targets: switchover outage < 1 s (median and max), rolling-restart step < 2 s.
set -euo pipefail
source "$(dirname "$0")/../scripts/lib.sh"
cd "$PGHA_ROOT"

ensure_prereqs
if [ $# -gt 0 ]; then
    export PGHA_BENCH_ROUNDS="$1"
fi
log "building (release) and running the switchover benchmark"
exec cargo test --release --test bench_switchover -- --ignored --nocapture
