#!/usr/bin/env bash
# Builds a Debian 12 base image with PostgreSQL 15, etcd and HAProxy from
# Debian packages, for machines that cannot pull images from a registry.
# debootstrap fetches from the mirror this host's apt already uses (read from
# its apt sources, never written here), the tree is imported with
# `docker import`, and the image is tagged with a hash of everything that
# decides its content, so a second run finds it and returns at once.
#
# Usage: docker/base-image.sh          prints the image's tag on stdout
# Needs root (debootstrap) and a Docker engine.
set -euo pipefail

SUITE=bookworm
# postgresql-15: the server pgha manages; etcd-server: the compose cluster's
# etcd members; haproxy: the compose router; ca-certificates: TLS to etcd or
# the API when users configure it; pgbackrest: WAL archiving and backups
# (`[backup]`, PGHA_BACKUP_ENABLED=true with a repository volume).
PACKAGES=(postgresql-15 etcd-server haproxy ca-certificates pgbackrest)
REPO=pgha-base
# Raise when the steps below change what ends up in the image.
RECIPE=2

log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# The first URI serving $SUITE itself (not -updates or -security) from the
# host's apt sources: deb822 files first, then one-line lists.
host_mirror() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk -v suite="$SUITE" '
            function flush() {
                if (types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " suite " ") && uris != "") {
                    split(uris, u, " "); print u[1]; found = 1; exit
                }
                types = ""; suites = ""; uris = ""
            }
            /^[ \t]*#/ { next }
            /^[ \t]*$/ { flush(); next }
            /^Types:/  { sub(/^Types:[ \t]*/, "");  types = $0 }
            /^URIs:/   { sub(/^URIs:[ \t]*/, "");   uris = $0 }
            /^Suites:/ { sub(/^Suites:[ \t]*/, ""); suites = $0 }
            END { if (!found) flush() }
        ' "$f"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        # deb [options] URI SUITE COMPONENTS...
        awk -v suite="$SUITE" '
            $1 == "deb" {
                i = 2
                if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                if ($(i + 1) == suite) { print $i; exit }
            }
        ' "$f"
    done
}

mirror=$(host_mirror | head -n1)
if [ -z "$mirror" ]; then
    log "no apt source for Debian $SUITE found in /etc/apt/sources.list{,.d}: cannot build the base image"
    exit 1
fi

# The tag changes when the suite, the package list or the recipe changes.
hash=$( { echo "$SUITE $RECIPE"; printf '%s\n' "${PACKAGES[@]}"; } | sha256sum | cut -c1-12)
tag="$REPO:$SUITE-$hash"
if docker image inspect "$tag" >/dev/null 2>&1; then
    log "base image $tag already built"
    echo "$tag"
    exit 0
fi

command -v debootstrap >/dev/null || { log "debootstrap not installed (apt-get install debootstrap)"; exit 1; }
[ "$(id -u)" -eq 0 ] || { log "debootstrap needs root"; exit 1; }

root=$(mktemp -d /var/tmp/pgha-base.XXXXXX)
trap 'rm -rf --one-file-system "$root"' EXIT
log "debootstrap $SUITE (${PACKAGES[*]}) into $root"
started=$(date +%s)
include=$(IFS=,; echo "${PACKAGES[*]}")
# Keep debootstrap's own output for when it fails.
if ! debootstrap --variant=minbase --include="$include" "$SUITE" "$root" "$mirror" >"$root.log" 2>&1; then
    tail -n 30 "$root.log" >&2
    rm -f "$root.log"
    exit 1
fi
rm -f "$root.log"

# Postgres packaging starts no cluster in a chroot, but make sure no default
# cluster or service configuration ends up in the image; drop caches, docs
# and message translations (the agent and Postgres run with C.UTF-8).
rm -rf "$root"/var/lib/postgresql/15/main "$root"/etc/postgresql/15/main \
    "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* \
    "$root"/usr/share/locale/* "$root"/usr/share/i18n/*
# apt inside the image keeps using the same mirror.
echo "deb $mirror $SUITE main" >"$root/etc/apt/sources.list"

tar -C "$root" --numeric-owner -c . |
    docker import \
        --change 'ENV LANG=C.UTF-8' \
        --change 'ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/bash"]' \
        - "$tag" >/dev/null
log "base image $tag built in $(($(date +%s) - started)) s"
echo "$tag"
