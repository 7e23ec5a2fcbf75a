"""The policy trainer: one data-parallel rank that owns a DeepSpeed engine.

It is a plain class; ``rl/workers.py`` runs one per rank as a Ray actor (or in-process).
Per rollout batch: ``train_step(shard)`` runs ``trainer.mini_batches`` optimizer steps, each
accumulating gradients over micro-batches. Every micro-batch loss is normalized by counts
over the *whole* batch (``TrainBatch.num_tokens`` / ``num_sequences``), so the update is the
same however the batch is split across ranks and micro-batches.

All loss math comes from the registry in ``rl.algorithms``; nothing here re-implements it.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch

from rl import algorithms
from rl.config import AdapterConfig, AlgorithmConfig, TrainerConfig
from rl.types import TrainBatch, WeightHandle

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TrainerSetup:
    model_path: str
    dtype: str
    trainer: TrainerConfig
    algorithm: AlgorithmConfig
    max_response_len: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    weight_transport: str = "shared_file"
    weight_dir: Optional[str] = None
    trust_remote_code: bool = False
    # The frozen reference is the run's original model, also when the policy resumes from a checkpoint.
    ref_model_path: Optional[str] = None
    # Adapter policy over the frozen base model (see trainer/adapter_policy.py): new, or loaded from
    # ``adapter_init_dir`` (a library expert, a merge, a checkpoint); Arrow routes ``adapter_expert_dirs``;
    # a new sparse adapter scores its mask on ``calibration_token_ids`` (prompts).
    adapter: Optional[AdapterConfig] = None
    adapter_init_dir: Optional[str] = None
    adapter_expert_dirs: list[str] = field(default_factory=list)
    calibration_token_ids: Optional[list[list[int]]] = None
    max_staleness: int = 0  # asynchronous rollout: batches may still use the k previous versions


def _collate(batch: TrainBatch, pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-padded prompt+response tensors, aligned to next-token predictions.

    Returns input_ids/attention_mask [n, T] and, over the T-1 predicted positions,
    labels/response_mask/rollout_logprobs [n, T-1] and advantages [n].
    """
    seqs = [p + r for p, r in zip(batch.prompt_token_ids, batch.response_token_ids)]
    n, T = len(seqs), max(len(s) for s in seqs)
    input_ids = torch.full((n, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, T), dtype=torch.long)
    response_mask = torch.zeros((n, T - 1), dtype=torch.float32)
    rollout_lp = torch.zeros((n, T - 1), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(batch.prompt_token_ids, batch.response_token_ids)):
        s = p + r
        input_ids[i, : len(s)] = torch.tensor(s)
        attention_mask[i, : len(s)] = 1
        # Response token j sits at position len(p)+j and is predicted at position len(p)+j-1.
        start = len(p) - 1
        response_mask[i, start : start + len(r)] = 1.0
        if batch.rollout_logprobs and batch.rollout_logprobs[i]:
            rollout_lp[i, start : start + len(r)] = torch.tensor(batch.rollout_logprobs[i], dtype=torch.float32)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "labels": input_ids[:, 1:].to(device),
        "response_mask": response_mask.to(device),
        "rollout_logprobs": rollout_lp.to(device),
        "advantages": torch.tensor(batch.advantages, dtype=torch.float32, device=device),
    }


