#!/usr/bin/env bash
# Backup benchmark: a three-node cluster (release build) archiving with
# pgBackRest into a posix repository under /tmp, a pgbench database of scale
# 64 (about 1 GiB; PGHA_BENCH_SCALE=N for another): full backup beside
# pg_basebackup, WAL archiving under pgbench, restore to a point in time and
# to the latest WAL, and a total loss to a healthy cluster with
# bootstrap_from. Writes bench/backup-results.md. About 10 minutes on 2 cores.
#
# Usage: bench/backup.sh
# Target: total loss to healthy under 2 minutes for 1 GiB.
set -euo pipefail
source "$(dirname "$0")/../scripts/lib.sh"
cd "$PGHA_ROOT"

ensure_prereqs
log "building (release) and running the backup benchmark"
exec cargo test --release --test bench_backup -- --ignored --nocapture
