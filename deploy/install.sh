#!/usr/bin/env bash
# Install kvmd as a systemd service: a virtualenv under /opt/kvmd, the unit, sysusers and
# tmpfiles entries, and /etc/kvmd/kvmd.toml (kept if it exists). Idempotent.
#   deploy/install.sh            install or upgrade
#   deploy/install.sh --uninstall  remove (keeps /etc/kvmd; add --purge to remove it)
# DESTDIR installs into a staging root (for packaging and tests), skipping systemctl.
set -euo pipefail
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

if [ "${1:-}" = "--uninstall" ]; then
    uninstall "${2:-}"
    exit 0
fi

install -d "$prefix" "$unitdir" "$confdir" "$root/usr/lib/sysusers.d" "$root/usr/lib/tmpfiles.d"
if [ ! -x "$prefix/venv/bin/python" ]; then
    python3 -m venv "$prefix/venv"
fi
"$prefix/venv/bin/pip" install -q --upgrade pip
"$prefix/venv/bin/pip" install -q "$src"
install -m 0644 "$src/README.md" "$prefix/README.md"
# Examples: the commented config, Prometheus scrape config and rules, Grafana dashboard.
install -d "$prefix/examples/prometheus" "$prefix/examples/grafana"
install -m 0644 "$src/deploy/config/kvmd.toml" "$prefix/examples/kvmd.toml"
install -m 0644 "$src"/deploy/prometheus/*.yml "$prefix/examples/prometheus/"
install -m 0644 "$src/deploy/grafana/kvmd-dashboard.json" "$prefix/examples/grafana/"
install -m 0644 "$src/deploy/systemd/kvmd.service" "$unitdir/kvmd.service"
install -m 0644 "$src/deploy/systemd/kvmd.sysusers" "$root/usr/lib/sysusers.d/kvmd.conf"
install -m 0644 "$src/deploy/systemd/kvmd.tmpfiles" "$root/usr/lib/tmpfiles.d/kvmd.conf"
if [ ! -e "$confdir/kvmd.toml" ]; then
    install -m 0640 "$src/deploy/config/kvmd.toml" "$confdir/kvmd.toml"
fi
if [ -z "$root" ]; then
    systemd-sysusers /usr/lib/sysusers.d/kvmd.conf 2>/dev/null || groupadd -f kvmd
    systemd-tmpfiles --create /usr/lib/tmpfiles.d/kvmd.conf 2>/dev/null || true
fi
if [ "$live" = 1 ]; then
    systemctl daemon-reload
    echo "kvmd installed: systemctl enable --now kvmd"
else
    echo "kvmd installed under ${root:-/} (systemd is not running here: start it yourself)"
fi
