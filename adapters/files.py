"""The files of one library expert: PEFT LoRA state, content hashes, and the meta derived from the files.

:class:`adapters.library.AdapterLibrary` calls :func:`assemble_expert` to put an expert's adapter
files into a temporary directory, check them and derive its ``meta.json`` (the layout and the fields
are described in :mod:`adapters.library`), then renames the directory into place. Only safetensors
and JSON are read: nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import torch

from adapters.sparse import SPARSE_CONFIG_FILE, SPARSE_WEIGHTS_FILE, SparseAdapter, read_sparse_dir

LORA_WEIGHTS_FILE = "adapter_model.safetensors"
LORA_CONFIG_FILE = "adapter_config.json"
FORMAT_VERSION = 1

_HASH_RE = re.compile(r"^sha256:[0-9a-f]{64}$")

# What a caller may put in ``meta``; everything else in meta.json is derived from the files.
USER_META_FIELDS = ("base_model", "base_model_hash", "task", "data", "recipe", "metrics", "parents", "steps", "extra")
# Derived fields a caller may also state: they must then agree with the files.
CHECKED_META_FIELDS = ("adapter_type", "rank", "alpha", "target_modules", "keep_ratio")


# Defined here, the lowest module that raises it; adapters.library re-exports it.
class LibraryError(Exception):
    """Anything wrong with the library, an expert, or a request to it; the message names the culprit."""


# ---------------------------------------------------------------------------------------------
# hashes
# ---------------------------------------------------------------------------------------------
def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def base_model_hash(model_dir: str | os.PathLike) -> str:
    """``sha256:<hex>`` identifying a base model: its ``config.json`` bytes and every top-level
    ``*.safetensors`` file (name + sha256, sorted by name).

    It reads every weight file (seconds per GB). Re-saving the same weights with another
    transformers version changes ``config.json`` (``transformers_version``) and so the hash: it
    identifies a model directory's content, not an abstract set of weights.
    """
    d = Path(model_dir)
    cfg = d / "config.json"
    if not d.is_dir():
        raise LibraryError(f"base model directory {d} does not exist")
    if not cfg.is_file():
        raise LibraryError(f"base model directory {d} has no config.json")
    files = sorted(p for p in d.glob("*.safetensors") if p.is_file())
    if not files:
        raise LibraryError(f"base model directory {d} has no *.safetensors weights (pickled .bin weights are not hashed/accepted)")
    # A run asks for this once per expert and at every write-back: read the weights once per content
    # (the key changes whenever a file is replaced, resized or rewritten).
    key = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in [cfg, *files])
    if key not in _BASE_HASHES:
        h = hashlib.sha256()
        h.update(b"config.json\0" + file_sha256(cfg).encode() + b"\n")
        for f in files:
            h.update(f.name.encode() + b"\0" + file_sha256(f).encode() + b"\n")
        _BASE_HASHES[key] = "sha256:" + h.hexdigest()
    return _BASE_HASHES[key]


_BASE_HASHES: dict[tuple, str] = {}


# ---------------------------------------------------------------------------------------------
# LoRA state helpers (PEFT key format)
# ---------------------------------------------------------------------------------------------
def lora_pairs(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """PEFT LoRA state dict -> {module: (A [r, in], B [out, r])}.

    Keys must be ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` (what ``save_pretrained``
    writes for plain LoRA on Linear layers); anything else (DoRA magnitudes, LoRA biases, embedding
    LoRA, modules_to_save) raises ValueError: the library handles plain LoRA only.
    """
    A: dict[str, torch.Tensor] = {}
    B: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k.endswith(".lora_A.weight"):
            A[k[: -len(".lora_A.weight")]] = v
        elif k.endswith(".lora_B.weight"):
            B[k[: -len(".lora_B.weight")]] = v
        else:
            raise ValueError(f"unsupported key {k!r} (only plain LoRA lora_A/lora_B weights are handled)")
    if set(A) != set(B):
        raise ValueError(f"unpaired LoRA weights: A without B {sorted(set(A) - set(B))[:3]}, B without A {sorted(set(B) - set(A))[:3]}")
    out = {}
    for m in sorted(A):
        a, b = A[m], B[m]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise ValueError(f"{m}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not [r, in] and [out, r]")
        out[m] = (a, b)
    return out


def pairs_to_state(pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Inverse of ``lora_pairs``: {module: (A, B)} -> PEFT state dict (contiguous tensors)."""
    out = {}
    for m, (a, b) in pairs.items():
        out[f"{m}.lora_A.weight"] = a.contiguous()
        out[f"{m}.lora_B.weight"] = b.contiguous()
    return out


def lora_scaling(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """PEFT's LoRA scale: alpha/rank, or alpha/sqrt(rank) with rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


# ---------------------------------------------------------------------------------------------
# an expert's files and meta
# ---------------------------------------------------------------------------------------------
def assemble_expert(tmp: Path, name: str, source: Any, meta: dict) -> dict:
    """Put the adapter files into ``tmp``, validate them, and return the full meta."""
    kind = _place_source(tmp, source, meta)
    if kind == "lora":
        derived = _lora_fields(tmp)
    else:
        derived = _sparse_fields(tmp)
    for k in CHECKED_META_FIELDS:
        if k in meta and k in derived and meta[k] != derived[k] and not (
            k == "target_modules" and sorted(meta[k]) == sorted(derived[k])
        ):
            raise LibraryError(f"meta says {k}={meta[k]!r} but the adapter files say {derived[k]!r}")

    base_dir = meta.get("base_model") or derived.pop("config_base_model", None)
    derived.pop("config_base_model", None)
    given_hash = meta.get("base_model_hash")
    if given_hash is not None and not (isinstance(given_hash, str) and _HASH_RE.match(given_hash)):
        raise LibraryError(f"base_model_hash must look like 'sha256:<64 hex>', got {given_hash!r}")
    if base_dir is not None and Path(base_dir).is_dir():
        computed = base_model_hash(base_dir)
        if given_hash is not None and given_hash != computed:
            raise LibraryError(f"meta base_model_hash {given_hash[:19]}… does not match {base_dir} ({computed[:19]}…)")
        given_hash, base_dir = computed, str(Path(base_dir).resolve())
    if given_hash is None:
        raise LibraryError(
            f"cannot identify the base model of {name!r}: give meta 'base_model' as an existing model "
            f"directory (got {base_dir!r}) or 'base_model_hash'"
        )
    parents = meta.get("parents") or []
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise LibraryError(f"meta 'parents' must be a list of expert names, got {parents!r}")
    steps = meta.get("steps")
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 0):
        raise LibraryError(f"meta 'steps' must be a non-negative integer, got {steps!r}")

    full = {
        "name": name,
        "format_version": FORMAT_VERSION,
        **derived,
        "base_model": base_dir,
        "base_model_hash": given_hash,
        "task": meta.get("task"),
        "data": meta.get("data"),
        "recipe": meta.get("recipe"),
        "metrics": meta.get("metrics") or {},
        "parents": parents,
        "steps": steps,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "extra": meta.get("extra") or {},
    }
    full["weights_sha256"] = file_sha256(tmp / full["weights_file"])
    full["config_sha256"] = file_sha256(tmp / full["config_file"])
    try:
        json.dumps(full)
    except (TypeError, ValueError) as e:
        raise LibraryError(f"meta for {name!r} is not JSON-serializable: {e}") from None
    return full


def _place_source(tmp: Path, source: Any, meta: Mapping[str, Any]) -> str:
    """Copy/save the adapter files of ``source`` into ``tmp``; return 'lora' or 'sparse'."""
    if isinstance(source, SparseAdapter):
        extra = {"base_model_name_or_path": meta.get("base_model"), "selection": "snip"}
        if "keep_ratio" in meta:
            extra["keep_ratio"] = meta["keep_ratio"]
        source.save(tmp, **extra)
        return "sparse"
    if hasattr(source, "save_pretrained") and hasattr(source, "peft_config"):  # a peft.PeftModel
        scratch = tmp / ".peft"
        adapter = source.active_adapter
        source.save_pretrained(str(scratch), selected_adapters=[adapter], safe_serialization=True)
        found = scratch if (scratch / LORA_CONFIG_FILE).is_file() else scratch / adapter
        source_dir = found
    elif isinstance(source, (str, os.PathLike)):
        source_dir = Path(source)
        if not source_dir.is_dir():
            raise LibraryError(f"adapter source {source_dir} is not a directory")
    else:
        raise LibraryError(f"cannot add a {type(source).__name__}: give a directory, a PeftModel or a SparseAdapter")

    if (source_dir / SPARSE_CONFIG_FILE).is_file():
        files = (SPARSE_CONFIG_FILE, SPARSE_WEIGHTS_FILE)
        kind = "sparse"
    elif (source_dir / LORA_CONFIG_FILE).is_file():
        files = (LORA_CONFIG_FILE, LORA_WEIGHTS_FILE)
        kind = "lora"
        if not (source_dir / LORA_WEIGHTS_FILE).is_file() and (source_dir / "adapter_model.bin").is_file():
            raise LibraryError(
                f"{source_dir} holds adapter_model.bin (pickle), which is not accepted: "
                "re-save it with save_pretrained(..., safe_serialization=True)"
            )
    else:
        raise LibraryError(f"{source_dir} is not an adapter directory: it has neither {LORA_CONFIG_FILE} nor {SPARSE_CONFIG_FILE}")
    for f in files:
        if not (source_dir / f).is_file():
            raise LibraryError(f"{source_dir} lacks {f}")
        shutil.copyfile(source_dir / f, tmp / f)
    if (tmp / ".peft").exists():
        shutil.rmtree(tmp / ".peft")
    return kind


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; LibraryError (naming the file) if it cannot be read."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError, truncated header, bad offsets, ...
        raise LibraryError(f"cannot read {path}: {e}") from None


def _lora_fields(d: Path) -> dict:
    cfg_path = d / LORA_CONFIG_FILE
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LibraryError(f"{cfg_path} is not valid JSON ({e})") from None
    if cfg.get("peft_type") != "LORA":
        raise LibraryError(f"{cfg_path}: peft_type is {cfg.get('peft_type')!r}; only LORA adapters are accepted")
    if cfg.get("use_dora"):
        raise LibraryError(f"{cfg_path}: DoRA adapters are not supported (plain LoRA only)")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise LibraryError(f"{cfg_path}: per-module rank_pattern/alpha_pattern are not supported (one rank and alpha per expert)")
    state = load_safetensors(d / LORA_WEIGHTS_FILE)
    try:
        pairs = lora_pairs(state)
    except ValueError as e:
        raise LibraryError(f"{d / LORA_WEIGHTS_FILE}: {e}") from None
    if not pairs:
        raise LibraryError(f"{d / LORA_WEIGHTS_FILE} holds no LoRA weights")
    r = int(cfg["r"])
    bad = [m for m, (a, _) in pairs.items() if a.shape[0] != r]
    if bad:
        raise LibraryError(f"{d / LORA_WEIGHTS_FILE}: {bad[0]} has rank {pairs[bad[0]][0].shape[0]}, config says r={r}")
    return {
        "adapter_type": "lora",
        "rank": r,
        "alpha": cfg["lora_alpha"],
        "use_rslora": bool(cfg.get("use_rslora", False)),
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in pairs}),
        "num_modules": len(pairs),
        "weights_file": LORA_WEIGHTS_FILE,
        "config_file": LORA_CONFIG_FILE,
        "config_base_model": cfg.get("base_model_name_or_path"),
    }


def _sparse_fields(d: Path) -> dict:
    try:
        masks, _ = read_sparse_dir(d)
    except Exception as e:  # JSON, safetensors or consistency errors
        raise LibraryError(f"{d / SPARSE_WEIGHTS_FILE}: not a readable sparse adapter ({e})") from None
    cfg = json.loads((d / SPARSE_CONFIG_FILE).read_text())
    nnz = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    return {
        "adapter_type": "sparse",
        "rank": None,
        "alpha": None,
        "target_modules": sorted({n.rsplit(".", 2)[-2] if n.count(".") >= 1 else n for n in masks}),
        "num_modules": len(masks),
        "nnz": nnz,
        "keep_ratio": cfg.get("keep_ratio", nnz / total if total else 0.0),
        "weights_file": SPARSE_WEIGHTS_FILE,
        "config_file": SPARSE_CONFIG_FILE,
        "config_base_model": cfg.get("base_model_name_or_path"),
    }


# ---------------------------------------------------------------------------------------------
# durable writes (a whole directory: common.atomic.atomic_directory)
# ---------------------------------------------------------------------------------------------
def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as sorted, indented JSON and fsync the file."""
    try:
        text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    except (TypeError, ValueError) as e:
        raise LibraryError(f"cannot write {path.name}: not JSON-serializable ({e})") from None
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
