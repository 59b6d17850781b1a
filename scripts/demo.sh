#!/usr/bin/env bash
# The whole platform on this machine, a scripted scenario, and what happened where. Sets everything up first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
# The demo prints the DSO's console's URL (dso-console: the platform, requests followed live, feeder plots, the
# client registry; docs/dso-console.md). To keep the stack and its console running and open that URL in a browser:
#   .venv/bin/mhp-stack up --state-dir state     (its URL: "mhp-stack: the DSO's console: ..." and state/stack.json)
echo "demo: the DSO's console's URL is printed below; 'mhp-stack up' keeps it running (docs/dso-console.md)"
exec .venv/bin/mhp-stack demo "$@"
