"""Per-token logprobs and entropy from LM-head logits, in float32 math.

Axes: N sequences, L positions, R = the rows (positions) kept of a micro-batch, V vocabulary.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.algorithms.losses import float_dtype as _float_dtype


def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """log softmax(logits)[label]: logits [N, L, V], labels [N, L] long -> [N, L], float32 math.

    Computed as minus the cross-entropy (log-softmax and the pick fused, forward and backward).
    Every label must be a valid index (pad with any token id and mask the result; -100 would give 0).
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"need logits [N, L, V] and labels [N, L], got {tuple(logits.shape)}, "
            f"{tuple(labels.shape)}"
        )
    logits = logits.to(_float_dtype(logits))
    nll = F.cross_entropy(logits.flatten(0, 1), labels.long().flatten(), reduction="none")  # [N*L]
    return -nll.view(labels.shape)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) per position: logits [..., V] -> [...], e.g. [N, L, V] -> [N, L].

    H = -sum_v p_v log p_v with log p from ``log_softmax`` (logsumexp-stable, float32 math).
    Tokens with p = 0 (logit -inf) contribute 0, not 0 * -inf = NaN.
    """
    log_p = torch.log_softmax(logits.to(_float_dtype(logits)), dim=-1)
    p = log_p.exp()
    return -(p * torch.where(p > 0, log_p, 0.0)).sum(dim=-1)


def logprobs_and_entropy(logits: Tensor, labels: Tensor, with_entropy: bool = True,
                         chunk_rows: int = 1024) -> tuple[Tensor, Optional[Tensor]]:
    """Per-row logprob of ``labels`` and entropy: logits [R, V], labels [R] ->
    (logprobs [R] with grad, entropy [R] without grad, or None).

    The same numbers as ``logprobs_from_logits`` and ``entropy_from_logits`` (to float rounding).
    The logprob is minus the fused cross-entropy: its backward is one [R, V] pass (softmax minus the
    one-hot), where ``gather - logsumexp`` costs a scatter into zeros, an exp and an add (measured on
    [4096, 32000]: 1 s more per micro-batch, ~10% of a step). The entropy, ``lse - sum_v softmax_v *
    logit_v`` with ``lse = logit[label] - logprob``, is computed over chunks of ``chunk_rows`` rows
    with one in-place exp and one dot product each, so no [R, V] temporary is made beyond one chunk.
    Rows with an infinite logit take the exact formula.
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"need logits [R, V] and labels [R], got {tuple(logits.shape)}, {tuple(labels.shape)}")
    logits = logits.to(_float_dtype(logits))
    logprobs = -F.cross_entropy(logits, labels.long(), reduction="none")  # [R]
    if not with_entropy:
        return logprobs, None
    out = []
    with torch.no_grad():
        lse = logits.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1) - logprobs  # [R]: logsumexp, no pass over V
        bad = ~torch.isfinite(lse)  # an infinite label logit: recompute those rows directly
        if bad.any():
            lse[bad] = torch.logsumexp(logits[bad], dim=-1)
        for c, l in zip(logits.detach().split(chunk_rows), lse.detach().split(chunk_rows)):
            p = (c - l[:, None]).exp_()  # softmax, in place of the difference
            h = l - torch.bmm(p[:, None, :], c[:, :, None]).view(-1)
            bad = torch.isnan(h)  # a -inf logit makes 0 * -inf: those rows take the exact formula
            if bad.any():
                h[bad] = entropy_from_logits(c[bad])
            out.append(h)
    return logprobs, torch.cat(out) if out else lse.detach()


def head_logprobs_and_entropy(hidden: Tensor, head, labels: Tensor, temperature: float = 1.0, with_entropy: bool = True,
                              chunk_rows: int = 0) -> tuple[Tensor, Optional[Tensor]]:
    """The LM head and ``logprobs_and_entropy`` on hidden states: hidden [R, H], labels [R] ->
    (logprobs [R] with grad, entropy [R] without grad, or None); ``head`` maps [r, H] -> [r, V] logits,
    which are divided by ``temperature``.

    ``chunk_rows`` 0: one [R, V] logits block, kept for the backward. ``chunk_rows`` k > 0: the rows go through
    the head k at a time, each chunk under activation checkpointing, so no more than one [k, V] block exists at
    once, forward or backward; the backward recomputes each chunk's head matmul (one more head forward per
    micro-batch). The same numbers either way, to float rounding (unit-tested).
    """

    def rows(h: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = head(h)
        if temperature != 1.0:
            logits = logits / temperature
        lp, ent = logprobs_and_entropy(logits, y, with_entropy)
        return lp, (ent if ent is not None else lp.detach())  # checkpoint needs tensors out

    if chunk_rows <= 0 or hidden.shape[0] <= chunk_rows:
        lp, ent = rows(hidden, labels)
        return lp, ent if with_entropy else None
    from torch.utils.checkpoint import checkpoint

    parts = [checkpoint(rows, h, y, use_reentrant=False) for h, y in zip(hidden.split(chunk_rows), labels.split(chunk_rows))]
    logprobs = torch.cat([lp for lp, _ in parts])
    return logprobs, torch.cat([ent.detach() for _, ent in parts]) if with_entropy else None
