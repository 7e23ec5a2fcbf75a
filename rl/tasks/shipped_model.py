"""The default embedded model (``builtin:tiny-arithmetic``) ships with the package: 1.05M parameters in 4.2 MB
of safetensors, checksum-checked, laid out as a build of the default ``TinyModelSpec``.

Building it from scratch is deterministic on one machine but not across CPUs: the SFT stops when the train
split reaches its target accuracy, and where it crosses depends on the float kernels (one AMD machine stopped
at step 370 where this build stopped at 410, and started the quickstart at 29.6% instead of 36.5%). With the
weights shipped, every machine starts from the same model; the task data are generated (pure Python, seeded,
the same everywhere). Other specs are still built (``rl.tasks.tiny_model.build_tiny_model``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable, Optional

SHIPPED_DIR = Path(__file__).parent / "shipped" / "tiny-arithmetic"
SHIPPED_SHA256 = "5c238fa314f40e9495c7726a4f63a14d5977485c8e0b50fffc3f0be575b78a75"  # model.safetensors


def shipped_builder(spec, write_data: Callable[[Path], None]) -> Optional[Callable[[Path], dict]]:
    """A builder that lays the shipped model out as the build of ``spec`` (``write_data(out)`` writes the task
    data), or None when ``spec`` is not the shipped one."""
    info_path = SHIPPED_DIR / "build_info.json"
    if not info_path.is_file():
        return None
    info = json.loads(info_path.read_text())
    if info["spec_hash"] != spec.hash12:
        return None

    def build(out: Path) -> dict:
        digest = hashlib.sha256((SHIPPED_DIR / "model.safetensors").read_bytes()).hexdigest()
        if digest != SHIPPED_SHA256:
            raise RuntimeError(f"{SHIPPED_DIR / 'model.safetensors'}: sha256 {digest}, expected {SHIPPED_SHA256} "
                               "(a damaged checkout; restore it with git)")
        write_data(out)
        shutil.copytree(SHIPPED_DIR, out / "model", ignore=shutil.ignore_patterns("build_info.json"))
        return {**info, "shipped": True}

    return build
