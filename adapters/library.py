"""The adapter library on disk: a directory of named experts trained on one base model.

Layout (safetensors + JSON only; nothing is ever unpickled)::

    <root>/<name>/adapter_model.safetensors   LoRA: PEFT's own files, loadable by PeftModel.from_pretrained
    <root>/<name>/adapter_config.json
    <root>/<name>/sparse_adapter.safetensors  sparse: per-weight indices + values (see adapters/sparse.py)
    <root>/<name>/sparse_config.json
    <root>/<name>/meta.json                   provenance, below

``meta.json`` fields: ``name``, ``format_version``, ``adapter_type`` (lora|sparse), ``base_model``
(the path it was trained from), ``base_model_hash`` (``base_model_hash(dir)``), ``rank``, ``alpha``,
``use_rslora``, ``target_modules`` (leaf module names, from the weights), ``nnz`` and ``keep_ratio``
(sparse), ``task``, ``data``, ``recipe``, ``metrics``, ``parents``, ``steps``, ``created`` (UTC ISO),
``weights_file`` + ``weights_sha256`` and ``config_file`` + ``config_sha256`` (checked by ``get``),
``extra`` (free-form).

Writes are atomic: an expert is assembled in ``<root>/.tmp-*`` and renamed into place, so a reader
sees either no expert or a complete one; a failed ``add`` removes its temp directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

# One expert's files, hashes and derived meta are handled in adapters.files; callers may import
# LibraryError, base_model_hash, file_sha256, lora_pairs, ... from here too (this module uses them).
from adapters.files import (
    CHECKED_META_FIELDS,
    LORA_CONFIG_FILE,
    LORA_WEIGHTS_FILE,
    USER_META_FIELDS,
    LibraryError,
    assemble_expert,
    base_model_hash,
    file_sha256,
    load_safetensors,
    lora_pairs,
    lora_scaling,
    pairs_to_state,
    write_json,
)
from adapters.sparse import SparseAdapter, read_sparse_dir
from common.atomic import atomic_directory

META_FILE = "meta.json"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,99}$")


# ---------------------------------------------------------------------------------------------
# names
# ---------------------------------------------------------------------------------------------
def validate_name(name: str) -> str:
    """An expert name: 1-100 chars of ``A-Z a-z 0-9 . _ + -``, starting alphanumeric, no ``..``."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise LibraryError(
            f"invalid expert name {name!r}: use 1-100 characters from A-Z a-z 0-9 . _ + -, "
            "starting with a letter or digit, without '..' or path separators"
        )
    return name


# ---------------------------------------------------------------------------------------------
# Expert
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Expert:
    """One library entry: its name, directory and ``meta.json`` contents."""

    name: str
    path: Path
    meta: dict

    @property
    def adapter_type(self) -> str:
        return self.meta["adapter_type"]

    @property
    def rank(self) -> int | None:
        return self.meta.get("rank")

    @property
    def alpha(self) -> float | None:
        return self.meta.get("alpha")

    @property
    def target_modules(self) -> list[str]:
        return list(self.meta.get("target_modules", []))

    @property
    def base_model_hash(self) -> str:
        return self.meta["base_model_hash"]

    @property
    def weights_path(self) -> Path:
        return self.path / self.meta["weights_file"]

    @property
    def config_path(self) -> Path:
        return self.path / self.meta["config_file"]

    @property
    def scaling(self) -> float:
        """alpha/rank (alpha/sqrt(rank) with rsLoRA); 1.0 for sparse adapters."""
        if self.adapter_type != "lora":
            return 1.0
        return lora_scaling(self.meta["alpha"], self.meta["rank"], self.meta.get("use_rslora", False))


