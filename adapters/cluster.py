"""Model-based clustering (MBC) of a library of LoRA experts, and the data to train one expert per cluster.

"Towards Modular LLMs by Building and Reusing a Library of LoRAs" (Ostapenko et al. 2024,
https://arxiv.org/abs/2405.11157) trains a LoRA per task for a while, groups the tasks by the
similarity of those LoRAs' parameters (model-based clustering, MBC), then trains one LoRA per group
on the union of the group's data: the library. The grouping follows the reference implementation
(microsoft/mttl, ``SVDEmbeddingTransform`` then ``MBCWithCosSimTransform``), one function a step:

1. :func:`expert_vectors`: each expert flattened into one vector, X [n, D].
2. :func:`sparsify_quantile`: in each row, entries whose |x| is below the row's q-quantile (q = 0.8)
   are zeroed: the top 20% by magnitude are kept.
3. :func:`reduce_svd`: ``TruncatedSVD`` (uncentered) to 64 dimensions, fewer when n or D is smaller
   (then the "reduction" is a rotation and loses nothing), Z [n, d].
4. :func:`kmeans_labels`: rows L2-normalized, then ``KMeans`` (k-means++, ``n_init`` restarts, a fixed
   ``random_state``): k-means under cosine similarity.

:func:`cluster_experts` runs them all; :func:`write_cluster_data` writes each cluster's union of
training data (JSONL) for ``rl train``.

How this departs from mttl:

- k-means input. The default, ``kmeans_input="similarity"``, is mttl's: ``KMeans`` on the rows of the
  cosine-similarity matrix Ẑ Ẑᵀ (each expert described by its n similarities to all experts).
  ``kmeans_input="unit"`` fits it on the unit vectors Ẑ themselves (squared distance = 2 - 2·cos).
- ties. mttl zeroes ``|x| <= quantile``; here ``|x| < quantile`` (ties kept), so ``q = 0`` keeps
  everything. With real-valued weights the two differ by at most an entry per row.
- labels are renumbered by first appearance in the sorted names, so a partition has one labelling
  whatever the seed.
- ``mode="delta"`` (not in mttl) vectorizes the deltas ``s·B A`` instead of the factors: invariant to
  the factorization (``B A = (B M)(M⁻¹ A)``), so it compares experts that did not share an
  initialization, and the shared initial A (which dominates a briefly trained LoRA's parameter
  vector) drops out. Its vectors are Σ out·in entries per expert (every adapted weight matrix):
  fine for small models, too big for 7B-scale ones. ``"params"`` (all A and B factors, the paper's)
  is the default; it is meaningful when experts share an initialization (the same seed: PEFT's
  random A, B = 0).

Axis letters: ``n`` experts, ``D`` flattened entries per expert, ``d`` reduced dimensions.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from adapters.files import lora_pairs

LoraState = Mapping[str, torch.Tensor]  # a PEFT LoRA state dict


# ---------------------------------------------------------------------------------------------
# the clustering, one step a function
# ---------------------------------------------------------------------------------------------
def expert_vectors(
    states: Mapping[str, LoraState], mode: str = "params", scales: Mapping[str, float] | None = None
) -> tuple[list[str], np.ndarray]:
    """Flatten each expert: {name: LoRA state} -> (sorted names, X [n, D] float32).

    ``"params"``: all tensors, in sorted key order (every expert must hold the same keys and shapes).
    ``"delta"``: ``scales[name] · B A`` of every module, in sorted module order (the same modules and
    shapes; ranks may differ); ``scales`` default 1 (the library's alpha/r is ``Expert.scaling``).
    """
    names = sorted(states)
    if not names:
        raise ValueError("expert_vectors: no experts given")
    ref = names[0]
    if mode == "params":
        keys = sorted(states[ref])
        rows = []
        for n in names:
            if sorted(states[n]) != keys:
                raise ValueError(f"expert_vectors: {n!r} holds other tensors than {ref!r}")
            bad = [k for k in keys if states[n][k].shape != states[ref][k].shape]
            if bad:
                raise ValueError(f"expert_vectors: {n!r} and {ref!r} differ in the shape of {bad[0]!r}")
            rows.append(torch.cat([states[n][k].reshape(-1).float() for k in keys]))
    elif mode == "delta":
        pairs = {n: lora_pairs(states[n]) for n in names}
        modules = sorted(pairs[ref])
        rows = []
        for n in names:
            if sorted(pairs[n]) != modules:
                raise ValueError(f"expert_vectors: {n!r} adapts other modules than {ref!r}")
            s = float((scales or {}).get(n, 1.0))
            deltas = []
            for m in modules:
                A, B = pairs[n][m]  # [r, in], [out, r]
                if (B.shape[0], A.shape[1]) != (pairs[ref][m][1].shape[0], pairs[ref][m][0].shape[1]):
                    raise ValueError(f"expert_vectors: {n!r} and {ref!r} differ in the shape of {m!r}")
                deltas.append((s * (B.float() @ A.float())).reshape(-1))  # [out·in]
            rows.append(torch.cat(deltas))
    else:
        raise ValueError(f"expert_vectors: mode must be 'params' or 'delta', got {mode!r}")
    return names, torch.stack(rows).numpy()


def sparsify_quantile(X: np.ndarray, q: float = 0.8) -> np.ndarray:
    """X [n, D] -> a copy with, in each row, the entries whose |x| is below that row's q-quantile of |x|
    zeroed (q = 0.8 keeps the top 20% by magnitude; ties at the threshold are kept; q = 0 keeps all)."""
    if not 0.0 <= q < 1.0:
        raise ValueError(f"sparsify_quantile: q must be in [0, 1), got {q}")
    mag = np.abs(X)
    thr = np.quantile(mag, q, axis=1, keepdims=True)  # [n, 1]
    return np.where(mag < thr, 0.0, X).astype(X.dtype)


def reduce_svd(X: np.ndarray, dims: int = 64, seed: int = 0) -> np.ndarray:
    """X [n, D] -> Z = X V_d [n, d], d = min(dims, n, D): sklearn's ``TruncatedSVD`` (randomized, not
    centered, seeded). When d = min(n, D) it is a rotation: inner products between rows are kept."""
    from sklearn.decomposition import TruncatedSVD

    if dims < 1:
        raise ValueError(f"reduce_svd: dims must be >= 1, got {dims}")
    d = min(dims, *X.shape)
    return TruncatedSVD(n_components=d, random_state=seed).fit_transform(X).astype(np.float64)


def kmeans_labels(Z: np.ndarray, k: int, seed: int = 0, n_init: int = 10, kmeans_input: str = "similarity") -> np.ndarray:
    """k-means under cosine similarity: Z [n, d] -> labels [n] int64 in 0..k-1, numbered by first appearance.

    ``kmeans_input="unit"``: sklearn ``KMeans`` on the L2-normalized rows Ẑ; ``"similarity"`` (mttl):
    on the rows of the cosine-similarity matrix Ẑ Ẑᵀ [n, n]. k-means++ seeding, ``n_init`` restarts,
    ``random_state=seed``. A zero row (no direction) raises ValueError.
    """
    from sklearn.cluster import KMeans
    from sklearn.preprocessing import normalize

    n = Z.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"kmeans_labels: need 1 <= k <= n experts, got k={k}, n={n}")
    zero = np.flatnonzero(np.linalg.norm(Z, axis=1) == 0)
    if zero.size:
        raise ValueError(f"kmeans_labels: rows {zero.tolist()} are all zero and have no direction")
    U = normalize(Z)  # [n, d], unit rows
    if kmeans_input == "unit":
        F = U
    elif kmeans_input == "similarity":
        F = U @ U.T  # [n, n]
    else:
        raise ValueError(f"kmeans_labels: kmeans_input must be 'unit' or 'similarity', got {kmeans_input!r}")
    raw = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(F)
    remap: dict[int, int] = {}
    return np.array([remap.setdefault(int(c), len(remap)) for c in raw], dtype=np.int64)


def cluster_experts(
    states: Mapping[str, LoraState],
    k: int,
    quantile: float = 0.8,
    svd_dims: int = 64,
    seed: int = 0,
    mode: str = "params",
    kmeans_input: str = "similarity",
    scales: Mapping[str, float] | None = None,
) -> dict[int, list[str]]:
    """MBC: {name: LoRA state} -> {cluster id: sorted member names}, ids 0..k-1 by first appearance in
    the sorted names. ``seed`` seeds both the SVD and k-means: the same inputs give the same clusters."""
    if not 1 <= k <= len(states):
        raise ValueError(f"-k {k}: need 1 <= k <= the number of experts ({len(states)})")
    names, X = expert_vectors(states, mode, scales)
    zero = [n for n, row in zip(names, X) if not row.any()]
    if zero:
        raise ValueError(f"experts with all-zero {mode} have no direction (untrained?): {zero}")
    Z = reduce_svd(sparsify_quantile(X, quantile), svd_dims, seed)
    labels = kmeans_labels(Z, k, seed=seed, kmeans_input=kmeans_input)
    clusters: dict[int, list[str]] = {}
    for n, c in zip(names, labels.tolist()):
        clusters.setdefault(c, []).append(n)
    return clusters


# ---------------------------------------------------------------------------------------------
# building the MBC library: the union of each cluster's training data
# ---------------------------------------------------------------------------------------------
def _jsonl_files(expert: str, source: str | os.PathLike | None) -> list[Path]:
    """One expert's data source -> its JSONL files (a .jsonl / .jsonl.gz file, or a directory of them)."""
    if source is None:
        raise ValueError(f"expert {expert!r} records no training data (meta 'data'): give it a data file in --data-map")
    p = Path(source)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.name.endswith((".jsonl", ".jsonl.gz")))
        if not files:
            raise ValueError(f"expert {expert!r}: data directory {p} holds no .jsonl files")
        return files
    if not p.is_file():
        raise ValueError(f"expert {expert!r}: data {str(source)!r} is not a file or directory here "
                         "(builtin data, or a path relative to another directory?): give it in --data-map")
    if not p.name.endswith((".jsonl", ".jsonl.gz")):
        raise ValueError(f"expert {expert!r}: data {p} is not JSONL (.jsonl / .jsonl.gz): convert it, or map the expert in --data-map")
    return [p]


