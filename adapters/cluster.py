"""Clustering a library of LoRA experts by parameter similarity.

"Towards Modular LLMs by Building and Reusing a Library of LoRAs" (Ostapenko et al. 2024,
https://arxiv.org/abs/2405.11157) groups tasks by the cosine similarity of their LoRA parameters
(model-based clustering, MBC) and trains one expert per group. Two vectorizations are offered:

- ``"params"`` (the paper's): all A and B factors of an expert, flattened and concatenated. Cheap, but
  it sees the factorization, not the function: ``B A = (B M)(M⁻¹ A)`` for any invertible M, so it
  is meaningful when experts share an initialization (the usual case: PEFT's seeded init, B = 0).
- ``"delta"``: the deltas ``B A`` of all modules. Invariant to the factorization. Inner products are
  computed without forming ``B A``: ``<B₁A₁, B₂A₂>_F = sum((B₁ᵀB₂) ⊙ (A₁A₂ᵀ))`` ([r, r] matrices).
  Each expert's alpha/rank multiplies all its modules alike, so cosines ignore it.

k-means runs on the cosine-similarity (Gram) matrix of the unit-normalized vectors (kernel k-means):
the same result as k-means on the normalized vectors, with no dependency beyond torch.
Axis letters: ``n`` experts.
"""

from __future__ import annotations

from typing import Mapping

import torch

from adapters.files import lora_pairs

LoraState = Mapping[str, torch.Tensor]  # a PEFT LoRA state dict


def similarity_matrix(states: Mapping[str, LoraState], mode: str = "params") -> tuple[list[str], torch.Tensor]:
    """Cosine similarity between experts. states: {name: LoRA state} -> (sorted names, S [n, n] float64).

    All experts must adapt the same modules with the same shapes (mode "params") or the same modules
    (mode "delta"; ranks may differ). An all-zero expert (an untrained LoRA) raises ValueError.
    """
    names = sorted(states)
    if not names:
        raise ValueError("similarity_matrix: no adapters given")
    if mode == "params":
        keys = sorted(states[names[0]])
        vecs = []
        for n in names:
            if sorted(states[n]) != keys:
                raise ValueError(f"similarity_matrix: {n!r} has other tensors than {names[0]!r}")
            bad = [k for k in keys if states[n][k].shape != states[names[0]][k].shape]
            if bad:
                raise ValueError(f"similarity_matrix: {n!r} and {names[0]!r} differ in the shape of {bad[0]!r}")
            vecs.append(torch.cat([states[n][k].reshape(-1).double() for k in keys]))
        X = torch.stack(vecs)  # [n, D]
        gram = X @ X.T  # [n, n]
    elif mode == "delta":
        pairs = [lora_pairs(states[n]) for n in names]
        modules = sorted(pairs[0])
        for n, p in zip(names, pairs):
            if sorted(p) != modules:
                raise ValueError(f"similarity_matrix: {n!r} adapts other modules than {names[0]!r}")
        gram = torch.zeros(len(names), len(names), dtype=torch.float64)
        for m in modules:
            As = [p[m][0].double() for p in pairs]  # [r_i, in]
            Bs = [p[m][1].double() for p in pairs]  # [out, r_i]
            for i in range(len(names)):
                for j in range(i, len(names)):
                    v = ((Bs[i].T @ Bs[j]) * (As[i] @ As[j].T)).sum()  # <B_i A_i, B_j A_j>_F
                    gram[i, j] += v
                    if i != j:
                        gram[j, i] += v
    else:
        raise ValueError(f"similarity_matrix: mode must be 'params' or 'delta', got {mode!r}")
    norms = gram.diagonal().clamp(min=0).sqrt()  # [n]
    zero = [n for n, v in zip(names, norms.tolist()) if v == 0]
    if zero:
        raise ValueError(f"similarity_matrix: adapters with all-zero {mode} have no direction: {zero}")
    return names, gram / (norms[:, None] * norms[None, :])


def kernel_kmeans(S: torch.Tensor, k: int, seed: int = 0, n_init: int = 10, max_iter: int = 100) -> torch.Tensor:
    """k-means from a Gram matrix S [n, n] (cosine similarities of unit vectors) -> labels [n] int64.

    dist(i, c) = S_ii - 2·mean_{j∈c} S_ij + mean_{j,l∈c} S_jl, the squared distance to the centroid.
    k-means++ seeding from ``torch.Generator().manual_seed(seed)``; the best of ``n_init`` runs (lowest
    inertia) wins; labels are renumbered by first appearance, so equal partitions give equal labels.
    """
    n = S.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"kernel_kmeans: need 1 <= k <= n adapters, got k={k}, n={n}")
    S = S.double()
    diag = S.diagonal()
    pair_dist = (diag[:, None] + diag[None, :] - 2 * S).clamp(min=0)  # [n, n] squared distances
    gen = torch.Generator().manual_seed(seed)
    best, best_inertia = None, float("inf")
    for _ in range(n_init):
        centers = [int(torch.randint(n, (1,), generator=gen))]
        while len(centers) < k:
            d = pair_dist[:, centers].min(dim=1).values  # [n]
            if d.sum() <= 0:
                rest = [i for i in range(n) if i not in centers]
                centers.append(rest[int(torch.randint(len(rest), (1,), generator=gen))])
            else:
                centers.append(int(torch.multinomial(d / d.sum(), 1, generator=gen)))
        labels = pair_dist[:, centers].argmin(dim=1)  # [n]
        own = pair_dist[:, centers].min(dim=1).values  # [n] each point's distance to its own center
        for _ in range(max_iter):
            dist = torch.empty(n, k, dtype=torch.float64)  # [n, k]
            for c in range(k):
                members = labels == c
                if not members.any():  # an empty cluster restarts at the worst-fitted point
                    members = torch.zeros(n, dtype=torch.bool)
                    members[int(own.argmax())] = True
                m = members.double()
                cnt = m.sum()
                dist[:, c] = diag - 2 * (S @ m) / cnt + (m @ S @ m) / cnt**2
            new = dist.argmin(dim=1)
            own = dist.gather(1, new[:, None]).squeeze(1)
            if torch.equal(new, labels):
                break
            labels = new
        inertia = float(own.sum())
        if inertia < best_inertia - 1e-12:
            best, best_inertia = labels.clone(), inertia
    # canonical numbering: by first appearance
    remap: dict[int, int] = {}
    out = torch.empty(n, dtype=torch.int64)
    for i, c in enumerate(best.tolist()):
        out[i] = remap.setdefault(c, len(remap))
    return out


def cluster_adapters(
    states: Mapping[str, LoraState], k: int, seed: int = 0, mode: str = "params"
) -> dict[str, int]:
    """Group LoRA experts by cosine similarity: {name: cluster id in 0..k-1}, ids by first appearance in sorted names."""
    names, S = similarity_matrix(states, mode)
    labels = kernel_kmeans(S, k, seed=seed)
    return {n: int(c) for n, c in zip(names, labels.tolist())}
