"""The preference trainer: one data-parallel DeepSpeed rank for offline DPO.

It *is* a :class:`~trainer.policy_trainer.PolicyTrainer` (same rank set-up: gloo on CPU,
``torch_adam``, unmanaged gradient accumulation, grad-norm clipping and measurement,
``_full_parameters``, ``save_pretrained``) whose update is the DPO step instead of the GRPO one.

- ``reference_logprobs(pairs)``: sequence log-probs of chosen and rejected under the frozen
  initial policy. The driver calls it once, before any update, and caches the result: the
  reference of offline DPO is fixed data, so no second model copy is kept.
- ``train_pairs(shard, num_micro_batches, ref_chosen, ref_rejected)``: one optimizer step on
  this rank's shard of a batch of pairs.
- ``evaluate(pairs, ref_chosen, ref_rejected)``: loss, reward accuracy and margins, no update.

A pair's sequence log-prob is the sum of its response tokens' log-probs (``logprobs_from_logits``
then a masked sum; the prompt is context only), the convention of the DPO paper. Chosen and
rejected of a micro-batch go through one forward pass. The loss is ``sum(dpo_loss) / P_batch``
with ``P_batch`` the pairs of the whole batch over all ranks (``PreferencePairs.batch_pairs``),
so the update does not depend on how the batch is split across ranks and micro-batches.

Axis: P pairs; n pairs in a micro-batch; T tokens.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional, Sequence

import torch
from torch import Tensor

from trainer import algorithms
from trainer.batching import collate, split_units
from trainer.engine import begin_micro_batch
from trainer.policy_trainer import PolicyTrainer
from trainer.stats import Stats
from trainer.setup import TrainerSetup
from trainer.types import PreferencePairs, TrainBatch

STAT_KEYS = ("loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "chosen_logp", "rejected_logp")


def pair_stats_sums(losses: Tensor, chosen_rewards: Tensor, rejected_rewards: Tensor, chosen_logps: Tensor,
                    rejected_logps: Tensor) -> dict[str, float]:
    """Sums over n pairs ([n] each) of what a DPO step reports; divide by the pair count for means.

    ``reward_accuracy`` counts wins as ``algorithms.preference_wins`` does (a tie is 1/2).
    """
    margin = chosen_rewards - rejected_rewards  # [n]
    wins = algorithms.preference_wins(chosen_rewards, rejected_rewards)
    return {
        "loss": float(losses.detach().sum()),
        "reward_accuracy": float(wins.sum()),
        "reward_margin": float(margin.sum()),
        "chosen_reward": float(chosen_rewards.sum()),
        "rejected_reward": float(rejected_rewards.sum()),
        "chosen_logp": float(chosen_logps.detach().sum()),
        "rejected_logp": float(rejected_logps.detach().sum()),
    }


def _pair_means(sums: dict[str, float], n: int, stats: Stats) -> Stats:
    """Means over pairs, combined across ranks weighted by each rank's pair count."""
    for k in STAT_KEYS:
        stats.mean(k, sums.get(k, 0.0), n)
    stats.sum("pairs", n)
    return stats


