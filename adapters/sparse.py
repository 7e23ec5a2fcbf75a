"""Sparse adapters: train a fixed subset of a base model's weight entries.

Following "Exploring Sparse Adapters for Scalable Merging" (Arnob et al. 2025,
https://arxiv.org/abs/2507.07140): the entries are chosen once, before training, by connection
sensitivity (SNIP, Lee et al. 2019, https://arxiv.org/abs/1810.02340: score ``|W ⊙ ∂L/∂W|``), the
global top ``keep_ratio`` of entries across all chosen weights survive, and only those are trained.
Block mode scores ``block_size x block_size`` tiles by the sum of their entries' scores and keeps
whole tiles (friendlier to hardware); how many tiles to keep is ``round(keep_ratio * tiles)``.

On disk (see ``SparseAdapter.save``), a sparse adapter is two files:
- ``sparse_adapter.safetensors``: for each adapted weight ``P`` (a parameter name of the base model,
  e.g. ``model.layers.0.self_attn.q_proj.weight``), ``P.indices`` (int64 [nnz], flat row-major,
  strictly increasing: the mask) and ``P.values`` (float32 [nnz], the delta at those entries);
- ``sparse_config.json``: ``{"adapter_type": "sparse", "format_version": 1, "weights": {P: {"shape": [...],
  "nnz": n}}, "selection": ..., "keep_ratio": ..., "block_size": ..., "base_model_name_or_path": ...}``.
"""

from __future__ import annotations

import difflib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

SPARSE_WEIGHTS_FILE = "sparse_adapter.safetensors"
SPARSE_CONFIG_FILE = "sparse_config.json"
SPARSE_FORMAT_VERSION = 1


def _block_scores(score: torch.Tensor, block: int) -> torch.Tensor:
    """score [out, in] -> per-tile sums [ceil(out/b), ceil(in/b)] (edge tiles may be partial)."""
    out_f, in_f = score.shape
    pad_o, pad_i = (-out_f) % block, (-in_f) % block
    padded = torch.nn.functional.pad(score, (0, pad_i, 0, pad_o))  # zeros add nothing to |score| sums
    no, ni = padded.shape[0] // block, padded.shape[1] // block
    return padded.view(no, block, ni, block).sum(dim=(1, 3))


def connection_sensitivity_mask(
    weights: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor],
    keep_ratio: float,
    block_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """SNIP masks: keep the global top ``keep_ratio`` of entries (or tiles) by ``|W * G|``.

    weights[n], grads[n]: same shape (e.g. [out, in]); keep_ratio in (0, 1].
    Returns {n: bool mask shaped like weights[n]}.

    Unstructured: ``k = max(1, round(keep_ratio * total entries))`` entries survive, compared across
    all weights at once (a weight can end up with none). Block mode (2-D weights only): tiles of
    ``block_size x block_size`` are scored by the sum of their entries' scores and
    ``max(1, round(keep_ratio * total tiles))`` tiles survive whole. Ties are broken by position
    (weights in sorted-name order, then row-major), so the result is deterministic.
    """
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    if block_size is not None and block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    names = sorted(weights)
    if not names:
        raise ValueError("connection_sensitivity_mask: no weights given")
    missing = [n for n in names if n not in grads]
    if missing:
        raise ValueError(f"connection_sensitivity_mask: no gradient for {missing[:5]}")
    scores = []
    for n in names:
        W, G = weights[n], grads[n]
        if W.shape != G.shape:
            raise ValueError(f"connection_sensitivity_mask: {n!r} weight {tuple(W.shape)} vs grad {tuple(G.shape)}")
        s = (W.detach().float() * G.detach().float()).abs()
        if block_size is not None:
            if s.dim() != 2:
                raise ValueError(f"block mode needs 2-D weights; {n!r} has shape {tuple(s.shape)}")
            s = _block_scores(s, block_size)
        scores.append(s)
    flat = torch.cat([s.reshape(-1) for s in scores])
    k = max(1, round(keep_ratio * flat.numel()))
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[order] = True

    masks: dict[str, torch.Tensor] = {}
    offset = 0
    for n, s in zip(names, scores):
        m = keep[offset : offset + s.numel()].view(s.shape)
        offset += s.numel()
        if block_size is not None:
            out_f, in_f = weights[n].shape
            m = m.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)[:out_f, :in_f]
        masks[n] = m.contiguous()
    return masks


