"""Merging adapters: pure tensor functions, no I/O.

Axis letters: ``E`` experts, ``r`` LoRA rank, ``out`` / ``in`` the features of the adapted Linear
(its weight is ``[out, in]``, PEFT's and torch's convention).

LoRA merging averages the **deltas** ``ΔW_e = s_e · B_e @ A_e`` (``s_e = alpha/rank``), not the
factors: ``mean(B) @ mean(A)`` is a different matrix (it mixes cross terms ``B_i @ A_j``; with
independently trained experts those are noise). The merged delta generally has rank up to
``E·r``; ``refactor_to_lora`` brings it back to a rank-``r`` LoRA by truncated SVD (the best rank-r
approximation in Frobenius norm, Eckart–Young), so the result can be saved and served as one PEFT LoRA.

Sparse merging follows "Exploring Sparse Adapters for Scalable Merging" (Arnob et al. 2025,
https://arxiv.org/abs/2507.07140): deltas are summed and each entry is divided by how many adapters
touch it, so an entry trained by one adapter keeps its full value and overlaps are averaged.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

LoraPair = tuple[torch.Tensor, torch.Tensor]  # (A [r, in], B [out, r])


def lora_delta(A: torch.Tensor, B: torch.Tensor, alpha: float, rank: int) -> torch.Tensor:
    """The weight change of one LoRA module, PEFT's convention (no rsLoRA).

    A: [r, in], B: [out, r]  ->  (alpha / rank) * B @ A : [out, in]
    """
    if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"lora_delta: expected A [r, in] and B [out, r], got A {tuple(A.shape)} and B {tuple(B.shape)}")
    if rank <= 0:
        raise ValueError(f"lora_delta: rank must be positive, got {rank}")
    return (alpha / rank) * (B.float() @ A.float())


def _check_same_modules(experts: Sequence[Mapping[str, object]]) -> list[str]:
    if not experts:
        raise ValueError("merge: no experts given")
    names = sorted(experts[0])
    for i, e in enumerate(experts[1:], start=1):
        if sorted(e) != names:
            missing = sorted(set(names) - set(e))
            extra = sorted(set(e) - set(names))
            raise ValueError(f"merge: expert {i} adapts other modules than expert 0 (missing {missing[:5]}, extra {extra[:5]})")
    return names


def merge_lora_weighted(
    experts: Sequence[Mapping[str, LoraPair]],
    weights: Sequence[float],
    scalings: Sequence[float] | None = None,
) -> dict[str, torch.Tensor]:
    """Weighted sum of LoRA deltas, module by module.

    experts[e][module] = (A [r_e, in], B [out, r_e]); weights: [E]; scalings: [E], each expert's
    ``alpha/rank`` (default 1.0, i.e. the factors already carry the scale).
    Returns {module: sum_e weights[e] * scalings[e] * B_e @ A_e  [out, in]} in float32.

    Weights are used as given: pass weights that sum to 1 for a weighted average (task arithmetic
    with other sums is allowed). Ranks may differ between experts; the modules must be the same.
    """
    names = _check_same_modules(experts)
    if len(weights) != len(experts):
        raise ValueError(f"merge: {len(experts)} experts but {len(weights)} weights")
    scalings = [1.0] * len(experts) if scalings is None else list(scalings)
    if len(scalings) != len(experts):
        raise ValueError(f"merge: {len(experts)} experts but {len(scalings)} scalings")
    out: dict[str, torch.Tensor] = {}
    for name in names:
        total = None
        for expert, w, s in zip(experts, weights, scalings):
            A, B = expert[name]
            d = float(w) * float(s) * (B.float() @ A.float())  # [out, in]
            if total is not None and d.shape != total.shape:
                raise ValueError(f"merge: module {name!r} has delta shape {tuple(d.shape)} in one expert and "
                                 f"{tuple(total.shape)} in another")
            total = d if total is None else total + d
        out[name] = total
    return out


def merge_lora_uniform(
    experts: Sequence[Mapping[str, LoraPair]], scalings: Sequence[float] | None = None
) -> dict[str, torch.Tensor]:
    """Uniform average of LoRA deltas: ``merge_lora_weighted`` with weights 1/E. Returns {module: [out, in]}."""
    n = len(experts)
    if n == 0:
        raise ValueError("merge: no experts given")
    return merge_lora_weighted(experts, [1.0 / n] * n, scalings)


def refactor_to_lora(delta: torch.Tensor, rank: int) -> LoraPair:
    """Best rank-``rank`` factorization of a delta, as a LoRA with scale 1 (save it with ``lora_alpha = r``).

    delta: [out, in]  ->  (A [rank, in], B [out, rank]) with B @ A the truncated SVD of delta.
    The singular values are split evenly, B = U·sqrt(S), A = sqrt(S)·Vᵀ, so neither factor dominates
    if the result is trained further. If ``rank`` exceeds min(out, in) the factors are zero-padded.
    """
    if delta.dim() != 2:
        raise ValueError(f"refactor_to_lora: expected a [out, in] matrix, got shape {tuple(delta.shape)}")
    if rank <= 0:
        raise ValueError(f"refactor_to_lora: rank must be positive, got {rank}")
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)  # U [out, k], S [k], Vh [k, in]
    k = min(rank, S.shape[0])
    root = S[:k].sqrt()
    B = U[:, :k] * root  # [out, k]
    A = root[:, None] * Vh[:k]  # [k, in]
    if k < rank:
        A = torch.cat([A, A.new_zeros(rank - k, A.shape[1])])
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - k)], dim=1)
    return A.contiguous(), B.contiguous()


def merge_sparse(
    deltas: Sequence[Mapping[str, torch.Tensor]], masks: Sequence[Mapping[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Merge sparse adapters: per entry, the mean over the adapters that touch it.

    deltas[e][weight] : [out, in] (zero outside the mask); masks[e][weight] : [out, in] bool.
    Returns {weight: sum_e mask_e * delta_e / max(1, sum_e mask_e)} over the union of weight names;
    entries touched by no adapter stay 0. An adapter that does not name a weight touches none of it.
    The mask, not the value, says whether an entry is touched (a trained entry may be exactly 0).
    """
    if len(deltas) != len(masks):
        raise ValueError(f"merge_sparse: {len(deltas)} deltas but {len(masks)} masks")
    if not deltas:
        raise ValueError("merge_sparse: no adapters given")
    out: dict[str, torch.Tensor] = {}
    for name in sorted(set().union(*[set(d) for d in deltas])):
        total = count = None
        for d, m in zip(deltas, masks):
            if name not in d:
                continue
            if name not in m:
                raise ValueError(f"merge_sparse: weight {name!r} has a delta but no mask")
            delta, mask = d[name].float(), m[name].bool()
            if delta.shape != mask.shape:
                raise ValueError(f"merge_sparse: {name!r} delta {tuple(delta.shape)} vs mask {tuple(mask.shape)}")
            if total is not None and delta.shape != total.shape:
                raise ValueError(f"merge_sparse: {name!r} has shape {tuple(delta.shape)} in one adapter and "
                                 f"{tuple(total.shape)} in another")
            contrib = torch.where(mask, delta, torch.zeros_like(delta))
            total = contrib if total is None else total + contrib
            count = mask.float() if count is None else count + mask.float()
        out[name] = total / count.clamp(min=1.0)
    return out
