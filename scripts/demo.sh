#!/usr/bin/env bash
# The whole platform on this machine, a scripted scenario, and what happened where. Sets everything up first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/mhp-stack demo "$@"
