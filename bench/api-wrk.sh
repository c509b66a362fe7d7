#!/usr/bin/env bash
# Load-tests the health API the way load balancers and scrapers hit it:
# starts a single-node cluster (one etcd, one pgha with its Postgres, release
# build) on free loopback ports under a temporary directory, runs
#   wrk -c16 -t2 -d10s --latency
# against /health and /primary, prints requests/s and the 99th percentile
# latency of each, and stops everything it started.
#
# Usage: bench/api-wrk.sh [extra wrk args]   (e.g. -d30s)
# Target on 2 cores: >= 30,000 requests/s and p99 < 5 ms.
set -euo pipefail
source "$(dirname "$0")/../scripts/lib.sh"
cd "$PGHA_ROOT"

ensure_prereqs wrk
command -v curl >/dev/null || { log "curl is needed"; exit 1; }
log "building pgha (release)"
cargo build --release --quiet --bin pgha
PGHA="$PGHA_ROOT/target/release/pgha"

DIR=$(mktemp -d /tmp/pgha-bench-XXXXXX)
# Postgres runs as the postgres user below this directory when we are root.
chmod 755 "$DIR"
ETCD_PID="" PGHA_PID=""

stop_all() {
    local status=$?
    if [ -n "$PGHA_PID" ] && kill -0 "$PGHA_PID" 2>/dev/null; then
        kill -TERM "$PGHA_PID" 2>/dev/null || true
        for _ in $(seq 1 300); do kill -0 "$PGHA_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$PGHA_PID" 2>/dev/null || true
    fi
    # A postmaster left behind (agent killed) is ours only if it runs on our data directory.
    if [ -f "$DIR/data/postmaster.pid" ]; then
        local pm
        pm=$(head -1 "$DIR/data/postmaster.pid")
        if [ -n "$pm" ] && tr '\0' ' ' < "/proc/$pm/cmdline" 2>/dev/null | grep -q "$DIR/data"; then
            kill -QUIT "$pm" 2>/dev/null || true
        fi
    fi
    if [ -n "$ETCD_PID" ]; then
        kill -TERM "$ETCD_PID" 2>/dev/null || true
        wait "$ETCD_PID" 2>/dev/null || true
    fi
    if [ $status -ne 0 ]; then
        log "failed; last lines of the logs:"
        tail -n 20 "$DIR/pgha.log" "$DIR/etcd.log" >&2 2>/dev/null || true
    fi
    rm -rf "$DIR"
}
trap stop_all EXIT
trap 'exit 130' INT TERM

read -r ETCD_PORT ETCD_PEER PG_PORT API_PORT < <(free_ports 4)

log "starting etcd on 127.0.0.1:$ETCD_PORT"
etcd --name bench --data-dir "$DIR/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER" \
    --initial-cluster "bench=http://127.0.0.1:$ETCD_PEER" >"$DIR/etcd.log" 2>&1 &
ETCD_PID=$!

cat > "$DIR/pgha.toml" <<TOML
scope = "bench"
name = "n1"

[etcd]
endpoints = ["http://127.0.0.1:$ETCD_PORT"]

[postgresql]
data_dir = "$DIR/data"
listen_addresses = "127.0.0.1"
port = $PG_PORT
advertise_host = "127.0.0.1"

[postgresql.superuser]
password = "bench-superuser"

[postgresql.replication]
password = "bench-replication"

[api]
listen = ["127.0.0.1:$API_PORT"]
advertise_url = "http://127.0.0.1:$API_PORT"
TOML
chmod 600 "$DIR/pgha.toml"

log "starting pgha (API on 127.0.0.1:$API_PORT)"
"$PGHA" run --config "$DIR/pgha.toml" >"$DIR/pgha.log" 2>&1 &
PGHA_PID=$!

API="http://127.0.0.1:$API_PORT"
for _ in $(seq 1 1200); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "$API/primary" || true)" = 200 ] && break
    kill -0 "$PGHA_PID" 2>/dev/null || { log "pgha exited"; exit 1; }
    sleep 0.1
done
[ "$(curl -s -o /dev/null -w '%{http_code}' "$API/primary")" = 200 ] || { log "no primary after 120 s"; exit 1; }
log "primary up; running wrk"

results=()
for path in /health /primary; do
    out=$(wrk -c16 -t2 -d10s --latency "$@" "$API$path")
    echo "$out" >&2
    rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
    p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
    bad=$(awk '/Non-2xx or 3xx responses:/ {print $NF}' <<<"$out")
    errors=$(grep -E '^ +Socket errors:' <<<"$out" || true)
    results+=("$(printf '%-9s %12s req/s   p99 %8s%s%s' "$path" "$rps" "$p99" \
        "${bad:+   non-2xx: $bad}" "${errors:+   ${errors# }}")")
done

echo
echo "pgha API, wrk -c16 -t2 -d10s, $(nproc) CPUs:"
printf '%s\n' "${results[@]}"