def sensitivity_inputs(model: nn.Module, names: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The (weights, grads) for ``connection_sensitivity_mask`` after a ``loss.backward()`` on ``model``."""
    params = dict(model.named_parameters())
    weights, grads = {}, {}
    for n in names:
        p = _lookup(params, n)
        if p.grad is None:
            raise ValueError(f"parameter {n!r} has no gradient: run loss.backward() with it requiring grad first")
        weights[n], grads[n] = p.detach(), p.grad.detach()
    return weights, grads


def _holders(model: nn.Module, param: torch.Tensor) -> list[tuple[nn.Module, str]]:
    """Every (module, attribute) holding ``param`` itself: two for a tied embedding and LM head."""
    return [(m, attr) for m in model.modules() for attr, p in m._parameters.items() if p is param]


def _lookup(params: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in params:
        close = difflib.get_close_matches(name, list(params), n=3)
        raise KeyError(f"model has no parameter {name!r}" + (f"; did you mean {close}?" if close else ""))
    return params[name]


@torch.no_grad()
def apply_sparse_delta(model: nn.Module, deltas: Mapping[str, torch.Tensor], scale: float = 1.0) -> nn.Module:
    """Add ``scale * deltas[name]`` (dense, shaped like the parameter) into the model's parameters, in place."""
    params = dict(model.named_parameters())
    for name, delta in deltas.items():
        p = _lookup(params, name)
        if p.shape != delta.shape:
            raise ValueError(f"apply_sparse_delta: {name!r} is {tuple(p.shape)} but the delta is {tuple(delta.shape)}")
        p.add_(delta.to(device=p.device, dtype=p.dtype), alpha=scale)
    return model


class _SparseDelta(nn.Module):
    """A weight parametrization ``W -> W + scatter(values at indices)``: only ``values`` is trainable."""

    def __init__(self, shape: torch.Size, indices: torch.Tensor, values: torch.Tensor | None = None):
        super().__init__()
        self.shape = torch.Size(shape)
        self.register_buffer("indices", indices.to(torch.int64).contiguous())  # [nnz], flat row-major
        init = torch.zeros(indices.numel()) if values is None else values.detach().float().clone()
        self.values = nn.Parameter(init)  # [nnz]
        self.enabled = True  # False: the weight reads as the base W (a reference model without a copy)

    def dense(self) -> torch.Tensor:
        """The delta as a dense tensor shaped like the weight (differentiable in ``values``)."""
        flat = torch.zeros(self.shape.numel(), dtype=self.values.dtype, device=self.values.device)
        return flat.scatter(0, self.indices, self.values).view(self.shape)

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        return W + self.dense().to(W.dtype) if self.enabled else W


class SparseAdapter(nn.Module):
    """Masked trainable deltas for chosen weights of a base model; the masks are fixed at construction.

    >>> # masks = connection_sensitivity_mask(*sensitivity_inputs(model, names), keep_ratio=0.01)
    >>> # adapter = SparseAdapter(masks); adapter.attach(model)   # train: only adapter values move
    >>> # adapter.detach(model); adapter.save(dir)                # or detach(model, merge=True)

    ``attach`` registers a parametrization on each weight (``W_eff = W + delta``), so the model's own
    forward is unchanged and gradients reach only ``values`` (the masked entries, by construction).
    """

    def __init__(self, masks: Mapping[str, torch.Tensor], values: Mapping[str, torch.Tensor] | None = None):
        super().__init__()
        if not masks:
            raise ValueError("SparseAdapter needs at least one masked weight")
        self.names = sorted(masks)
        deltas = []
        for n in self.names:
            mask = masks[n].bool()
            idx = mask.reshape(-1).nonzero().squeeze(1)
            v = None
            if values is not None and n in values:
                v = values[n]
                if v.shape == mask.shape:  # a dense delta: take the masked entries
                    v = v.reshape(-1)[idx]
                elif v.numel() != idx.numel():
                    raise ValueError(f"SparseAdapter: {n!r} has {idx.numel()} masked entries but {v.numel()} values")
            deltas.append(_SparseDelta(mask.shape, idx, v))
        self.deltas = nn.ModuleList(deltas)
        self._attached: list[list[tuple[nn.Module, str]]] = []

    # ---- views -------------------------------------------------------------------------------
    def masks(self) -> dict[str, torch.Tensor]:
        """{weight: bool mask [out, in]}."""
        out = {}
        for n, d in zip(self.names, self.deltas):
            m = torch.zeros(d.shape.numel(), dtype=torch.bool)
            m[d.indices.cpu()] = True
            out[n] = m.view(d.shape)
        return out

    def dense_deltas(self) -> dict[str, torch.Tensor]:
        """{weight: dense float32 delta [out, in]}, detached."""
        return {n: d.dense().detach().float() for n, d in zip(self.names, self.deltas)}

    def num_trainable(self) -> int:
        return sum(d.values.numel() for d in self.deltas)

    # ---- attaching to a model ---------------------------------------------------------------
    def attach(self, model: nn.Module, freeze_base: bool = True) -> nn.Module:
        """Parametrize each adapted weight of ``model`` as ``W + delta``; freeze every other parameter."""
        if self._attached:
            raise RuntimeError("SparseAdapter is already attached; detach it first")
        params = dict(model.named_parameters())
        for n, d in zip(self.names, self.deltas):
            p = _lookup(params, n)
            if p.shape != d.shape:
                raise ValueError(f"SparseAdapter: {n!r} is {tuple(p.shape)} in the model but {tuple(d.shape)} in the adapter")
        if freeze_base:
            for p in model.parameters():
                p.requires_grad_(False)
        for n, d in zip(self.names, self.deltas):
            holders = _holders(model, _lookup(params, n))  # a tied weight: the embedding and the LM head
            d.to(_lookup(params, n).device)
            for module, attr in holders:
                parametrize.register_parametrization(module, attr, d)
            self._attached.append(holders)
        for d in self.deltas:
            d.values.requires_grad_(True)
        return model

    def detach(self, model: nn.Module, merge: bool = False) -> nn.Module:
        """Remove the parametrizations; ``merge=True`` leaves ``W + delta`` in the weights, else the base ``W``.
        A weight several modules shared stays shared."""
        for holders in self._attached:
            (first, first_attr), rest = holders[0], holders[1:]
            parametrize.remove_parametrizations(first, first_attr, leave_parametrized=merge)
            for module, attr in rest:
                parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
                setattr(module, attr, getattr(first, first_attr))
        self._attached = []
        return model

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Inside the block the attached model computes with its base weights only."""
        for d in self.deltas:
            d.enabled = False
        try:
            yield
        finally:
            for d in self.deltas:
                d.enabled = True

    # ---- files --------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """The safetensors payload: ``P.indices`` int64 [nnz] and ``P.values`` float32 [nnz] per weight."""
        out = {}
        for n, d in zip(self.names, self.deltas):
            out[f"{n}.indices"] = d.indices.detach().cpu().contiguous()
            out[f"{n}.values"] = d.values.detach().float().cpu().contiguous()
        return out

    def config(self, **extra) -> dict:
        cfg = {
            "adapter_type": "sparse",
            "format_version": SPARSE_FORMAT_VERSION,
            "weights": {n: {"shape": list(d.shape), "nnz": int(d.indices.numel())} for n, d in zip(self.names, self.deltas)},
        }
        cfg.update(extra)
        return cfg

    def save(self, directory: str | os.PathLike, **config_extra) -> Path:
        """Write ``sparse_adapter.safetensors`` + ``sparse_config.json`` into ``directory`` (created).

        ``config_extra`` goes into the JSON config, e.g. ``selection="snip", keep_ratio=0.01,
        block_size=None, base_model_name_or_path=...``.
        """
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file(self.tensors(), str(d / SPARSE_WEIGHTS_FILE), metadata={"format": "pt", "adapter_type": "sparse"})
        (d / SPARSE_CONFIG_FILE).write_text(json.dumps(self.config(**config_extra), indent=2, sort_keys=True) + "\n")
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "SparseAdapter":
        masks, values = read_sparse_dir(directory)
        return cls(masks, values)


def read_sparse_dir(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Read a sparse adapter directory into ({weight: bool mask}, {weight: dense float32 delta}).

    Raises ValueError naming the file if the config and tensors disagree.
    """
    from safetensors.torch import load_file

    d = Path(directory)
    cfg_path, w_path = d / SPARSE_CONFIG_FILE, d / SPARSE_WEIGHTS_FILE
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("adapter_type") != "sparse" or "weights" not in cfg:
        raise ValueError(f"{cfg_path}: not a sparse adapter config (needs adapter_type 'sparse' and 'weights')")
    tensors = load_file(str(w_path))
    masks, deltas = {}, {}
    for n, spec in cfg["weights"].items():
        shape = torch.Size(spec["shape"])
        try:
            idx, vals = tensors[f"{n}.indices"], tensors[f"{n}.values"]
        except KeyError as e:
            raise ValueError(f"{w_path}: missing tensor {e.args[0]!r} listed in {SPARSE_CONFIG_FILE}") from None
        if idx.dim() != 1 or idx.shape != vals.shape:
            raise ValueError(f"{w_path}: {n!r} indices {tuple(idx.shape)} and values {tuple(vals.shape)} must be equal 1-D")
        if idx.numel() and (idx.min() < 0 or idx.max() >= shape.numel() or (idx[1:] <= idx[:-1]).any()):
            raise ValueError(f"{w_path}: {n!r} indices must be strictly increasing and inside {tuple(shape)}")
        mask = torch.zeros(shape.numel(), dtype=torch.bool)
        mask[idx] = True
        delta = torch.zeros(shape.numel(), dtype=torch.float32)
        delta[idx] = vals.float()
        masks[n], deltas[n] = mask.view(shape), delta.view(shape)
    extra = set(tensors) - {f"{n}.{s}" for n in cfg["weights"] for s in ("indices", "values")}
    if extra:
        raise ValueError(f"{w_path}: tensors not listed in {SPARSE_CONFIG_FILE}: {sorted(extra)[:5]}")
    return masks, deltas
