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
# An upgrade over an existing gateway.toml checks it with the new version (`hems-gateway check`) before (re)starting
# the service: a configuration the new version refuses (say a device name "water heater", refused since device
# names were bounded) stops the script with what to change, and the service is left as it was.
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
if [ -n "$config" ]; then
  install -m 0640 "$config" "$root/etc/hems-gateway/gateway.toml"
elif [ ! -f "$root/etc/hems-gateway/gateway.toml" ]; then
  echo "install-gateway: no configuration yet: write one with" >&2
  echo "  hems-gateway provision --output /etc/hems-gateway/gateway.toml ..." >&2
fi
toml="$root/etc/hems-gateway/gateway.toml"
if [ -z "$python" ] && [ -x "$root/opt/hems-gateway/venv/bin/python" ]; then
  python="$root/opt/hems-gateway/venv/bin/python"
fi
if [ -f "$toml" ] && [ -n "$python" ]; then
  if ! "$python" -m hems_firmware.cli --log-level WARNING check --config "$toml"; then
    echo "install-gateway: $toml does not load with this version (what is wrong is listed above)." >&2
    echo "  Fix it before (re)starting hems-gateway: a refused device name is renamed in [[devices]] and wherever" >&2
    echo "  the file names that device (e.g. \"water heater\" -> \"water_heater\": letters, digits, . _ -)." >&2
    echo "  Then run this script again. The service was not (re)started or changed." >&2
    exit 1
  fi
elif [ -f "$toml" ]; then
  echo "install-gateway: $toml not checked (--no-venv without --python)" >&2
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
