"""The policy trainer: one data-parallel rank that owns a DeepSpeed engine.

It is a plain class; ``rl.workers`` runs one per rank as a Ray actor (or in-process).
Per rollout batch: ``train_step(shard)`` runs ``trainer.mini_batches`` optimizer steps, each
accumulating gradients over micro-batches. Every micro-batch loss is normalized by counts
over the *whole* batch (``TrainBatch.num_tokens`` / ``num_sequences``), so the update is the
same however the batch is split across ranks and micro-batches.

What trains, what the reference is and what the engines receive are the policy's answers
(``trainer/policies``); all loss math comes from the registry in ``trainer.algorithms``.
"""

from __future__ import annotations

import collections
import os
import time
from typing import Optional

import torch

from trainer import algorithms
from trainer.batching import collate, micro_batch_rows, split_units
from trainer.config import CriticConfig
from trainer.engine import (DTYPES, begin_micro_batch, check_packing, clip_gradients, clips_in_hook, decoder_and_head,
                            deepspeed_config, forward_packed_or_padded, full_parameters, sharded_build, unpack)
from trainer.policies import build_policy
from trainer.process import (all_ranks_max, import_training_libraries, init_distributed, peak_rss_gib, redirect_output,
                             set_mmap_threshold)
from trainer.rank_state import load_rank_state, save_rank_state
from trainer.stats import Stats
from trainer.setup import TrainerSetup
from trainer.types import TrainBatch


