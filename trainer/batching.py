"""How a batch is cut and laid out: one helper splits it into units (across ranks, mini- and
micro-batches alike), one fills micro-batches up to a token budget, one pads them into tensors (and packs
them into one row without padding)."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch.nn.utils.rnn import pad_sequence

from trainer.types import TrainBatch


def split_units(n: int, parts: int, unit: int = 1) -> list[list[int]]:
    """Indices 0..n-1 in ``parts`` contiguous chunks of whole ``unit``-sized groups (2: online-DPO
    pairs stay together), sizes differing by at most one unit; a chunk may be empty.

    >>> split_units(5, 2), split_units(6, 2, unit=2), split_units(1, 3)
    ([[0, 1, 2], [3, 4]], [[0, 1, 2, 3], [4, 5]], [[0], [], []])
    """
    groups = n // unit
    size, extra = divmod(groups, parts)
    out, start = [], 0
    for k in range(parts):
        end = start + (size + (1 if k < extra else 0)) * unit
        out.append(list(range(start, end)))
        start = end
    return out


def length_order(lengths: Sequence[int], unit: int = 1) -> list[int]:
    """Row order by length (units kept whole, ordered by their longest row): micro-batches cut from
    it hold rows of similar length, so little of each is padding. The loss is normalized by
    whole-batch counts, so the order changes no number, only the work.

    >>> length_order([5, 1, 3, 2]), length_order([5, 1, 3, 2], unit=2)
    ([1, 3, 2, 0], [2, 3, 0, 1])
    """
    units = [list(range(i, min(i + unit, len(lengths)))) for i in range(0, len(lengths), unit)]
    units.sort(key=lambda rows: max(lengths[r] for r in rows))
    return [r for rows in units for r in rows]


def token_budget_bins(lengths: Sequence[int], budget: int, unit: int = 1, min_bins: int = 1) -> list[list[int]]:
    """Row indices grouped into micro-batches of at most ``budget`` tokens, whole ``unit``-sized groups
    together: first fit by decreasing length (a unit longer than the budget gets a bin of its own). Bins
    are then split (the one holding the most units, in halves) until there are ``min_bins`` of them, and
    empty bins added where there are fewer units than that: every rank runs the same number of micro-batches.

    >>> token_budget_bins([5, 1, 3, 2, 4], 6)
    [[0, 1], [4, 3], [2]]
    >>> token_budget_bins([5, 1, 3, 2], 6, unit=2), token_budget_bins([5, 1, 3, 2, 4], 6, min_bins=5)
    ([[0, 1], [2, 3]], [[0], [1], [4], [3], [2]])
    >>> token_budget_bins([3], 6, min_bins=2)
    [[0], []]
    """
    units = [list(range(i, min(i + unit, len(lengths)))) for i in range(0, len(lengths), unit)]
    size = [sum(lengths[r] for r in rows) for rows in units]
    bins: list[list[int]] = []  # unit indices
    loads: list[int] = []
    for u in sorted(range(len(units)), key=lambda u: -size[u]):
        k = next((k for k, load in enumerate(loads) if load + size[u] <= budget), None)
        if k is None:
            bins.append([u])
            loads.append(size[u])
        else:
            bins[k].append(u)
            loads[k] += size[u]
    while len(bins) < min_bins:
        k = max(range(len(bins)), key=lambda k: len(bins[k]), default=None)
        if k is None or len(bins[k]) < 2:
            bins.append([])
            continue
        half = len(bins[k]) // 2
        bins[k:k + 1] = [bins[k][:half], bins[k][half:]]
    return [[r for u in b for r in units[u]] for b in bins]


def micro_batch_rows(lengths: Sequence[int], unit: int, rows_per_micro_batch: int, token_budget: int = 0,
                     num: Optional[int] = None, most_any_rank: Callable[[int], int] = lambda k: k) -> list[list[int]]:
    """Row indices of each micro-batch. Without a ``token_budget``: ``num`` micro-batches (``rows_per_micro_batch``
    rows each when None) cut from the rows in length order. With one: bins of at most ``token_budget`` tokens
    (``token_budget_bins``), at least ``num`` of them, and when ``num`` is given as many as ``most_any_rank``
    says the rank with the most needs (a collective in training: ZeRO-2/3 communicate at every backward).

    >>> micro_batch_rows([5, 1, 3, 2], 1, 2), micro_batch_rows([5, 1, 3, 2], 1, 2, token_budget=6)
    ([[1, 3], [2, 0]], [[0, 1], [2, 3]])
    """
    if token_budget:
        bins = token_budget_bins(lengths, token_budget, unit)
        if num is None:
            return bins
        return token_budget_bins(lengths, token_budget, unit, min_bins=most_any_rank(max(len(bins), num)))
    order = length_order(lengths, unit)
    parts = num or max(1, -(-len(lengths) // rows_per_micro_batch))
    return [[order[i] for i in c] for c in split_units(len(lengths), parts, unit=unit)]


def collate(batch: TrainBatch, pad_id: int, device, packed: bool = False) -> dict[str, torch.Tensor]:
    """Right-padded prompt+response tensors, aligned to next-token predictions.

    Returns input_ids/attention_mask [n, T] and, over the T-1 predicted positions,
    labels/response_mask/rollout_logprobs [n, T-1] and advantages [n]. ``response_mask`` is 1 on
    the response tokens the loss trains: all of them, or those ``batch.loss_mask`` marks. Per-token
    fields the batch carries (``token_advantages``, ``returns``, ``old_values``) come as [n, T-1]
    under the same names, 0 off the response.

    ``packed``: the forward pass also gets the rows end to end in one row without padding,
    ``packed_input_ids``/``packed_position_ids`` [1, sum of lengths] (positions restart at 0 per row, so
    attention stays within a row), ``packed_cu_seq_lens`` [n + 1] (0, then where each row ends in the packed
    row: what varlen attention kernels read), and ``packed_index`` [n, T-1]: where predicted position t of row i sits
    in the packed row (0 past the row's end). The forward is gathered back into the padded layout, so all
    loss math is the same however the rows were laid out.
    """
    seqs = [p + r for p, r in zip(batch.prompt_token_ids, batch.response_token_ids)]
    n, T = len(seqs), max(len(s) for s in seqs)
    input_ids = torch.full((n, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, T), dtype=torch.long)
    response_mask = torch.zeros((n, T - 1), dtype=torch.float32)
    rollout_lp = torch.zeros((n, T - 1), dtype=torch.float32)
    per_token = {name: getattr(batch, name) for name in ("token_advantages", "returns", "old_values") if getattr(batch, name)}
    aligned = {name: torch.zeros((n, T - 1), dtype=torch.float32) for name in per_token}
    for i, (p, r) in enumerate(zip(batch.prompt_token_ids, batch.response_token_ids)):
        s = p + r
        input_ids[i, : len(s)] = torch.tensor(s)
        attention_mask[i, : len(s)] = 1
        # Response token j sits at position len(p)+j and is predicted at position len(p)+j-1.
        start = len(p) - 1
        if batch.loss_mask and batch.loss_mask[i]:
            if len(batch.loss_mask[i]) != len(r):
                raise ValueError(f"row {i}: loss_mask has {len(batch.loss_mask[i])} entries for {len(r)} response tokens")
            response_mask[i, start : start + len(r)] = torch.tensor(batch.loss_mask[i], dtype=torch.float32)
        else:
            response_mask[i, start : start + len(r)] = 1.0
        if batch.rollout_logprobs and batch.rollout_logprobs[i]:
            rollout_lp[i, start : start + len(r)] = torch.tensor(batch.rollout_logprobs[i], dtype=torch.float32)
        for name, rows in per_token.items():
            if len(rows[i]) != len(r):
                raise ValueError(f"row {i}: {name} has {len(rows[i])} entries for {len(r)} response tokens")
            aligned[name][i, start : start + len(r)] = torch.tensor(rows[i], dtype=torch.float32)
    if packed:
        lengths = [len(s) for s in seqs]
        offsets = torch.tensor([0] + lengths[:-1]).cumsum(0)
        positions = torch.arange(T - 1)
        aligned.update(packed_row(seqs))
        aligned["packed_index"] = torch.where(positions < torch.tensor(lengths)[:, None] - 1, offsets[:, None] + positions, 0)
    return {
        **{name: t.to(device) for name, t in aligned.items()},
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "labels": input_ids[:, 1:].to(device),
        "response_mask": response_mask.to(device),
        "rollout_logprobs": rollout_lp.to(device),
        "advantages": torch.tensor(batch.advantages, dtype=torch.float32, device=device),
    }


def packed_row(seqs: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
    """Token sequences end to end in one row: ``packed_input_ids``/``packed_position_ids`` [1, sum of lengths]
    (positions restart at 0 per sequence) and ``packed_cu_seq_lens`` [n + 1], int32 (0, then each sequence's end)."""
    lengths = [len(s) for s in seqs]
    return {"packed_input_ids": torch.tensor([t for s in seqs for t in s]).unsqueeze(0),
            "packed_position_ids": torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0),
            "packed_cu_seq_lens": torch.tensor([0] + lengths).cumsum(0).to(torch.int32)}


def padded_prompts(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input_ids and attention_mask [n, T]."""
    ids = pad_sequence([torch.tensor(list(p), dtype=torch.long) for p in prompts], batch_first=True, padding_value=pad_id)
    lengths = torch.tensor([len(p) for p in prompts])
    return ids.to(device), (torch.arange(ids.shape[1]) < lengths[:, None]).long().to(device)
