"""A trainer rank imports DeepSpeed and transformers without MLflow and scikit-learn (start-up time), and both
stay importable in that process afterwards."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import sys
sys.path.insert(0, {root!r})
from trainer.process import import_training_libraries

import_training_libraries()
assert {{"deepspeed", "transformers"}} <= set(sys.modules), "the libraries were imported"
assert "mlflow" not in sys.modules and "sklearn" not in sys.modules, "imported by DeepSpeed or transformers"
from transformers import AutoModelForCausalLM  # the lazy class loads
import mlflow, sklearn.cluster  # a tracker or the adapters' clustering in the same process still imports them
print("ok")
"""


def test_rank_skips_unused_imports_and_leaves_them_importable():
    out = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT))], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
