#!/usr/bin/env bash
# Install kvmd as a systemd service: a virtualenv under /opt/kvmd, the unit, sysusers and
# tmpfiles entries, the kvmd user, and /etc/kvmd/kvmd.toml (kept if it exists). Idempotent.
#   deploy/install.sh                install or upgrade
#   deploy/install.sh --uninstall    remove (keeps /etc/kvmd and the user; add --purge to
#                                    remove /etc/kvmd)
#   deploy/install.sh --create-users only create the kvmd user and the kvmd and kvm groups
# DESTDIR installs into a staging root (for packaging and tests), skipping systemctl and
# user creation (--create-users creates them in DESTDIR's /etc). Users are created with
# systemd-sysusers, or groupadd/useradd where it is missing or fails (KVMD_SYSUSERS names
# another sysusers binary; empty forces the fallback). PYTHON picks the interpreter of the
# virtualenv (default /usr/bin/python3: the service runs as kvmd, which must be able to run
# it; a Python under /root would not do).
set -euo pipefail
umask 022  # the kvmd user reads /opt/kvmd
src="$(cd "$(dirname "$0")/.." && pwd)"
root="${DESTDIR:-}"
prefix="$root/opt/kvmd"
unitdir="$root/etc/systemd/system"
confdir="$root/etc/kvmd"
live=0
[ -z "$root" ] && [ -d /run/systemd/system ] && live=1

uninstall() {
    if [ "$live" = 1 ]; then
        systemctl disable --now kvmd.service 2>/dev/null || true
    fi
    rm -f "$unitdir/kvmd.service" "$root/usr/lib/sysusers.d/kvmd.conf" \
          "$root/usr/lib/tmpfiles.d/kvmd.conf"
    rm -rf "$prefix"
    if [ "${1:-}" = "--purge" ]; then rm -rf "$confdir"; fi
    if [ "$live" = 1 ]; then systemctl daemon-reload; fi
    echo "kvmd uninstalled"
}

# The daemon's user kvmd (primary group kvmd, whose members may use the socket) in the kvm
# group (which may open /dev/kvm): deploy/systemd/kvmd.sysusers, or the same with shadow.
create_users() {
    local sysusers="${KVMD_SYSUSERS-systemd-sysusers}" root_opt=() prefix_opt=()
    if [ -n "$root" ]; then
        root_opt=(--root="$root")
        prefix_opt=(--prefix "$root")
    fi
    if [ -n "$sysusers" ] && command -v "$sysusers" >/dev/null 2>&1 &&
            "$sysusers" "${root_opt[@]}" "$src/deploy/systemd/kvmd.sysusers"; then
        return 0
    fi
    exists() {  # exists passwd|group NAME
        if [ -n "$root" ]; then grep -q "^$2:" "$root/etc/$1" 2>/dev/null
        else getent "$1" "$2" >/dev/null; fi
    }
    exists group kvm || groupadd "${prefix_opt[@]}" --system kvm
    exists group kvmd || groupadd "${prefix_opt[@]}" --system kvmd
    if ! exists passwd kvmd; then
        useradd "${prefix_opt[@]}" --system --gid kvmd --groups kvm --home-dir /var/lib/kvmd \
            --no-create-home --shell /usr/sbin/nologin --comment "kvmd - KVM gRPC daemon" kvmd
    fi
    usermod "${prefix_opt[@]}" --append --groups kvm kvmd
}

if [ "${1:-}" = "--uninstall" ]; then
    uninstall "${2:-}"
    exit 0
fi
if [ "${1:-}" = "--create-users" ]; then
    install -d "$root/etc"
    create_users
    exit 0
fi

install -d "$prefix" "$unitdir" "$confdir" "$root/usr/lib/sysusers.d" "$root/usr/lib/tmpfiles.d"
if [ ! -x "$prefix/venv/bin/python" ]; then
    python="${PYTHON:-/usr/bin/python3}"
    [ -x "$python" ] || python=python3
    "$python" -m venv "$prefix/venv"
fi
"$prefix/venv/bin/pip" install -q --upgrade pip
# The client distribution (kvmd_proto, kvmctl) from this checkout, with the daemon that
# depends on it: pip takes kvmd-client from the path, not from an index.
# Once, from an install of before the split: kvmd-grpc then shipped kvmctl itself, and pip
# replacing it would delete the kvmctl that kvmd-client has just installed.
if "$prefix/venv/bin/pip" show -f kvmd-grpc 2>/dev/null | grep -q 'bin/kvmctl$'; then
    "$prefix/venv/bin/pip" uninstall -q -y kvmd-grpc
fi
"$prefix/venv/bin/pip" install -q "$src/clients/python" "$src"
install -m 0644 "$src/README.md" "$prefix/README.md"
# Examples: the commented config, Prometheus scrape config and rules, Grafana dashboard.
install -d "$prefix/examples/prometheus" "$prefix/examples/grafana"
install -m 0644 "$src/deploy/config/kvmd.toml" "$prefix/examples/kvmd.toml"
install -m 0644 "$src"/deploy/prometheus/*.yml "$prefix/examples/prometheus/"
install -m 0644 "$src/deploy/grafana/kvmd-dashboard.json" "$prefix/examples/grafana/"
install -m 0644 "$src/deploy/systemd/kvmd.service" "$unitdir/kvmd.service"
install -m 0644 "$src/deploy/systemd/kvmd.sysusers" "$root/usr/lib/sysusers.d/kvmd.conf"
install -m 0644 "$src/deploy/systemd/kvmd.tmpfiles" "$root/usr/lib/tmpfiles.d/kvmd.conf"
if [ -z "$root" ]; then
    create_users
fi
if [ ! -e "$confdir/kvmd.toml" ]; then
    install -m 0640 "$src/deploy/config/kvmd.toml" "$confdir/kvmd.toml"
fi
if [ -z "$root" ]; then
    # The daemon runs as kvmd: it reads its config through the group (also after an upgrade
    # from a root-run kvmd, whose config was root:root).
    chgrp kvmd "$confdir" "$confdir/kvmd.toml"
    chmod g+r "$confdir/kvmd.toml"
    # /run/kvmd, /var/lib/kvmd, /etc/kvmd, and /dev/kvm for the kvm group.
    systemd-tmpfiles --create /usr/lib/tmpfiles.d/kvmd.conf || true
fi
if [ "$live" = 1 ]; then
    systemctl daemon-reload
    echo "kvmd installed: systemctl enable --now kvmd"
else
    echo "kvmd installed under ${root:-/} (systemd is not running here: start it yourself)"
fi