class PolicyTrainer:
    def __init__(self, setup: TrainerSetup):
        import_training_libraries()
        import deepspeed
        from transformers import AutoTokenizer

        if setup.log_dir:
            redirect_output(os.path.join(setup.log_dir, f"trainer-rank{setup.rank}.log"))
        self.setup = setup
        self.cfg = setup.trainer
        self.alg = setup.algorithm
        if self.cfg.torch_threads:
            torch.set_num_threads(self.cfg.torch_threads)
        if self.cfg.host_mmap_threshold_mib and not set_mmap_threshold(self.cfg.host_mmap_threshold_mib):
            print("trainer.host_mmap_threshold_mib: this C library has no mallopt; left as it is", flush=True)
        self.device = init_distributed(setup.rank, setup.world_size, setup.master_addr, setup.master_port,
                                       self.cfg.num_gpus_per_rank)
        torch.manual_seed(setup.seed + setup.rank)
        spec = setup.policy
        self.tokenizer = AutoTokenizer.from_pretrained(spec.model_path, trust_remote_code=setup.trust_remote_code)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        with sharded_build(self.cfg, setup.dtype):
            model = self._load(spec.model_path)
        if self.cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        # A reference is loaded only when a loss uses one (KL with beta > 0, or online DPO).
        needs_reference = self.alg.spec.needs_reference(self.alg.kl_coef)
        self.policy = build_policy(spec, model.to(self.device), pad_id=self.pad_id,
                                   load_reference=(lambda: self._load(spec.base_model).to(self.device)) if needs_reference else None)
        model = self.policy.model
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=deepspeed_config(self.cfg, setup.dtype),
        )
        if self.cfg.max_tokens_per_micro_batch:  # after the engine: a ZeRO-3 shard forwards through its hooks
            check_packing(model)
        self.critic = None
        if self.alg.spec.critic:  # PPO: a value model beside the policy, on its own engine and optimizer
            from trainer.critic import Critic

            self.critic = Critic(setup.critic or CriticConfig(), self.cfg, self._load(setup.critic_model_path or spec.base_model),
                                 setup.dtype, self.device, setup)
        self._grad_norm: Optional[float] = None
        self._clip_in_hook = clips_in_hook(self.cfg, setup.dtype)
        if self._clip_in_hook:
            self.optimizer.register_step_pre_hook(self._clip_and_measure)
        self.transport = setup.transport if setup.rank == 0 else None
        self.version = 0
        # Published versions still readable. A LoRA is read by vLLM at its first use, and with
        # asynchronous rollout a batch sampled by an older version may still be queued: keep k+1.
        self._published: list = []
        self._keep_published = 1 + setup.max_staleness

    def _load(self, path: str):
        from transformers import AutoModelForCausalLM

        from trainer.attention import attend_within_sequences  # registers sdpa_varlen, which a recipe may name

        kernel = {"attn_implementation": self.cfg.attn_implementation} if self.cfg.attn_implementation else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[self.setup.dtype], trust_remote_code=self.setup.trust_remote_code,
                                                     **kernel)
        if self.cfg.max_tokens_per_micro_batch and not self.cfg.attn_implementation:
            attend_within_sequences(model)  # packed rows: SDPA per sequence instead of a mask over the row
        return model

    def ready(self) -> bool:
        """Returns once the rank is up (the group waits on it, so start-up errors surface at start)."""
        return True

    def _clip_and_measure(self, optimizer, args, kwargs) -> None:
        """Runs after the gradient all-reduce, right before the optimizer update."""
        self._grad_norm = clip_gradients(optimizer, self.cfg.max_grad_norm)

    def _last_grad_norm(self) -> Optional[float]:
        norm = self._grad_norm if self._clip_in_hook else self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    # ------------------------------------------------------------------ forward

    def _token_logprobs(self, model, mb: dict, with_entropy: bool = False):
        """[n, T-1] logprobs of the next tokens (and entropies, no grad) under ``model``; 0 off the response.

        Only the positions that predict a response token go through the LM head and the softmax:
        prompt and padding positions would each cost a [H x V] matmul and a [V] log-softmax for a
        value the mask drops. Same numbers as the full logits, up to float rounding. Logits are divided by
        the rollout's sampling temperature first: ratios, KL and the mismatch to vLLM's logprobs are all
        of the distribution the tokens were sampled from.
        """
        mask = mb["response_mask"].bool()  # [n, T-1]
        parts = decoder_and_head(model)
        temperature = self.setup.temperature
        if parts is None:  # logits that are not the LM head's plain output (soft-capping, scaling, custom code)
            logits = unpack(forward_packed_or_padded(model, mb).logits, mb)
            if temperature != 1.0:
                logits = logits / temperature
            logprobs = algorithms.logprobs_from_logits(logits, mb["labels"])
            entropy = algorithms.entropy_from_logits(logits.detach()) if with_entropy else None
            return logprobs, entropy
        decoder, head = parts
        hidden = unpack(forward_packed_or_padded(decoder, mb).last_hidden_state, mb)
        # [R] each, R response tokens of the micro-batch; logits / temperature: the distribution vLLM sampled from
        picked, ent = algorithms.head_logprobs_and_entropy(hidden[mask], head, mb["labels"][mask], temperature, with_entropy,
                                                           chunk_rows=self.cfg.logits_chunk_rows)
        logprobs = torch.zeros(mask.shape, dtype=picked.dtype, device=picked.device).masked_scatter(mask, picked)
        entropy = None if ent is None else torch.zeros(mask.shape, dtype=ent.dtype, device=ent.device).masked_scatter(mask, ent)
        return logprobs, entropy

    def _micro_batches(self, batch: TrainBatch, num: Optional[int] = None) -> list[tuple[list[int], dict]]:
        """``batch`` collated into micro-batches, each with its row indices: ``num`` of them in length order
        (``micro_batch_size`` rows each when None), or with ``trainer.max_tokens_per_micro_batch`` filled up
        to that many tokens and packed. Training passes ``num`` (the same on every rank: ZeRO-2/3 communicate
        at every backward): packed, every rank then runs the most micro-batches any rank needs, and with several
        ranks one short of rows gets micro-batches the loss masks out entirely."""
        lengths = [len(p) + len(r) for p, r in zip(batch.prompt_token_ids, batch.response_token_ids)]
        budget = self.cfg.max_tokens_per_micro_batch
        bins = micro_batch_rows(lengths, batch.unit, self.cfg.micro_batch_size, budget, num,
                                most_any_rank=lambda k: int(all_ranks_max(k, self.setup.world_size, self.device)))
        micro = []
        for rows in bins:
            if rows or (num is not None and self.setup.world_size > 1):
                mb = collate(batch.select(rows or [0]), self.pad_id, self.device, packed=bool(budget))
                if not rows:
                    mb["response_mask"].zero_()
                micro.append((rows, mb))
        return micro

    def compute_logprobs(self, batch: TrainBatch) -> list[list[float]]:
        """The trainer's own logprob of every response token (no grad)."""
        self.engine.eval()
        out: list[list[float]] = [[] for _ in range(len(batch))]
        with torch.no_grad():
            for rows, mb in self._micro_batches(batch):
                lp, _ = self._token_logprobs(self.engine.module, mb)
                for i, row, mask in zip(rows, lp, mb["response_mask"]):
                    out[i] = row[mask.bool()].tolist()
        return out

    def compute_values(self, batch: TrainBatch) -> list[list[float]]:
        """The critic's value of every response token (no grad): PPO's baseline, and the centre of its value clip."""
        return self.critic.values(batch, self._micro_batches(batch))

    def _reference_logprobs(self, mb: dict) -> torch.Tensor:
        with torch.no_grad(), self.policy.reference() as reference:
            return self._token_logprobs(reference, mb)[0]

    # ------------------------------------------------------------------ update

    def train_step(self, shard: TrainBatch, num_micro_batches: int) -> Stats:
        """One rollout batch's worth of updates on this rank's shard.

        ``num_micro_batches`` is the same on every rank (ZeRO-2/3 reduce at every backward).
        Sequences are split in units of ``shard.unit`` rows (2 keeps online-DPO pairs together).
        Returns this rank's stats, each with its reduction across ranks (``trainer.stats``).
        """
        self.engine.train()
        t0 = time.perf_counter()
        stats = Stats()
        applied = skipped = 0
        for mini in split_units(len(shard), self.cfg.mini_batches, unit=shard.unit):
            if not mini:
                continue
            mini_batch = shard.select(mini)
            # Counts over all ranks for this mini-batch: an equal slice of the full-batch counts.
            counts = dict(num_sequences=shard.num_sequences / self.cfg.mini_batches,
                          num_tokens=shard.num_tokens / self.cfg.mini_batches, max_response_len=self.setup.max_response_len)
            micro = [mb for _, mb in self._micro_batches(mini_batch, num_micro_batches)]
            if self.cfg.mini_batches > 1:
                # Later mini-batches are off-policy: freeze the behaviour logprobs before any update.
                with torch.no_grad():
                    for mb in micro:
                        mb["old_logprobs"] = self._token_logprobs(self.engine.module, mb)[0]
            if self._accumulate(micro, counts, stats):
                self.engine.step()
                if self.critic is not None:
                    self.critic.step()
                applied += 1
                grad_norm = self._last_grad_norm()
                if grad_norm is not None:
                    stats.max("grad_norm", grad_norm)
            else:
                # A non-finite loss or gradient: drop this update, keep the weights as they were.
                self.engine.zero_grad()
                if self.critic is not None:
                    self.critic.zero_grad()
                skipped += 1
        if applied:
            self.version += 1
        # Every rank applies or skips the same updates (they agree on finiteness): counted once.
        stats.same("updates_applied", applied)
        stats.same("updates_skipped_nonfinite", skipped)
        stats.same("lr", float(self.optimizer.param_groups[0]["lr"]))
        stats.max("params_in_memory", float(self.policy.numel_in_memory()))
        stats.max("trainer_peak_rss_gib", peak_rss_gib())
        stats.max("train_seconds", time.perf_counter() - t0)
        return stats

    def _accumulate(self, micro: list[dict], counts: dict, stats: Stats) -> bool:
        """Forward/backward every micro-batch of one update; False when any loss or gradient is non-finite."""
        for mb in micro:
            begin_micro_batch(self.engine)
            loss = self._micro_batch_loss(mb, counts, stats)
            value_loss = self.critic.loss(mb, counts, stats) if self.critic is not None else loss.new_zeros(())
            if not self._all_ranks_agree(bool(torch.isfinite(loss)) and bool(torch.isfinite(value_loss))):
                return False  # every rank stops at the same micro-batch: collectives stay matched
            # DeepSpeed averages gradients over ranks; our normalization already sums them.
            self.engine.backward(loss * self.setup.world_size, scale_wrt_gas=False)
            if self.critic is not None:
                self.critic.backward(value_loss, self.setup.world_size)
        return self._grads_finite()

    def _grads_finite(self) -> bool:
        """Every rank's gradients are finite (checked with ZeRO-0, where they sit on the parameters)."""
        if self.cfg.zero_stage != 0:
            return True
        finite = all(bool(torch.isfinite(p.grad).all()) for p in self.engine.module.parameters() if p.grad is not None)
        return self._all_ranks_agree(finite and (self.critic is None or self.critic.grads_finite()))

    def _all_ranks_agree(self, ok: bool) -> bool:
        """True only if ``ok`` holds on every rank."""
        return all_ranks_max(0.0 if ok else 1.0, self.setup.world_size, self.device) == 0.0

    def _micro_batch_loss(self, mb: dict, counts: dict, stats: Stats) -> torch.Tensor:
        """The loss of one micro-batch (normalized by whole-batch counts); adds its metrics to ``stats``."""
        alg = self.alg
        logprobs, entropy = self._token_logprobs(self.engine, mb, with_entropy=True)
        mask = mb["response_mask"]
        old = mb.get("old_logprobs", logprobs.detach())
        ntok = float(mask.sum())
        if alg.spec.policy_gradient:
            pg_loss = self._policy_gradient_loss(mb, logprobs, old, counts, stats)
        else:  # online DPO: the policy's discordant pairs against the reference
            pg_loss = self._pairwise_dpo_loss(mb, logprobs, counts, stats)
        loss = pg_loss
        if alg.kl_coef > 0 and alg.kl_penalty == "loss":
            kl = algorithms.get("kl", alg.kl_estimator)(logprobs, self._reference_logprobs(mb))
            loss = loss + alg.kl_coef * algorithms.aggregate_loss(kl, mask, alg.loss_aggregation, **counts)
            stats.mean("kl", (kl.detach() * mask).sum(), ntok)
        stats.sum("loss", loss.detach())  # normalized by whole-batch counts: the ranks' sum is the batch loss
        stats.sum("pg_loss", pg_loss.detach())
        stats.sum("tokens", ntok)
        stats.mean("entropy", (entropy * mask).sum(), ntok)
        mismatch = (old - mb["rollout_logprobs"]).abs() * mask
        stats.mean("logprob_mismatch", mismatch.sum(), ntok)
        stats.max("logprob_mismatch_max", mismatch.max())
        return loss

    def _pairwise_dpo_loss(self, mb: dict, logprobs: torch.Tensor, counts: dict, stats: Stats) -> torch.Tensor:
        """Online DPO's loss on a micro-batch of (preferred, other) row pairs; adds its reward accuracy and margin."""
        alg = self.alg
        loss, dpo = algorithms.pairwise_dpo_loss(
            logprobs, self._reference_logprobs(mb), mb["response_mask"], beta=alg.dpo_beta, loss_type=alg.dpo_loss,
            label_smoothing=alg.dpo_label_smoothing, num_pairs=counts["num_sequences"] / 2,
        )
        stats.sum("dpo_reward_accuracy", dpo["reward_accuracy"])  # already divided by the batch's pairs
        stats.sum("dpo_reward_margin", dpo["reward_margin"])
        return loss

    def _policy_gradient_loss(self, mb: dict, logprobs: torch.Tensor, old: torch.Tensor, counts: dict,
                              stats: Stats) -> torch.Tensor:
        """The clipped policy loss on a micro-batch's advantages (per sequence, plus any per-token term), shaped by
        the KL reward, truncated importance weights and the sequence mask the recipe sets; adds their metrics."""
        alg, mask = self.alg, mb["response_mask"]
        ntok = float(mask.sum())
        advantages = mb["advantages"]  # [n]
        if "token_advantages" in mb:  # a teacher's per-token term, or PPO's GAE: [n, T-1]
            advantages = advantages[:, None] + mb["token_advantages"]
        if alg.kl_coef > 0 and alg.kl_penalty == "reward":
            # REINFORCE++: the KL is a per-token reward -beta * k1, k1 = log pi_old - log pi_ref (no grad);
            # each token's advantage loses beta times its reward-to-go. Nothing is added to the loss.
            kl = algorithms.get("kl", "k1")(old, self._reference_logprobs(mb)).detach()  # [n, T-1]
            advantages = advantages.reshape(len(kl), -1) - alg.kl_coef * algorithms.kl_reward_to_go(kl, mask)  # [n, T-1]
            stats.mean("kl", (kl * mask).sum(), ntok)
        is_weights = None
        if alg.tis_cap is not None:
            is_weights = algorithms.truncated_is_weights(old, mb["rollout_logprobs"], cap=alg.tis_cap)
        pg_mask = mask
        if alg.sequence_mask is not None:  # sequences sampled too far off pi_old leave the policy loss
            keep = algorithms.get("sequence_mask", alg.sequence_mask)(
                old, mb["rollout_logprobs"], mask, low=alg.sequence_mask_low, high=alg.sequence_mask_high)  # [n]
            has_tokens = mask.sum(-1) > 0
            stats.mean("sequences_masked_frac", ((1 - keep) * has_tokens).sum(), float(has_tokens.sum()))
            pg_mask = mask * keep[:, None]
        loss, metrics = algorithms.get("policy_loss", alg.policy_loss)(
            logprobs, old, advantages, pg_mask, clip_low=alg.clip_low, clip_high=alg.clip_high,
            dual_clip=alg.dual_clip, aggregation=alg.loss_aggregation, is_weights=is_weights,
            importance_sampling_level=alg.importance_sampling_level, **counts,
        )
        stats.mean("clip_frac", metrics["clip_frac"] * ntok, ntok)
        stats.max("ratio_max", metrics["ratio_max"])
        return loss

    # ------------------------------------------------------------------ weights out

    def _full_parameters(self):
        return full_parameters(self.engine.module, self.cfg.zero_stage, self.policy.publishes_all_weights)

    def publish_weights(self, prompts: Optional[list[list[int]]] = None):
        """Publish the current policy for the rollout engines (rank 0); every rank must call it.

        What is published is the policy's answer (all weights, an adapter, a sparse delta); an
        Arrow policy also needs ``prompts``, the batch about to be sampled, to average its routing over.
        """
        with self._full_parameters() as params:
            if self.transport is None:
                collections.deque(params, maxlen=0)  # under ZeRO-3 each is a gather this rank takes part in
                return None
            handle = self.policy.publish(self.transport, self.version, params, prompts, self.pad_id)
        self._published.append(handle)
        while len(self._published) > self._keep_published:  # no queued batch can use these any more
            self.transport.release(self._published.pop(0))
        return handle

    def join_weight_group(self, addr: str, port: int, world_size: int, backend: str = "gloo") -> bool:
        """Rank 0 joins the engines' weight group (a collective transport), hosting its store at ``addr:port``."""
        if self.transport is not None and hasattr(self.transport, "join"):
            self.transport.join(addr, port, world_size, 0, addr, backend)
        return True

    def save_pretrained(self, path: str) -> Optional[str]:
        """Save the policy into ``path`` (rank 0 writes): HF format for a full model, the adapter's own
        files otherwise. The caller makes it atomic (writes into a temporary directory and renames it)."""
        with self._full_parameters() as params:
            # A ZeRO-3 shard of a full model is saved from the gathered copies, which only rank 0 keeps.
            gathered = self.cfg.zero_stage == 3 and self.policy.publishes_all_weights
            if self.setup.rank != 0:
                if gathered:
                    collections.deque(params, maxlen=0)  # each is a gather this rank takes part in
                return None
            state = dict(params) if gathered else None
            self.policy.save(path, base_model=self.setup.policy.base_model, state_dict=state)
            self.tokenizer.save_pretrained(path)
            return str(path)

    def save_state(self, path: str) -> None:
        save_rank_state(self, path)
        if self.critic is not None:
            self.critic.save(path)

    def load_state(self, path: str) -> int:
        version = load_rank_state(self, path)
        if self.critic is not None:
            self.critic.load(path)
        return version

    def library_sources(self, checkpoint: str) -> dict[str, str]:
        """{name suffix: adapter directory inside ``checkpoint``} to write into the adapter library."""
        return {k: str(v) for k, v in self.policy.library_sources(checkpoint).items()}

    def release(self) -> None:
        """Give back DeepSpeed's copy of the world group now (the driver's process, ``use_ray: false``): an engine
        in this process destroys the world at its shutdown, and a later run's DeepSpeed engine must clone the new
        one rather than reuse this dead copy. Every group DeepSpeed caches here (data parallel, sequence data
        parallel) is that copy; a rank in a Ray actor needs none of this, its process ends."""
        import deepspeed.comm

        group = self.engine.data_parallel_group
        if group is not None and torch.distributed.is_initialized():
            deepspeed.comm.destroy_process_group(group)

    def close(self) -> None:
        if self.transport is not None:
            for handle in self._published:
                self.transport.release(handle)
            self._published = []
            self.transport.close()
