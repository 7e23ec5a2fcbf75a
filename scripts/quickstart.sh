#!/usr/bin/env bash
# Set up (idempotent) and run the embedded default: a tiny model built locally, trained with GRPO.
# Extra arguments are recipe overrides, e.g. `bash scripts/quickstart.sh steps=20`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/rl" train recipes/quickstart.yaml "$@"