# ---------------------------------------------------------------------------------------------
# the library
# ---------------------------------------------------------------------------------------------
class AdapterLibrary:
    """A directory of experts. ``AdapterLibrary(root, create=True)`` makes the directory if missing."""

    def __init__(self, root: str | os.PathLike, create: bool = False):
        self.root = Path(root)
        if not self.root.exists():
            if not create:
                raise LibraryError(f"adapter library {self.root} does not exist (create it with create=True, or --create on the CLI)")
            self.root.mkdir(parents=True)
        if not self.root.is_dir():
            raise LibraryError(f"adapter library {self.root} is not a directory")

    # ---- reading ---------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def list(self) -> list[Expert]:
        """All experts, sorted by name (meta read, content hashes not checked: see ``get``)."""
        return [self._read(n) for n in self.names()]

    def get(self, name: str, verify: bool = True) -> Expert:
        """The expert ``name``; with ``verify`` (default) its files are checked against ``meta.json``'s hashes."""
        expert = self._read(name)
        if verify:
            for fname_key, hash_key in (("weights_file", "weights_sha256"), ("config_file", "config_sha256")):
                path = expert.path / expert.meta[fname_key]
                if not path.is_file():
                    raise LibraryError(f"expert {name!r}: file {path} is missing")
                actual = file_sha256(path)
                if actual != expert.meta[hash_key]:
                    raise LibraryError(
                        f"expert {name!r}: file {path} is corrupt or was modified "
                        f"(sha256 {actual[:12]}… but meta.json records {expert.meta[hash_key][:12]}…)"
                    )
        return expert

    def __contains__(self, name: str) -> bool:
        try:
            validate_name(name)
        except LibraryError:
            return False
        return (self.root / name / META_FILE).is_file()

    def _read(self, name: str) -> Expert:
        validate_name(name)
        path = self.root / name
        if not path.is_dir():
            close = difflib.get_close_matches(name, self.names(), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f" (library has {len(self.names())} experts)"
            raise LibraryError(f"no expert named {name!r} in {self.root}{hint}")
        meta_path = path / META_FILE
        try:
            meta = json.loads(meta_path.read_text())
        except FileNotFoundError:
            raise LibraryError(f"expert {name!r}: {meta_path} is missing") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LibraryError(f"expert {name!r}: {meta_path} is not valid JSON ({e})") from None
        required = ("adapter_type", "base_model_hash", "weights_file", "weights_sha256", "config_file", "config_sha256")
        missing = [k for k in required if k not in meta] if isinstance(meta, dict) else list(required)
        if missing:
            raise LibraryError(f"expert {name!r}: {meta_path} lacks {missing}")
        return Expert(name=name, path=path, meta=meta)

    def load_lora_state(self, name: str) -> dict[str, torch.Tensor]:
        """The verified PEFT state dict of a LoRA expert (keys ``...<module>.lora_A.weight`` etc.)."""
        expert = self.get(name)
        if expert.adapter_type != "lora":
            raise LibraryError(f"expert {name!r} is a {expert.adapter_type} adapter, not a LoRA")
        return load_safetensors(expert.weights_path)

    def lora_pairs(self, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{module: (A [r, in], B [out, r])} of a LoRA expert (scale not applied: see ``Expert.scaling``)."""
        return lora_pairs(self.load_lora_state(name))

    def load_sparse(self, name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """({weight: bool mask}, {weight: dense float32 delta}) of a verified sparse expert."""
        expert = self.get(name)
        if expert.adapter_type != "sparse":
            raise LibraryError(f"expert {name!r} is a {expert.adapter_type} adapter, not a sparse one")
        try:
            return read_sparse_dir(expert.path)
        except Exception as e:  # safetensors / JSON / consistency errors
            raise LibraryError(f"expert {name!r}: cannot read {expert.weights_path}: {e}") from None

    def check_compatible(self, name: str, base_model_dir: str | os.PathLike) -> Expert:
        """Raise LibraryError unless expert ``name`` was trained on the model in ``base_model_dir``."""
        expert = self.get(name, verify=False)
        actual = base_model_hash(base_model_dir)
        if actual != expert.base_model_hash:
            raise LibraryError(
                f"expert {name!r} was trained on another base model: it records {expert.meta.get('base_model')} "
                f"({expert.base_model_hash[:19]}…), but {base_model_dir} hashes to {actual[:19]}…"
            )
        return expert

    def check_mergeable(self, names: Sequence[str]) -> list[Expert]:
        """Verify experts that are to be combined: same type, same base model, and for LoRA the same
        rank and target modules. Returns them in order."""
        if not names:
            raise LibraryError("no experts given")
        if len(set(names)) != len(names):
            raise LibraryError(f"an expert is named twice in {list(names)}")
        experts = [self.get(n) for n in names]
        ref = experts[0]
        for e in experts[1:]:
            if e.adapter_type != ref.adapter_type:
                raise LibraryError(f"cannot combine {ref.name!r} ({ref.adapter_type}) with {e.name!r} ({e.adapter_type})")
            if e.base_model_hash != ref.base_model_hash:
                raise LibraryError(
                    f"{e.name!r} and {ref.name!r} were trained on different base models "
                    f"({e.base_model_hash[:19]}… vs {ref.base_model_hash[:19]}…)"
                )
            if ref.adapter_type == "lora":
                if e.rank != ref.rank:
                    raise LibraryError(f"rank mismatch: {ref.name!r} has rank {ref.rank}, {e.name!r} has rank {e.rank}")
                if sorted(e.target_modules) != sorted(ref.target_modules):
                    raise LibraryError(
                        f"target-module mismatch: {ref.name!r} adapts {sorted(ref.target_modules)}, "
                        f"{e.name!r} adapts {sorted(e.target_modules)}"
                    )
        return experts

    # ---- writing ---------------------------------------------------------------------------
    def add(self, name: str, source: Any, meta: Mapping[str, Any] | None = None, replace: bool = False) -> Expert:
        """Add an expert atomically and return it (``replace=True``: a newer version of an existing one).

        source: a directory with PEFT LoRA files (``adapter_config.json`` + ``adapter_model.safetensors``)
        or sparse files (``sparse_config.json`` + ``sparse_adapter.safetensors``), a ``peft.PeftModel``
        (its active adapter is saved), or a ``SparseAdapter``.
        meta: provenance, keys from ``USER_META_FIELDS``; it must give ``base_model`` (an existing model
        directory, hashed here) or ``base_model_hash``. ``adapter_type``, ``rank``, ``alpha``,
        ``target_modules``, ``keep_ratio`` may be stated too and must then agree with the files.
        """
        validate_name(name)
        meta = dict(meta or {})
        unknown = sorted(set(meta) - set(USER_META_FIELDS) - set(CHECKED_META_FIELDS))
        if unknown:
            valid = USER_META_FIELDS + CHECKED_META_FIELDS
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k, valid, n=1)
                hints.append(f"{k!r} (did you mean {close[0]!r}?)" if close else repr(k))
            raise LibraryError(f"unknown meta field(s) {', '.join(hints)}; valid: {', '.join(valid)} (free-form data goes in 'extra')")
        final = self.root / name
        if final.exists() and not replace:
            raise LibraryError(f"expert {name!r} already exists in {self.root}; remove it first or choose another name")

        # Assembled in ``.tmp-<name>-*`` (hidden from listings); with ``replace`` the old version moves aside to
        # ``.trash-<name>-*`` while the new one takes its name. Without it the rename fails if ``final`` appeared
        # meanwhile (a non-empty directory).
        assembled = False
        try:
            with atomic_directory(final, replace=replace, durable=True) as tmp:
                full_meta = assemble_expert(tmp, name, source, meta)
                write_json(tmp / META_FILE, full_meta)
                assembled = True  # an OSError from here on is the move into place
        except OSError as e:
            if not assembled:
                raise
            raise LibraryError(f"cannot move expert {name!r} into place at {final}: {e}") from None
        return Expert(name=name, path=final, meta=full_meta)

    def remove(self, name: str) -> None:
        """Delete an expert (renamed aside first, so it vanishes from listings at once)."""
        validate_name(name)
        path = self.root / name
        if not path.is_dir():
            self._read(name)  # raises the unknown-name error with close matches
        trash = self.root / f".trash-{name}-{uuid.uuid4().hex[:8]}"
        os.rename(path, trash)  # works for a damaged expert too (meta.json not needed)
        shutil.rmtree(trash, ignore_errors=True)

    def export(self, name: str, dest: str | os.PathLike) -> Path:
        """Copy a verified expert to a new directory ``dest`` (a PEFT-loadable dir for LoRA, plus meta.json)."""
        expert = self.get(name)
        dest = Path(dest)
        if dest.exists():
            raise LibraryError(f"export destination {dest} already exists")
        if not dest.parent.is_dir():
            raise LibraryError(f"export destination's parent {dest.parent} does not exist")
        with atomic_directory(dest) as tmp:
            for f in (expert.meta["weights_file"], expert.meta["config_file"], META_FILE):
                shutil.copyfile(expert.path / f, tmp / f)
            if file_sha256(tmp / expert.meta["weights_file"]) != expert.meta["weights_sha256"]:
                raise LibraryError(f"export of {name!r}: copy of {expert.weights_path} does not match its hash")
        return dest

    def merge(
        self,
        names: Sequence[str],
        new_name: str,
        weights: Sequence[float] | None = None,
        rank: int | None = None,
        meta: Mapping[str, Any] | None = None,
        into: "AdapterLibrary | None" = None,
    ) -> Expert:
        """Merge experts into a new one and add it (to ``into``, another library, when given).

        LoRA: the weighted sum of the deltas ``w_e · s_e · B_e A_e`` (``weights`` default uniform 1/E,
        used as given otherwise), re-factored by truncated SVD to rank ``rank`` (default: the experts'
        rank) and saved as a PEFT LoRA with ``lora_alpha = r`` (scale 1). ``metrics.refactor_rel_error``
        records ``‖Δ - BA‖_F / ‖Δ‖_F`` over all modules: what the re-factoring lost.
        Sparse: ``merge_sparse`` (overlaps averaged), stored on the union of the masks.
        """
        experts = self.check_mergeable(names)
        ref = experts[0]
        meta = dict(meta or {})
        meta.setdefault("base_model", ref.meta.get("base_model"))
        meta.setdefault("base_model_hash", ref.base_model_hash)
        meta.setdefault("task", "merge of " + ", ".join(names))
        meta.setdefault("parents", list(names))
        if ref.adapter_type == "sparse":
            if weights is not None or rank is not None:
                raise LibraryError("sparse merging takes no weights or rank (overlaps are averaged)")
            return self._merge_sparse(names, new_name, meta, into or self)
        return self._merge_lora(experts, new_name, weights, rank, meta, into or self)

    def _merge_sparse(self, names: Sequence[str], new_name: str, meta: dict, into: "AdapterLibrary") -> Expert:
        from adapters.merge import merge_sparse

        loaded = [self.load_sparse(n) for n in names]
        merged = merge_sparse([d for _, d in loaded], [m for m, _ in loaded])
        union = {w: torch.stack([m[w] for m, _ in loaded if w in m]).any(0) for w in merged}
        meta.setdefault("recipe", {"method": "sparse_overlap_average"})
        return into.add(new_name, SparseAdapter(union, merged), meta)

    def _merge_lora(self, experts: list[Expert], new_name: str, weights: Sequence[float] | None, rank: int | None,
                    meta: dict, into: "AdapterLibrary") -> Expert:
        from safetensors.torch import save_file

        from adapters.merge import merge_lora_weighted, refactor_to_lora

        n, ref = len(experts), experts[0]
        weights = [1.0 / n] * n if weights is None else [float(w) for w in weights]
        if len(weights) != n:
            raise LibraryError(f"{n} experts but {len(weights)} weights")
        rank = int(rank or ref.rank)
        pairs = [self.lora_pairs(e.name) for e in experts]
        try:
            deltas = merge_lora_weighted(pairs, weights, [e.scaling for e in experts])
        except ValueError as e:
            raise LibraryError(f"cannot merge {[e.name for e in experts]}: {e}") from None
        new_pairs, err2, tot2 = {}, 0.0, 0.0
        for m, d in deltas.items():
            A, B = refactor_to_lora(d, rank)
            dtype = pairs[0][m][0].dtype
            new_pairs[m] = (A.to(dtype), B.to(dtype))
            err2 += float((d - B @ A).pow(2).sum())
            tot2 += float(d.pow(2).sum())
        meta.setdefault("recipe", {"method": "lora_delta_average", "weights": weights, "rank": rank})
        meta["metrics"] = {**(meta.get("metrics") or {}), "refactor_rel_error": math.sqrt(err2 / tot2) if tot2 > 0 else 0.0}
        config = json.loads(ref.config_path.read_text())
        config.update(r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={})
        src = self.root / f".tmp-src-{uuid.uuid4().hex[:8]}"
        src.mkdir()
        try:
            save_file(pairs_to_state(new_pairs), str(src / LORA_WEIGHTS_FILE), metadata={"format": "pt"})
            write_json(src / LORA_CONFIG_FILE, config)
            return into.add(new_name, src, meta)
        finally:
            shutil.rmtree(src, ignore_errors=True)
