#!/usr/bin/env bash
# pgha against Patroni, side by side in one run (issue 11): both systems with
# three nodes on the same Postgres 15 and the same etcd, synchronous mode on,
# on free loopback ports under /tmp, measurements alternating between them.
# Measures start to a healthy cluster, write outage after SIGKILL of the
# primary's agent and Postgres (at each system's default timings, both at
# TTL 20 s, and pgha at its lowest TTL), write outage in switchovers,
# acknowledged writes lost, agent RSS and CPU over 60 s idle, and /health
# throughput and p99 with wrk. Prints a table with the ratio pgha / Patroni and
# writes bench/results.md. Everything started is stopped at the end.
#
# Patroni comes from PyPI (`patroni[etcd3]` and psycopg2-binary) into a
# virtual environment at $PATRONI_VENV (default /var/tmp/pgha-bench/patroni-venv:
# Patroni runs as the postgres user, which must be able to read it), made with
# Debian's python3 for the same reason.
#
# Usage: bench/patroni.sh [ROUNDS]   (default 10 per series; about 40 minutes)
# Runs under `flock /tmp/pgha-heavy.lock` so heavy runs do not overlap.
set -euo pipefail
source "$(dirname "$0")/../scripts/lib.sh"
cd "$PGHA_ROOT"

ensure_prereqs wrk
PATRONI_VENV=${PATRONI_VENV:-/var/tmp/pgha-bench/patroni-venv}
export PATRONI_VENV
if [ ! -x "$PATRONI_VENV/bin/patroni" ]; then
    if ! /usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null; then
        log "installing python3-venv"
        sudo=""
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
    fi
    log "installing Patroni into $PATRONI_VENV"
    mkdir -p "$(dirname "$PATRONI_VENV")"
    /usr/bin/python3 -m venv "$PATRONI_VENV"
    "$PATRONI_VENV/bin/pip" install --quiet --disable-pip-version-check 'patroni[etcd3]' psycopg2-binary
fi
# The postgres user runs Patroni from there.
runuser -u postgres -- "$PATRONI_VENV/bin/patroni" --version >/dev/null \
    || { log "the postgres user cannot run $PATRONI_VENV/bin/patroni"; exit 1; }
log "$("$PATRONI_VENV/bin/patroni" --version)"

if [ $# -gt 0 ]; then
    export PGHA_BENCH_ROUNDS="$1"
fi
log "building (release) and running the side-by-side benchmark (waits for /tmp/pgha-heavy.lock)"
exec flock /tmp/pgha-heavy.lock \
    cargo test --release --test bench_patroni -- --ignored --nocapture
