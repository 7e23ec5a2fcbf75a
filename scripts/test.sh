#!/usr/bin/env bash
# Set up (idempotent) and run the test suite: fast unit tests, then end-to-end tests on the real
# Ray + vLLM + DeepSpeed stack. Extra arguments go to pytest (e.g. `-m "not e2e"`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
# --durations: the 15 slowest tests at the end of every run, so a slow addition shows where it lands.
# -n 2: two workers, each module on one of them (tests/conftest.py says why); RL_TEST_WORKERS=0 runs in one process.
exec "${RL_VENV:-$ROOT/.venv}/bin/python" -m pytest -q -p no:cacheprovider --durations=15 \
    -n "${RL_TEST_WORKERS:-2}" "$@"
