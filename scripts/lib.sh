# Shared by scripts/demo and scripts/test: prerequisites and small helpers.
# Sourced, not run.

PGHA_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# Installs the Debian packages that provide what is missing (apt only then).
ensure_prereqs() {
    local missing=()
    [ -x /usr/lib/postgresql/15/bin/postgres ] || missing+=(postgresql-15 postgresql-client-15)
    command -v psql >/dev/null || missing+=(postgresql-client-15)
    command -v etcd >/dev/null || missing+=(etcd-server)
    command -v etcdctl >/dev/null || missing+=(etcd-client)
    command -v protoc >/dev/null || missing+=(protobuf-compiler)
    command -v python3 >/dev/null || missing+=(python3)
    # Backups and WAL archiving (tests/backup.rs, the demo).
    command -v pgbackrest >/dev/null || missing+=(pgbackrest)
    # tests/docker.rs, when a Docker engine answers: debootstrap builds its
    # base image, compose runs the cluster.
    if docker info >/dev/null 2>&1; then
        command -v debootstrap >/dev/null || missing+=(debootstrap)
        docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null || missing+=(docker-compose)
    fi
    # The IPv6 tests build their networks with `ip netns`.
    command -v ip >/dev/null || missing+=(iproute2)
    for extra in "$@"; do
        case "$extra" in
            haproxy) command -v haproxy >/dev/null || missing+=(haproxy) ;;
            promtool) command -v promtool >/dev/null || missing+=(prometheus) ;;
            wrk) command -v wrk >/dev/null || missing+=(wrk) ;;
        esac
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing: ${missing[*]}"
        local sudo=""
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
        # Debian starts a default cluster and etcd as services; pgha runs its own.
        $sudo systemctl disable --now etcd postgresql prometheus >/dev/null 2>&1 || true
    fi
    if ! command -v cargo >/dev/null; then
        [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
    fi
    command -v cargo >/dev/null || { log "cargo not found: install a Rust toolchain (rustup)"; return 1; }
}

# Prints N free TCP ports on 127.0.0.1.
free_ports() {
    python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}
