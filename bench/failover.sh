#!/usr/bin/env bash
# Failover benchmark: a three-node cluster (one etcd, three pgha agents with
# Postgres 15, release build) on free loopback ports under /tmp, a client
# inserting a row every 20 ms through a multi-host connection string
# (target_session_attrs=read-write). Ten times per TTL the primary's agent and
# Postgres are SIGKILLed; each time the write outage the client saw is
# measured (last write acknowledged by the old primary -> first acknowledged
# by the new one), then the killed node is restarted and rejoins. Runs at the
# default TTL (10 s) and at TTL 3 s and prints median and max outage and the
# acknowledged writes lost. Everything started is stopped at the end.
#
# Usage: bench/failover.sh [ROUNDS]   (default 10 per TTL; a few minutes)
# Targets: median <= TTL + 1 s at the default TTL, <= 4 s at TTL 3 s.
set -euo pipefail
source "$(dirname "$0")/../scripts/lib.sh"
cd "$PGHA_ROOT"

ensure_prereqs
if [ $# -gt 0 ]; then
    export PGHA_BENCH_ROUNDS="$1"
fi
log "building (release) and running the failover benchmark"
exec cargo test --release --test bench_failover -- --ignored --nocapture
