#!/usr/bin/env bash
# Install the HEMS gateway on Raspberry Pi OS (bookworm) or any Debian: a system user `hems` in `dialout` (serial
# ports), a virtual environment in /opt/hems-gateway with the package's `gateway` extra only (no hub stack),
# the configuration in /etc/hems-gateway/gateway.toml, state in /var/lib/hems-gateway, and the systemd unit.
#
#   sudo scripts/install-gateway.sh [--config FILE] [--package SPEC]
#
# --config FILE    a gateway.toml to install (for example written by `hems-gateway provision`); an existing
#                  /etc/hems-gateway/gateway.toml is never overwritten without it
# --package SPEC   what pip installs (default: this checkout, with the gateway extra)
# --root DIR       install under DIR instead of / (for packaging and tests); implies --no-systemctl
# --python PY      the Python that checks the configuration (default: the venv's; with --no-venv and no --python
#                  it is not checked)
# --no-user        do not create the system user   --no-venv  do not create the venv   --no-systemctl  do not start
#
# An upgrade checks the configuration (the --config FILE, else the installed gateway.toml) with the new version
# (`hems-gateway check`) before installing it and (re)starting the service: a configuration the new version refuses
# (say a device name "water heater", refused since device names were bounded) stops the script with what to change;
# the service is not restarted and its files are as they were, but the venv already holds the new version, so the
# file must be fixed before the service next restarts.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
root="" config="" package="$here[gateway]" make_user=1 make_venv=1 use_systemctl=1 python=""
while [ $# -gt 0 ]; do
  case "$1" in
    --config) config=$2; shift 2 ;;
    --package) package=$2; shift 2 ;;
    --python) python=$2; shift 2 ;;
    --root) root=$2; use_systemctl=0; shift 2 ;;
    --no-user) make_user=0; shift ;;
    --no-venv) make_venv=0; shift ;;
    --no-systemctl) use_systemctl=0; shift ;;
    *) echo "install-gateway: unknown option $1" >&2; exit 2 ;;
  esac
done
if [ -z "$root" ] && [ "$(id -u)" -ne 0 ]; then
  echo "install-gateway: run as root (sudo)" >&2; exit 2
fi

if [ "$make_user" = 1 ] && ! id hems >/dev/null 2>&1; then
  useradd --system --home-dir /var/lib/hems-gateway --shell /usr/sbin/nologin --groups dialout hems
  echo "install-gateway: created system user hems (groups: dialout)"
fi

install -d -m 0755 "$root/opt/hems-gateway" "$root/etc/hems-gateway" "$root/etc/systemd/system"
install -d -m 0750 "$root/var/lib/hems-gateway"
if [ "$make_venv" = 1 ]; then
  python3 -c 'import venv, ensurepip' 2>/dev/null || apt-get install -y -qq python3-venv
  python3 -m venv "$root/opt/hems-gateway/venv"
  "$root/opt/hems-gateway/venv/bin/pip" install -q --disable-pip-version-check "$package"
fi
toml="$root/etc/hems-gateway/gateway.toml"
# The configuration the gateway will run with: the one given, else the one installed. It is checked before it is
# installed, so a refused --config FILE never replaces a working one.
candidate=${config:-$toml}
if [ -z "$python" ] && [ -x "$root/opt/hems-gateway/venv/bin/python" ]; then
  python="$root/opt/hems-gateway/venv/bin/python"
fi
if [ -f "$candidate" ] && [ -n "$python" ]; then
  if ! "$python" -m hems_firmware.cli --log-level WARNING check --config "$candidate"; then
    echo "install-gateway: $candidate does not load with this version (what is wrong is listed above)." >&2
    echo "  Fix it: a refused device name is renamed in [[devices]] and wherever the file names that device" >&2
    echo "  (e.g. \"water heater\" -> \"water_heater\": letters, digits, . _ -). Then run this script again." >&2
    echo "  hems-gateway was not (re)started and its unit not changed, but the new version is installed in its" >&2
    echo "  venv: fix the file before the service next restarts (a reboot, the watchdog)." >&2
    [ -n "$config" ] && echo "  $config was not installed; $toml is as it was." >&2
    exit 1
  fi
elif [ -f "$candidate" ]; then
  echo "install-gateway: $candidate not checked (--no-venv without --python)" >&2
fi
if [ -n "$config" ]; then
  install -m 0640 "$config" "$toml"
elif [ ! -f "$toml" ]; then
  echo "install-gateway: no configuration yet: write one with" >&2
  echo "  hems-gateway provision --output /etc/hems-gateway/gateway.toml ..." >&2
fi
install -m 0644 "$here/hems_firmware/packaging/hems-gateway.service" "$root/etc/systemd/system/hems-gateway.service"
if [ "$make_user" = 1 ]; then
  chown -R hems:hems "$root/var/lib/hems-gateway"
  [ -f "$root/etc/hems-gateway/gateway.toml" ] && chown root:hems "$root/etc/hems-gateway/gateway.toml"
fi
if [ "$use_systemctl" = 1 ] && command -v systemctl >/dev/null 2>&1; then
  systemctl daemon-reload
  if [ -f /etc/hems-gateway/gateway.toml ]; then
    systemctl enable --now hems-gateway.service
    echo "install-gateway: hems-gateway is running: journalctl -u hems-gateway -f"
  fi
fi
echo "install-gateway: done; check the devices with: hems-gateway selftest --config /etc/hems-gateway/gateway.toml"