class PreferenceTrainer(PolicyTrainer):
    def __init__(self, setup: TrainerSetup):
        # DPO's beta is its KL regulariser: no separate KL term, hence no second model copy here.
        alg = setup.algorithm.model_copy(update={"kl_coef": 0.0})
        super().__init__(dataclasses.replace(setup, algorithm=alg))
        algorithms.get("preference_loss", alg.dpo_loss)  # fail at start-up on an unknown loss name

    # ------------------------------------------------------------------ forward

    def _pair_logps(self, model, pairs: PreferencePairs) -> tuple[Tensor, Tensor]:
        """Sequence-summed response log-probs (chosen [n], rejected [n]), one forward of 2n rows."""
        n = len(pairs)
        rows = TrainBatch(
            prompt_token_ids=pairs.prompt_ids + pairs.prompt_ids,
            response_token_ids=pairs.chosen_ids + pairs.rejected_ids,  # rows [0, n): chosen; [n, 2n): rejected
            advantages=[0.0] * (2 * n),
            rollout_logprobs=[],
        )
        mb = collate(rows, self.pad_id, self.device)
        token_lp, _ = self._token_logprobs(model, mb)  # [2n, T-1]
        seq = torch.where(mb["response_mask"].bool(), token_lp, 0.0).sum(-1)  # [2n]
        return seq[:n], seq[n:]

    def _idle_pass(self, model) -> Tensor:
        """A forward on one pad token whose loss is 0: keeps the number of forward/backward calls
        equal on every rank when a shard runs out of pairs (ZeRO-2/3 communicate at each of them)."""
        ids = torch.full((1, 2), self.pad_id, dtype=torch.long, device=self.device)
        return model(input_ids=ids).logits.float().sum() * 0.0

    def _micro_chunks(self, n: int, num_micro_batches: Optional[int]) -> list[list[int]]:
        parts = num_micro_batches or max(1, -(-n // self.cfg.micro_batch_size))
        return split_units(n, parts)

    @torch.no_grad()
    def _score(self, pairs: PreferencePairs, num_micro_batches: Optional[int]) -> tuple[list[float], list[float]]:
        """Current-policy sequence log-probs of chosen and rejected, [P] each, no grad."""
        self.engine.eval()
        chosen: list[float] = []
        rejected: list[float] = []
        for idx in self._micro_chunks(len(pairs), num_micro_batches):
            if not idx:
                self._idle_pass(self.engine.module)
                continue
            c, r = self._pair_logps(self.engine.module, pairs.select(idx))
            chosen.extend(c.tolist())
            rejected.extend(r.tolist())
        return chosen, rejected

    def reference_logprobs(self, pairs: PreferencePairs, num_micro_batches: Optional[int] = None) -> tuple[list[float], list[float]]:
        """(chosen [P], rejected [P]) under the initial policy: the frozen DPO reference.

        Must run before the first update (raises otherwise). The same micro-batching as
        ``evaluate`` on the same pairs gives bit-identical numbers, so margins start at exactly 0.
        """
        if self.version != 0:
            raise RuntimeError("reference log-probs must come from the initial policy, before any update")
        return self._score(pairs, num_micro_batches)

    # ------------------------------------------------------------------ evaluate and update

    def _loss(self, pc: Tensor, pr: Tensor, rc: Sequence[float], rr: Sequence[float]):
        alg = self.alg
        rc_t = torch.tensor(list(rc), dtype=pc.dtype, device=pc.device)
        rr_t = torch.tensor(list(rr), dtype=pr.dtype, device=pr.device)
        return algorithms.dpo_loss(
            pc, pr, rc_t, rr_t, beta=alg.dpo_beta, loss_type=alg.dpo_loss, label_smoothing=alg.dpo_label_smoothing
        )  # losses, chosen_rewards, rejected_rewards: [n] each

    def evaluate(
        self, pairs: PreferencePairs, ref_chosen: Sequence[float], ref_rejected: Sequence[float], num_micro_batches: Optional[int] = None
    ) -> Stats:
        """Means over these pairs of loss, reward_accuracy, reward_margin, chosen/rejected reward
        (and policy log-probs), plus ``pairs``; no update."""
        pc, pr = self._score(pairs, num_micro_batches)
        n = len(pairs)
        if not n:
            return _pair_means({}, 0, Stats())
        pc_t, pr_t = torch.tensor(pc), torch.tensor(pr)
        losses, c_rew, r_rew = self._loss(pc_t, pr_t, ref_chosen, ref_rejected)
        return _pair_means(pair_stats_sums(losses, c_rew, r_rew, pc_t, pr_t), n, Stats())

    def train_pairs(
        self, shard: PreferencePairs, num_micro_batches: int, ref_chosen: Sequence[float], ref_rejected: Sequence[float]
    ) -> Stats:
        """One optimizer step on this rank's shard of a batch of pairs.

        ``num_micro_batches`` must be the same on every rank. ``ref_chosen`` / ``ref_rejected`` [n]
        are the cached reference log-probs of the shard's pairs. Returns means over the shard
        (the loss and rewards measured before the update), ``pairs``, ``tokens``, ``grad_norm``,
        ``lr`` and ``train_seconds``, each with its reduction across ranks (``trainer.stats``).
        """
        if len(ref_chosen) != len(shard) or len(ref_rejected) != len(shard):
            raise ValueError(f"need one reference log-prob per pair: {len(shard)} pairs, {len(ref_chosen)}/{len(ref_rejected)} given")
        self.engine.train()
        t0 = time.perf_counter()
        world = self.setup.world_size
        batch_pairs = shard.batch_pairs or len(shard)
        sums: dict[str, float] = {}
        finite = True
        for idx in self._micro_chunks(len(shard), num_micro_batches):
            begin_micro_batch(self.engine)
            if not idx:
                loss = self._idle_pass(self.engine)
            else:
                pc, pr = self._pair_logps(self.engine, shard.select(idx))
                losses, c_rew, r_rew = self._loss(pc, pr, [ref_chosen[i] for i in idx], [ref_rejected[i] for i in idx])
                loss = losses.sum() / batch_pairs  # this micro-batch's share of the whole batch's mean
                for k, v in pair_stats_sums(losses, c_rew, r_rew, pc, pr).items():
                    sums[k] = sums.get(k, 0.0) + v
            finite = self._all_ranks_agree(bool(torch.isfinite(loss)))
            if not finite:
                break  # every rank stops at the same micro-batch: collectives stay matched
            # DeepSpeed averages gradients over ranks; the 1/batch_pairs normalization already sums them.
            self.engine.backward(loss * world, scale_wrt_gas=False)
        finite = finite and self._grads_finite()
        grad_norm = None
        if finite:
            self.engine.step()
            self.version += 1
            grad_norm = self._last_grad_norm()
        else:  # a non-finite loss or gradient, as in the policy-gradient step: the update is dropped
            self.engine.zero_grad()
        stats = _pair_means(sums, len(shard), Stats())
        stats.sum("tokens", shard.num_tokens)
        stats.max("grad_norm", grad_norm if grad_norm is not None else float("nan"))
        stats.same("lr", float(self.optimizer.param_groups[0]["lr"]))
        stats.same("updates_applied", int(finite))
        stats.same("updates_skipped_nonfinite", int(not finite))
        stats.max("train_seconds", time.perf_counter() - t0)
        return stats
