#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian 12 machine that has only python3: from Debian's packages when missing,
# Mosquitto (the brokers) and its command-line clients, HAProxy (the HTTP entry of the hub replicas), python3-venv, Chromium (headless browser
# tests of the web pages) and VictoriaMetrics (a server speaking InfluxDB's write API, for the telemetry-export
# tests); then a virtual environment in .venv with the package, every extra and the dev tools; and a side venv
# .venv-openadr3 with openadr3-client for its conformance test, when the machine has a Python >= 3.12 (see the end).
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run again (it only installs what is missing).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

missing=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
# Debian's mosquitto-clients: the broker security tests attack the brokers with mosquitto_sub/mosquitto_pub.
command -v mosquitto_sub >/dev/null 2>&1 || missing+=(mosquitto-clients)
# Debian's victoria-metrics: the bridge's telemetry-export tests write to it over InfluxDB's v2 write API (they start
# their own on a free port; a system service the package may start on port 8428 is never used).
command -v victoria-metrics >/dev/null 2>&1 || [ -x /usr/bin/victoria-metrics ] || missing+=(victoria-metrics)
# Debian's haproxy: the one HTTP entry in front of the hub replicas in the scale-out experiment and its tests (they
# start their own on a free port; a system service the package may start is never used).
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
# Debian's chromium: the gateway page's browser test drives it headless over the DevTools protocol.
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]} from Debian's packages" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  # Debian's mosquitto package may start a system broker on port 1883; the platform never uses it (every test,
  # demo and stack starts its own brokers from broker_config/ on free ports).
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  python3 -m venv .venv
fi
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setup: installing the package and its dev tools into .venv" >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi

# A side venv .venv-openadr3 for the OpenADR 3 conformance test's second third-party client: openadr3-client (ElaadNL)
# requires Python >= 3.12 while the project runs on 3.11, so the test runs tests/openadr3_client_ven.py under this
# venv's python as a subprocess. The first Python >= 3.12 found: python3 itself, python3.13/python3.12 on PATH, or
# pyenv's. Pinned to 2.4.2: the version whose API and 3.1.0 models the test VEN was written against (a new release
# may rename them). With none found, the marker .openadr3-no-python312 tells the test to skip (and say why).
oadr_pin="openadr3-client==2.4.2"
oadr_stamp=".venv-openadr3/.installed-${oadr_pin}"
if [ ! -f "$oadr_stamp" ]; then
  is_312() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }
  oadr_python=""
  candidates=(python3 python3.13 python3.12)
  if command -v pyenv >/dev/null 2>&1; then
    for p in "$(pyenv root)"/versions/3.1[23]*/bin/python3; do [ -x "$p" ] && candidates+=("$p"); done
  fi
  # A pyenv shim on PATH answers for a version it does not select with an error: is_312 runs each, not just finds it.
  for c in "${candidates[@]}"; do
    if is_312 "$c"; then oadr_python="$c"; break; fi
  done
  if [ -z "$oadr_python" ]; then
    echo "setup: no Python >= 3.12 found (python3, python3.13, python3.12, pyenv's); the openadr3-client conformance test will be skipped" >&2
    touch .openadr3-no-python312
  else
    echo "setup: creating .venv-openadr3 with $("$oadr_python" -c 'import sys; print(sys.executable)') for $oadr_pin" >&2
    rm -rf .venv-openadr3 .openadr3-no-python312
    "$oadr_python" -m venv .venv-openadr3
    .venv-openadr3/bin/python -m pip install -q --disable-pip-version-check "$oadr_pin"
    touch "$oadr_stamp"
  fi
fi