class PolicyTrainer:
    def __init__(self, setup: TrainerSetup):
        import deepspeed
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.setup = setup
        self.cfg = setup.trainer
        self.alg = setup.algorithm
        if self.cfg.torch_threads:
            torch.set_num_threads(self.cfg.torch_threads)
        os.environ.update(
            MASTER_ADDR=setup.master_addr,
            MASTER_PORT=str(setup.master_port),
            RANK=str(setup.rank),
            WORLD_SIZE=str(setup.world_size),
            LOCAL_RANK="0" if not torch.cuda.is_available() else str(setup.rank % torch.cuda.device_count()),
        )
        self.device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if torch.cuda.is_available() else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo")
        torch.manual_seed(setup.seed + setup.rank)

        dtype = DTYPES[setup.dtype]
        self.tokenizer = AutoTokenizer.from_pretrained(setup.model_path, trust_remote_code=setup.trust_remote_code)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        model = AutoModelForCausalLM.from_pretrained(setup.model_path, dtype=dtype, trust_remote_code=setup.trust_remote_code)
        if self.cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.adapter_policy = None
        if setup.adapter is not None and setup.adapter.mode != "none":
            from trainer.adapter_policy import build_adapter_policy

            self.adapter_policy = build_adapter_policy(
                model.to(self.device), setup.adapter, setup.adapter_init_dir, expert_dirs=setup.adapter_expert_dirs,
                calibration=setup.calibration_token_ids, pad_id=self.pad_id,
            )
            model = self.adapter_policy.model
        # A full-model policy needs a frozen copy as the reference when a loss uses one (KL with
        # beta > 0, or online DPO). An adapter policy's reference is its base with the adapter
        # disabled: no second copy of the model.
        self.ref_model = None
        if self.adapter_policy is None and (self.alg.kl_coef > 0 or self.alg.name == "online_dpo"):
            ref_path = setup.ref_model_path or setup.model_path
            self.ref_model = AutoModelForCausalLM.from_pretrained(ref_path, dtype=dtype).to(self.device).eval()
            self.ref_model.requires_grad_(False)

        ds_config = {
            "train_micro_batch_size_per_gpu": self.cfg.micro_batch_size,
            "gradient_accumulation_steps": 1,
            # We own the accumulation boundary: any number of micro-batches, then step().
            "managed_gradient_accumulation": False,
            # ZeRO-0 discards the norm it clips with; there we clip (and measure) in an optimizer hook.
            "gradient_clipping": self.cfg.max_grad_norm if self.cfg.zero_stage > 0 else 0.0,
            "zero_optimization": {"stage": self.cfg.zero_stage},
            "optimizer": {
                "type": "AdamW",
                "params": {
                    "lr": self.cfg.lr,
                    "betas": list(self.cfg.adam_betas),
                    "weight_decay": self.cfg.weight_decay,
                    "torch_adam": True,  # no op compilation on CPU
                },
            },
            "bf16": {"enabled": setup.dtype == "bfloat16"},
            "fp16": {"enabled": setup.dtype == "float16"},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        if self.cfg.warmup_steps > 0:
            ds_config["scheduler"] = {
                "type": "WarmupLR",
                "params": {"warmup_min_lr": 0.0, "warmup_max_lr": self.cfg.lr, "warmup_num_steps": self.cfg.warmup_steps, "warmup_type": "linear"},
            }
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config
        )
        self._grad_norm: Optional[float] = None
        if self.cfg.zero_stage == 0:
            self.optimizer.register_step_pre_hook(self._clip_and_measure)
        self.transport = None
        if setup.rank == 0:
            from rollout.weight_sync import get_transport

            kw = {"directory": setup.weight_dir} if setup.weight_dir else {}
            self.transport = get_transport(setup.weight_transport, **kw)
        self.version = 0
        # Published versions still on disk. A LoRA is read by vLLM at its first use, and with
        # asynchronous rollout a batch sampled by an older version may still be queued: keep k+1.
        self._published: list[WeightHandle] = []
        self._keep_published = 1 + setup.max_staleness

    def _clip_and_measure(self, optimizer, args, kwargs) -> None:
        """Runs after the gradient all-reduce, right before the optimizer update."""
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        self._grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def _last_grad_norm(self) -> Optional[float]:
        norm = self._grad_norm if self.cfg.zero_stage == 0 else self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    # ------------------------------------------------------------------ forward

    def _token_logprobs(self, model, mb: dict, with_entropy: bool = False):
        """[n, T-1] logprobs of the next tokens (and entropies) under ``model``."""
        logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits[:, :-1].float()
        logprobs = algorithms.logprobs_from_logits(logits, mb["labels"])
        entropy = algorithms.entropy_from_logits(logits.detach()) if with_entropy else None
        return logprobs, entropy

    def compute_logprobs(self, batch: TrainBatch) -> list[list[float]]:
        """The trainer's own logprob of every response token (no grad)."""
        self.engine.eval()
        out = []
        with torch.no_grad():
            for start in range(0, len(batch), self.cfg.micro_batch_size):
                idx = list(range(start, min(start + self.cfg.micro_batch_size, len(batch))))
                mb = _collate(batch.select(idx), self.pad_id, self.device)
                lp, _ = self._token_logprobs(self.engine.module, mb)
                for row, mask in zip(lp, mb["response_mask"]):
                    out.append(row[mask.bool()].tolist())
        return out

    # ------------------------------------------------------------------ update

    def _reference_logprobs(self, mb: dict) -> torch.Tensor:
        with torch.no_grad():
            if self.adapter_policy is not None:
                with self.adapter_policy.disabled():
                    return self._token_logprobs(self.engine.module, mb)[0]
            return self._token_logprobs(self.ref_model, mb)[0]

    def _online_dpo_loss(self, logprobs, mb, num_seq: float):
        """Online DPO on consecutive (chosen, rejected) rows; see ``algorithms.pairwise_dpo_loss``."""
        ref_lp = self._reference_logprobs(mb)
        return algorithms.pairwise_dpo_loss(
            logprobs, ref_lp, mb["response_mask"], beta=self.alg.dpo_beta, loss_type=self.alg.dpo_loss,
            label_smoothing=self.alg.dpo_label_smoothing, num_pairs=num_seq / 2,
        )

    def train_step(self, shard: TrainBatch, num_micro_batches: int) -> dict[str, float]:
        """One rollout batch's worth of updates on this rank's shard.

        ``num_micro_batches`` is the same on every rank (ZeRO-2/3 reduce at every backward).
        Sequences are split in units of ``shard.unit`` rows (2 keeps online-DPO pairs together).
        Returns sums and counts, to be reduced across ranks by the caller.
        """
        self.engine.train()
        t0 = time.perf_counter()
        stats: dict[str, float] = {"updates_applied": 0.0, "updates_skipped_nonfinite": 0.0}
        for mini in _split(list(range(len(shard))), self.cfg.mini_batches, unit=shard.unit):
            mini_batch = shard.select(mini)
            # Counts over all ranks for this mini-batch: an equal slice of the full-batch counts.
            counts = dict(
                num_sequences=shard.num_sequences / self.cfg.mini_batches,
                num_tokens=shard.num_tokens / self.cfg.mini_batches,
                max_response_len=self.setup.max_response_len,
            )
            micro = [_collate(mini_batch.select(c), self.pad_id, self.device)
                     for c in _split(list(range(len(mini_batch))), num_micro_batches, unit=shard.unit)]
            if self.cfg.mini_batches > 1:
                # Later mini-batches are off-policy: freeze the behaviour logprobs before any update.
                with torch.no_grad():
                    for mb in micro:
                        mb["old_logprobs"] = self._token_logprobs(self.engine.module, mb)[0]
            finite = True
            for mb in micro:
                loss = self._micro_batch_loss(mb, counts, stats)
                finite = self._all_ranks_agree(bool(torch.isfinite(loss)))
                if not finite:
                    break  # every rank breaks at the same micro-batch: collectives stay matched
                # DeepSpeed averages gradients over ranks; our normalization already sums them.
                self.engine.backward(loss * self.setup.world_size, scale_wrt_gas=False)
            if finite and self.cfg.zero_stage == 0:
                finite = self._all_ranks_agree(all(bool(torch.isfinite(p.grad).all()) for p in self.engine.module.parameters() if p.grad is not None))
            if not finite:
                # A non-finite loss or gradient: drop this update, keep the weights as they were.
                self.engine.zero_grad()
                stats["updates_skipped_nonfinite"] += 1
                continue
            self.engine.step()
            stats["updates_applied"] += 1
            grad_norm = self._last_grad_norm()
            if grad_norm is not None:
                stats["grad_norm"] = max(stats.get("grad_norm", 0.0), float(grad_norm))
        if stats["updates_applied"]:
            self.version += 1
        stats["params_in_memory"] = float(self.params_in_memory())
        stats["lr"] = float(self.optimizer.param_groups[0]["lr"])
        stats["train_seconds"] = time.perf_counter() - t0
        return stats

    def params_in_memory(self) -> int:
        """Model parameters this rank holds: the policy (base + adapter) plus a reference copy if any."""
        held = sum(p.numel() for p in self.engine.module.parameters())
        if self.adapter_policy is not None:
            held += self.adapter_policy.frozen_adapter_numel()
        if self.ref_model is not None:
            held += sum(p.numel() for p in self.ref_model.parameters())
        return held

    def _all_ranks_agree(self, ok: bool) -> bool:
        """True only if ``ok`` holds on every rank."""
        if self.setup.world_size == 1:
            return ok
        import torch.distributed as dist

        flag = torch.tensor([0.0 if ok else 1.0], device=self.device)
        dist.all_reduce(flag)
        return flag.item() == 0.0

    def _micro_batch_loss(self, mb: dict, counts: dict, stats: dict) -> torch.Tensor:
        """The loss of one micro-batch (normalized by whole-batch counts); adds its metrics to ``stats``."""
        alg = self.alg

        def add(key, value):
            stats[key] = stats.get(key, 0.0) + float(value)

        logprobs, entropy = self._token_logprobs(self.engine, mb, with_entropy=True)
        mask = mb["response_mask"]
        old = mb.get("old_logprobs", logprobs.detach())
        ntok = float(mask.sum())
        if alg.name == "online_dpo":
            pg_loss, dpo_metrics = self._online_dpo_loss(logprobs, mb, counts["num_sequences"])
            pg_metrics = {"clip_frac": torch.tensor(0.0), "ratio_max": torch.tensor(1.0)}
            add("dpo_reward_accuracy", dpo_metrics["reward_accuracy"])
            add("dpo_reward_margin", dpo_metrics["reward_margin"])
        else:
            is_weights = None
            if alg.tis_cap is not None:
                is_weights = algorithms.truncated_is_weights(old, mb["rollout_logprobs"], cap=alg.tis_cap)
            pg_loss, pg_metrics = algorithms.get("policy_loss", alg.policy_loss)(
                logprobs, old, mb["advantages"], mask,
                clip_low=alg.clip_low, clip_high=alg.clip_high, dual_clip=alg.dual_clip,
                aggregation=alg.loss_aggregation, is_weights=is_weights, **counts,
            )
        loss = pg_loss
        if alg.kl_coef > 0:
            ref_lp = self._reference_logprobs(mb)
            kl = algorithms.get("kl", alg.kl_estimator)(logprobs, ref_lp)
            loss = loss + alg.kl_coef * algorithms.aggregate_loss(kl, mask, alg.loss_aggregation, **counts)
            add("kl_sum", (kl.detach() * mask).sum())
        add("loss", loss.detach())
        add("pg_loss", pg_loss.detach())
        add("tokens", ntok)
        add("entropy_sum", (entropy * mask).sum())
        add("clip_frac_sum", pg_metrics["clip_frac"] * ntok)
        stats["ratio_max"] = max(stats.get("ratio_max", 0.0), float(pg_metrics["ratio_max"]))
        mismatch = (old - mb["rollout_logprobs"]).abs() * mask
        add("logprob_mismatch_sum", mismatch.sum())
        stats["logprob_mismatch_max"] = max(stats.get("logprob_mismatch_max", 0.0), float(mismatch.max()))
        return loss

    # ------------------------------------------------------------------ weights out

    @contextmanager
    def _full_parameters(self) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Full (un-partitioned) named parameters; a collective under ZeRO-3, so every rank enters it."""
        model = self.engine.module
        params = list(model.named_parameters())
        if self.cfg.zero_stage == 3:
            import deepspeed

            ctx = deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None)
        else:
            ctx = nullcontext()
        with ctx:
            yield params

    def publish_weights(self, prompts: Optional[list[list[int]]] = None) -> Optional[WeightHandle]:
        """Write the current policy for the rollout engines (rank 0); every rank must call it.

        An adapter policy publishes only its adapter (see ``trainer/adapter_policy.py``); an Arrow
        policy also needs ``prompts``, the batch about to be sampled, to average its routing over.
        """
        with self._full_parameters() as params:
            if self.transport is None:
                return None
            if self.adapter_policy is not None:
                handle = self.adapter_policy.publish(self.transport, self.version, prompts, self.pad_id)
            else:
                handle = self.transport.publish(params, self.version)
        self._published.append(handle)
        while len(self._published) > self._keep_published:  # no queued batch can use these any more
            self._release(self._published.pop(0))
        return handle

    def _release(self, handle: Optional[WeightHandle]) -> None:
        if handle is None:
            return
        if self.adapter_policy is not None:
            self.adapter_policy.release(self.transport, handle)
        else:
            self.transport.release(handle)

    def save_pretrained(self, path: str) -> Optional[str]:
        """Save the policy in HF format (loadable by transformers and vLLM) into ``path`` (rank 0 writes).

        The caller makes it atomic (writes into a temporary directory and renames it).
        """
        with self._full_parameters():
            if self.setup.rank != 0:
                return None
            if self.adapter_policy is not None:
                self.adapter_policy.save(path, base_model=self.setup.ref_model_path or self.setup.model_path)
            else:
                self.engine.module.save_pretrained(path, safe_serialization=True)
            self.tokenizer.save_pretrained(path)
            return str(path)

    # ------------------------------------------------------------------ exact resume

    def _optimizer_params(self) -> tuple[dict, list[tuple[str, torch.Tensor]]]:
        """The torch optimizer and its parameters under stable names.

        ZeRO-0: the model's own parameters, by name. ZeRO-1/2: DeepSpeed's fp32 partition of each
        parameter group on this rank (``zero/<group>``), which only the same number of ranks can load.
        """
        if self.cfg.zero_stage == 0:
            return self.optimizer, list(self.engine.module.named_parameters())
        if self.cfg.zero_stage in (1, 2):
            partitions = self.optimizer.single_partition_of_fp32_groups
            return self.optimizer.optimizer, [(f"zero/{i}", p) for i, p in enumerate(partitions)]
        raise NotImplementedError("exact resume needs trainer.zero_stage 0, 1 or 2 (ZeRO-3 partitions the parameters too)")

    def save_state(self, path: str) -> None:
        """Optimizer state, RNG state and policy version of this rank: safetensors + JSON, no pickle."""
        from safetensors.torch import save_file

        optimizer, named = self._optimizer_params()
        names = {id(p): n for n, p in named}
        tensors: dict[str, torch.Tensor] = {"rng/torch": torch.get_rng_state()}
        if self.cfg.zero_stage in (1, 2):  # the fp32 master partitions (more precise than bf16 model weights)
            tensors.update({f"master/{n}": p.detach().cpu().contiguous() for n, p in named})
        scalars: dict[str, dict] = {}
        for p, st in optimizer.state.items():
            name = names[id(p)]
            for k, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"state/{name}/{k}"] = v.detach().cpu().contiguous()
                else:
                    scalars.setdefault(name, {})[k] = v
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        meta = {"version": self.version, "param_groups": groups, "scalars": scalars, "rank": self.setup.rank,
                "world_size": self.setup.world_size, "zero_stage": self.cfg.zero_stage,
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None}
        Path(path).mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(Path(path) / f"trainer-rank{self.setup.rank}.safetensors"))
        (Path(path) / f"trainer-rank{self.setup.rank}.json").write_text(json.dumps(meta, default=list))

    def load_state(self, path: str) -> int:
        """Restore what ``save_state`` wrote (the weights come from the checkpoint's model files)."""
        from safetensors.torch import load_file

        meta = json.loads((Path(path) / f"trainer-rank{self.setup.rank}.json").read_text())
        saved = (meta.get("zero_stage", 0), meta.get("world_size", 1))
        if self.cfg.zero_stage != saved[0] or (self.cfg.zero_stage > 0 and self.setup.world_size != saved[1]):
            raise ValueError(f"{path}: optimizer state of ZeRO-{saved[0]} on {saved[1]} rank(s) cannot be loaded by "
                             f"ZeRO-{self.cfg.zero_stage} on {self.setup.world_size} rank(s)")
        tensors = load_file(str(Path(path) / f"trainer-rank{self.setup.rank}.safetensors"))
        optimizer, named = self._optimizer_params()
        params = dict(named)
        with torch.no_grad():
            for key, value in tensors.items():
                if key.startswith("state/"):
                    name, field = key[len("state/") :].rsplit("/", 1)
                    optimizer.state[params[name]][field] = value.to(self.device)
                elif key.startswith("master/"):
                    params[key[len("master/") :]].copy_(value.to(self.device))
        for name, fields in meta["scalars"].items():
            optimizer.state[params[name]].update(fields)
        for group, saved_group in zip(optimizer.param_groups, meta["param_groups"]):
            group.update({k: tuple(v) if isinstance(v, list) else v for k, v in saved_group.items()})
        if self.scheduler is not None and meta.get("scheduler") is not None:
            self.scheduler.load_state_dict(meta["scheduler"])
        torch.set_rng_state(tensors["rng/torch"])
        self.version = int(meta["version"])
        return self.version

    def library_sources(self, checkpoint: str) -> dict[str, str]:
        """{name suffix: adapter directory inside ``checkpoint``} to write into the adapter library."""
        return {k: str(v) for k, v in self.adapter_policy.library_sources(checkpoint).items()}

    def close(self) -> None:
        if self.transport is not None:
            for handle in self._published:
                self._release(handle)
            self._published = []
        if self.transport is not None and hasattr(self.transport, "close"):
            self.transport.close()


def _split(items: list[int], parts: int, unit: int = 1) -> list[list[int]]:
    """Split into ``parts`` contiguous chunks of whole ``unit``-sized groups, sizes differing by at most one unit."""
    groups = [items[i : i + unit] for i in range(0, len(items), unit)]
    parts = max(1, min(parts, len(groups))) if groups else 1
    size, extra = divmod(len(groups), parts)
    out, start = [], 0
    for k in range(parts):
        end = start + size + (1 if k < extra else 0)
        out.append([i for g in groups[start:end] for i in g])
        start = end
    return out
