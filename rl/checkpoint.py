"""Checkpoints that a run can continue from exactly.

A checkpoint is a directory ``<run_dir>/checkpoints/step_NNNNNN/`` holding
- the policy in HF format (``save_pretrained``: loadable by transformers and vLLM),
- ``trainer_state/``: each rank's optimizer, scheduler and RNG state (safetensors + JSON),
- ``driver_state.json``: step, prompt-sampler position, policy version, reward-failure counts,
  the recipe's fingerprint; written last.

It is written into ``step_NNNNNN.tmp`` and renamed, so a directory without the ``.tmp`` suffix
and with ``driver_state.json`` is complete; a crash mid-write leaves only a ``.tmp`` to ignore.
Nothing is pickled.
"""

from __future__ import annotations

import glob
import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable, Optional

from common.atomic import atomic_directory
from rl.config import Recipe, RecipeError
from rl.files import write_text_atomic

STATE_FILE = "driver_state.json"
# Fields that may change between a run and its resumption without changing what it computes.
_RESUMABLE_CHANGES = {"resume", "resume_force", "steps", "logging", "eval", "checkpoint", "output_dir", "use_ray", "watchdog"}


# Where the actors run, how many threads they use and how they allocate memory: a resumed run may move (say, its
# engine to the trainer's node after losing the engine's node) without changing what it trains.
_PLACEMENT_FIELDS = {
    "cluster": None,  # the whole section: placement strategy, timeouts, weight transport
    "rollout": {"num_cpus_per_actor", "num_gpus_per_actor", "cpu_threads", "resources", "max_restarts", "colocate"},
    "trainer": {"num_cpus_per_rank", "num_gpus_per_rank", "torch_threads", "resources", "host_mmap_threshold_mib"},
}


def recipe_fingerprint(recipe: Recipe) -> str:
    """A hash of what the recipe sets away from its defaults, resumable and placement fields aside: a field added to
    the recipe later, at its default, leaves the fingerprint of existing checkpoints unchanged."""
    data = {k: v for k, v in recipe.model_dump(mode="json", exclude_defaults=True).items() if k not in _RESUMABLE_CHANGES}
    for section, fields in _PLACEMENT_FIELDS.items():
        if fields is None:
            data.pop(section, None)
        elif section in data:
            kept = {k: v for k, v in data[section].items() if k not in fields}
            data.pop(section)
            if kept:  # a section left empty hashes as if it were never set
                data[section] = kept
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def is_complete(ckpt: Path) -> bool:
    return ckpt.is_dir() and not ckpt.name.endswith(".tmp") and (ckpt / STATE_FILE).is_file()


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step_") and is_complete(p))


def write_atomically(final: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_dir)``, then rename ``tmp_dir`` to ``final`` (replacing an older ``final``); a failure leaves
    ``final`` untouched. ``tmp_dir`` is ``<final>.tmp``, the name ``is_complete`` and ``prune`` recognise."""
    with atomic_directory(final, replace=True, temp_name=final.name + ".tmp") as tmp:
        write(tmp)
    return final


def prune(run_dir: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` complete checkpoints; drop leftovers of interrupted writes."""
    root = Path(run_dir) / "checkpoints"
    for p in [*root.glob("step_*.tmp"), *root.glob(".trash-step_*")]:  # the latter: an old copy being replaced
        shutil.rmtree(p, ignore_errors=True)
    for old in complete_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def find_resume_checkpoint(recipe: Recipe) -> Optional[Path]:
    """The checkpoint ``recipe.resume`` points at (None to start fresh)."""
    if recipe.resume is None:
        return None
    if recipe.resume != "auto":
        ckpt = Path(recipe.resume)
        if not is_complete(ckpt):
            raise RecipeError(f"recipe field 'resume': {ckpt} is not a complete checkpoint (no {STATE_FILE})")
        return ckpt
    pattern = recipe.output_dir.replace("{timestamp}", "*").replace("{name}", recipe.name)
    runs = sorted((Path(p) for p in glob.glob(pattern)), key=lambda p: p.stat().st_mtime, reverse=True)
    for run in runs:
        ckpts = complete_checkpoints(run)
        if ckpts:
            return ckpts[-1]
    return None


def read_state(ckpt: Path, recipe: Recipe) -> dict:
    state = json.loads((ckpt / STATE_FILE).read_text())
    if not state.get("resumable", False):
        raise RecipeError(f"checkpoint {ckpt} holds the policy only (written with trainer.zero_stage 3); it cannot be resumed exactly")
    if state["recipe_fingerprint"] != recipe_fingerprint(recipe) and not recipe.resume_force:
        raise RecipeError(
            f"recipe field 'resume': {ckpt} was written by a different recipe (fingerprint {state['recipe_fingerprint']} vs "
            f"{recipe_fingerprint(recipe)}); only steps, logging, eval, checkpoint, output_dir and where the actors run "
            "(cluster, resources, CPUs/GPUs/threads per actor) may change. "
            "Set resume_force=true to resume anyway."
        )
    return state


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop metrics rows logged after ``step`` (the steps about to be redone), atomically."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    write_text_atomic(path, "".join(line + "\n" for line in keep))
