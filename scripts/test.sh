#!/usr/bin/env bash
# Lint (ruff), type-check (mypy) and test (pytest, against real Mosquitto, HTTP, Modbus and SQLite).
# Sets everything up first. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
echo "== ruff" && .venv/bin/ruff check .
echo "== mypy" && .venv/bin/mypy
echo "== pytest" && .venv/bin/python -m pytest "$@"
