#!/usr/bin/env bash
# Lint (ruff), type-check (mypy) and test (pytest, against real Mosquitto, HTTP, Modbus and SQLite).
# Sets everything up first. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
echo "== ruff" && .venv/bin/ruff check .
echo "== mypy" && .venv/bin/mypy
# Three worker processes by default (MHP_TEST_WORKERS=0 runs the suite in this one process; "-n N" among the
# arguments overrides it): the tests wait on brokers, processes and sockets far more than they compute, so three
# workers on two cores take about half the time of one (docs/performance.md, "The test suite's time").
echo "== pytest" && .venv/bin/python -m pytest -n "${MHP_TEST_WORKERS:-3}" "$@"