def _append_rows(src: Path, w) -> int:
    """Copy the non-empty lines of JSONL file ``src`` (each must be a JSON object) to the open file ``w``; return how many."""
    rows, lineno = 0, 0
    try:
        with (gzip.open if src.name.endswith(".gz") else open)(src, "rt", encoding="utf-8") as r:
            for lineno, line in enumerate(r, 1):
                if not line.strip():
                    continue
                try:
                    ok = isinstance(json.loads(line), dict)
                except ValueError:
                    ok = False
                if not ok:
                    raise ValueError(f"{src}:{lineno}: not a JSON object")
                w.write(line if line.endswith("\n") else line + "\n")
                rows += 1
    except (UnicodeDecodeError, OSError, EOFError) as e:
        raise ValueError(f"{src}: unreadable after line {lineno} ({e})") from None
    return rows


def write_cluster_data(
    clusters: Mapping[str, Sequence[str]],
    data: Mapping[str, str | os.PathLike | Sequence[str | os.PathLike] | None],
    out_dir: str | os.PathLike,
) -> dict[str, dict]:
    """Write ``out_dir/<cluster>.jsonl``, the union of its members' training data, for each cluster.

    clusters: {cluster name: expert names}; data: {expert name: a JSONL file, a directory of them, or a
    list of those}. A file several members share is read once; rows are copied as they are (checked to
    be JSON objects), files in sorted member order. Also writes ``out_dir/clusters.json`` (the
    returned manifest: {cluster: {"experts", "sources", "rows", "path"}}). Existing files are replaced.
    """
    out = Path(out_dir)
    plan: dict[str, list[Path]] = {}
    for cname, members in clusters.items():
        files: list[Path] = []
        for e in sorted(members):
            if e not in data:
                raise ValueError(f"no training data known for expert {e!r}")
            sources = data[e] if isinstance(data[e], (list, tuple)) else [data[e]]
            for f in (f for s in sources for f in _jsonl_files(e, s)):
                if f.resolve() not in [g.resolve() for g in files]:
                    files.append(f)
        plan[cname] = files
    out.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for cname, files in plan.items():
        dest = out / f"{cname}.jsonl"
        tmp = out / f".{cname}.jsonl.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as w:
                rows = sum(_append_rows(f, w) for f in files)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, dest)
        manifest[cname] = {"experts": sorted(clusters[cname]), "sources": [str(f) for f in files], "rows": rows, "path": str(dest)}
    (out / "clusters.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest
