"""The training loop. A light driver over heavy workers; one GRPO step reads top to bottom:

    prompts  = sampler.next_batch()                      B prompts
    groups   = rollout.generate(prompts, n=G)            B x G completions + logprobs (vLLM actors)
    rewards  = scorer.score(...)                         [B, G]
    adv      = advantage_fn(rewards)                     [B, G]
    stats    = trainer.train_step(batch)                 DeepSpeed ranks
    rollout.load_weights(trainer.publish_weights())      in place, no engine restart
"""

from __future__ import annotations

import collections
import inspect
import json
import logging
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from rl import algorithms
from rl.config import BUILTIN_PREFIX, LORA_RANKS, Recipe, RecipeError
from rl.data import PromptSampler, load_prompt_sets
from rl import checkpoint as ckpt
from rl.metrics import MetricsLogger, read_metrics
from rl.types import Completion, SamplingSpec, TrainBatch
from rewards import RewardScorer, RewardSpec

log = logging.getLogger("rl")


class _Interrupted(SystemExit):
    """Raised after a clean stop on SIGTERM/SIGINT; exits with 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)


class TrainingDiverged(RuntimeError):
    """Too many non-finite updates in a row; the last good policy was checkpointed."""


@dataclass
class ResolvedPaths:
    model: str
    train: str
    test: Optional[str]


def resolve_builtins(recipe: Recipe, log_fn=print) -> ResolvedPaths:
    """Build (or reuse from cache) the embedded tiny model and task when the recipe asks for them."""
    model, train, test = recipe.model.path, recipe.data.train, recipe.data.test
    uses_builtin = any(v and v.startswith(BUILTIN_PREFIX) for v in (model, train, test))
    if uses_builtin:
        from rl.tasks.tiny_model import TinyModelSpec, build_tiny_model

        known_models, known_data = {"builtin:tiny-arithmetic"}, {"builtin:arithmetic"}
        if model.startswith(BUILTIN_PREFIX) and model not in known_models:
            raise RecipeError(f"recipe field 'model.path': unknown builtin '{model}' (known: {sorted(known_models)})")
        for field, v in (("data.train", train), ("data.test", test)):
            if v and v.startswith(BUILTIN_PREFIX) and v not in known_data:
                raise RecipeError(f"recipe field '{field}': unknown builtin '{v}' (known: {sorted(known_data)})")
        root = Path(build_tiny_model(TinyModelSpec(), log=log_fn))
        if model.startswith(BUILTIN_PREFIX):
            model = str(root / "model")
        if train.startswith(BUILTIN_PREFIX):
            train = str(root / "data" / "train.jsonl")
            if test is None:
                test = str(root / "data" / "test.jsonl")
        if test and test.startswith(BUILTIN_PREFIX):
            test = str(root / "data" / "test.jsonl")
    return ResolvedPaths(model=model, train=train, test=test)


def _advantage_fn(recipe: Recipe):
    """The registered advantage estimator with the recipe's options bound (only those it takes)."""
    fn = algorithms.get("advantage", recipe.algorithm.advantage)
    options = {"normalize_std": recipe.algorithm.normalize_std, "std_eps": recipe.algorithm.std_eps}
    accepted = inspect.signature(fn).parameters
    bound = {k: v for k, v in options.items() if k in accepted}
    return lambda rewards: fn(rewards, **bound)


class Trainer:
    """Owns one run: the prompt sets, the reward scorer, the rollout and trainer groups."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.started = time.time()
        # Everything that can fail on bad input happens here, before Ray starts.
        self.resume_from = ckpt.find_resume_checkpoint(recipe)
        self.resume_state = ckpt.read_state(self.resume_from, recipe) if self.resume_from else None
        if self.resume_from is not None:
            self.run_dir = self.resume_from.parent.parent
        else:
            self.run_dir = recipe.run_dir(time.strftime("%Y%m%d-%H%M%S", time.localtime(self.started)))
        self.scorer = RewardScorer(
            [RewardSpec(fn=r.fn, weight=r.weight) for r in recipe.rewards.functions],
            fallback=recipe.rewards.fallback, timeout_seconds=recipe.rewards.timeout_seconds,
        )
        self.advantages = _advantage_fn(recipe)
        algorithms.get("policy_loss", recipe.algorithm.policy_loss)
        self.paths = resolve_builtins(recipe, log_fn=lambda s: print(f"[rl] {s}", flush=True))
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.paths.model, trust_remote_code=recipe.model.trust_remote_code)
        max_prompt = recipe.rollout.max_model_len - recipe.rollout.max_new_tokens
        self.train_set, self.test_set = load_prompt_sets(
            recipe.data, self.paths.train, self.paths.test, self.tokenizer, recipe.seed, max_prompt
        )
        self.sampler = PromptSampler(len(self.train_set), recipe.data.prompts_per_step, recipe.seed, recipe.data.shuffle)
        self.step = 0
        # The policy starts from the checkpoint when resuming; the KL reference stays the original model.
        self.policy_init_path = str(self.resume_from) if self.resume_from else self.paths.model
        self.adapter_init_dir, self.adapter_rank, self.adapter_kind = None, 0, None
        self.adapter_expert_dirs: list[str] = []
        if recipe.adapter.mode != "none":
            self._prepare_adapter()
        self._handle = None  # the policy version the engines hold
        self._prefetched: collections.deque = collections.deque()  # (sampler state, indices, pending rollout)
        self._nonfinite_in_a_row = 0
        self._reward_seconds = self._route_seconds = 0.0
        self.rollout = None
        self.trainer = None

    # ------------------------------------------------------------------ adapters

    def _prepare_adapter(self) -> None:
        """Check library experts against the base model; pick the adapter to start from and how vLLM serves it."""
        from adapters import AdapterLibrary, LibraryError
        from trainer.adapter_policy import served_arrow_rank

        ad = self.recipe.adapter
        self.policy_init_path = self.paths.model  # the base never changes; only the adapter trains
        self.adapter_kind = {"sparse": "sparse", "arrow": "arrow"}.get(ad.mode, "lora")
        try:
            lib = AdapterLibrary(ad.library, create=bool(ad.save_as)) if ad.library else None
            experts = [lib.get(name) for name in ad.experts]  # verifies the content hashes
            for name in ad.experts:
                lib.check_compatible(name, self.paths.model)
            # Arrow training its experts writes each back as <save_as>-<expert>.
            writes = [f"{ad.save_as}-{e}" for e in ad.experts] if ad.mode == "arrow" and ad.arrow_train == "experts" else [ad.save_as]
            taken = [w for w in writes if ad.save_as and w in lib]
            if taken and self.resume_from is None:  # a resumed run replaces its own
                raise LibraryError(f"adapter.save_as: expert(s) {taken} already exist in {lib.root}")
            if ad.mode in ("continue", "merge") and experts[0].adapter_type == "sparse":
                self.adapter_kind = "sparse"
            if ad.mode == "arrow":
                lib.check_mergeable(ad.experts)  # LoRA experts of one rank and one set of target modules
                if any(e.adapter_type != "lora" for e in experts):
                    raise LibraryError("adapter.mode=arrow routes LoRA experts; sparse experts cannot be routed")
                self.adapter_expert_dirs = [str(e.path) for e in experts]
                new_rank = ad.rank if ad.arrow_train == "new" else 0
                self.adapter_rank = served_arrow_rank(int(experts[0].rank), len(experts), new_rank)
            elif self.adapter_kind == "lora":
                self.adapter_rank = int(experts[0].rank) if ad.mode == "continue" else ad.rank
            if self.resume_from is not None:
                self.adapter_init_dir = str(self.resume_from)
            elif ad.mode == "continue":
                self.adapter_init_dir = str(experts[0].path)
            elif ad.mode == "merge":
                stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(self.started))
                name = f"{self.recipe.name}-merge-{stamp}"
                if self.adapter_kind == "sparse":  # overlaps averaged; the merge keeps the union of the masks
                    merged = lib.merge(ad.experts, name, weights=ad.merge_weights)
                else:
                    merged = lib.merge(ad.experts, name, weights=ad.merge_weights, rank=ad.rank)
                self.adapter_init_dir = str(merged.path)
        except LibraryError as e:
            raise RecipeError(f"recipe section 'adapter': {e}") from None
        self.library = lib

    def _write_back_adapter(self, checkpoint: str, summary: dict) -> Optional[str]:
        """Save the trained adapter(s) into the library with their provenance.

        Called at every checkpoint and at the end; each call replaces the run's previous version.
        """
        ad = self.recipe.adapter
        if ad.mode == "none" or not ad.save_as:
            return None
        from rl.config import recipe_to_yaml

        meta = {
            "base_model": self.paths.model,
            "task": f"{self.recipe.algorithm.name} on {self.paths.train}",
            "data": self.paths.train,
            "recipe": {"yaml": recipe_to_yaml(self.recipe)},
            "metrics": {k: summary[k] for k in ("accuracy_before", "accuracy_after") if k in summary},
            "parents": list(ad.experts),
            "steps": self.step,
        }
        if ad.mode == "arrow":
            meta["extra"] = {"arrow": {"experts": list(ad.experts), "top_k": ad.top_k, "temperature": ad.router_temperature,
                             "trained": ad.arrow_train}}
        paths = [str(self.library.add(ad.save_as + suffix, source, meta, replace=True).path)
                 for suffix, source in self.trainer.library_sources(checkpoint).items()]
        return paths[0] if len(paths) == 1 else paths

    # ------------------------------------------------------------------ workers

    def engine_spec(self):
        from rollout.vllm_worker import EngineSpec

        r = self.recipe
        return EngineSpec(
            model_path=self.policy_init_path,
            dtype=r.model.dtype,
            max_model_len=r.rollout.max_model_len,
            gpu_memory_utilization=r.rollout.gpu_memory_utilization,
            cpu_kvcache_gib=r.rollout.cpu_kvcache_gib,
            enforce_eager=r.rollout.enforce_eager,
            tensor_parallel_size=r.rollout.tensor_parallel_size,
            engine_in_process=r.rollout.engine_in_process,
            seed=r.seed,
            trust_remote_code=r.model.trust_remote_code,
            max_lora_rank=next((k for k in LORA_RANKS if k >= self.adapter_rank), 0) if self.adapter_rank else 0,
            # Per-prompt Arrow serving: a batch holds up to B distinct LoRAs (more wait for a slot).
            max_loras=min(r.data.prompts_per_step, 64) if self.adapter_kind == "arrow" and r.adapter.arrow_serving == "prompt" else 1,
        )

    def start_workers(self) -> None:
        from rl.workers import RolloutGroup, TrainerGroup, init_ray
        from trainer.policy_trainer import TrainerSetup

        r = self.recipe
        if r.use_ray:
            init_ray(r.rollout.num_actors * r.rollout.num_cpus_per_actor + r.trainer.num_ranks * r.trainer.num_cpus_per_rank)
        engine = self.engine_spec()
        setup = TrainerSetup(
            model_path=self.policy_init_path,
            ref_model_path=self.paths.model,
            dtype=r.model.dtype,
            trainer=r.trainer,
            algorithm=r.algorithm,
            max_response_len=r.rollout.max_new_tokens,
            seed=r.seed,
            master_port=0,
            trust_remote_code=r.model.trust_remote_code,
            adapter=r.adapter if r.adapter.mode != "none" else None,
            adapter_init_dir=self.adapter_init_dir,
            adapter_expert_dirs=self.adapter_expert_dirs,
            max_staleness=r.rollout.max_staleness,
            calibration_token_ids=(self.train_set.prompt_token_ids[: r.adapter.calibration_prompts]
                                   if self.adapter_kind == "sparse" and self.adapter_init_dir is None else None),
        )
        self.trainer = TrainerGroup.create(setup, r.trainer.num_ranks, r.use_ray, r.trainer.num_cpus_per_rank, r.trainer.num_gpus_per_rank)
        self.rollout = RolloutGroup.create(engine, r.rollout.num_actors, r.use_ray, r.rollout.num_cpus_per_actor,
                                           r.rollout.num_gpus_per_actor, max_restarts=r.rollout.max_restarts)
        if r.adapter.mode != "none" and not self._routes_per_batch:
            # The engines serve the base model; the policy is the adapter, pushed before the first rollout.
            self._handle = self.trainer.publish_weights()
            self.rollout.load_weights(self._handle)

    @property
    def _routes_per_batch(self) -> bool:
        """An Arrow policy is served with its routing averaged over the batch about to be sampled."""
        return self.adapter_kind == "arrow"

    def _publish_for(self, prompt_token_ids: list[list[int]]) -> None:
        t0 = time.perf_counter()
        self._handle = self.trainer.publish_weights(prompt_token_ids)
        self.rollout.load_weights(self._handle)
        self._route_seconds += time.perf_counter() - t0

    def stop_workers(self) -> None:
        if self.trainer is not None:
            self.trainer.close()
            self.trainer.shutdown()
        if self.rollout is not None:
            self.rollout.shutdown()
        self.trainer = self.rollout = None
        self._prefetched.clear()  # batches in flight died with the engines

    # ------------------------------------------------------------------ pieces of a step

    def _sampling(self, step: int, n: int, greedy: bool = False) -> SamplingSpec:
        ro = self.recipe.rollout
        return SamplingSpec(
            n=n,
            max_new_tokens=(self.recipe.eval.max_new_tokens or ro.max_new_tokens) if greedy else ro.max_new_tokens,
            temperature=0.0 if greedy else ro.temperature,
            top_p=1.0 if greedy else ro.top_p,
            top_k=-1 if greedy else ro.top_k,
            seed=(self.recipe.seed * 1_000_003 + step) * 65_536,
        )

    def evaluate(self, tag: str) -> dict[str, float]:
        """Greedy decoding on the held-out set through vLLM; accuracy = share the accuracy reward accepts."""
        from rl.evaluate import evaluate_prompts

        if self._routes_per_batch:
            self._publish_for(self.test_set.prompt_token_ids)
        return evaluate_prompts(self.rollout, self.test_set, self.scorer, self.recipe.accuracy_reward, self._sampling(0, 1, greedy=True))

    def _rollout(self, indices: list[int], seed_step: int):
        """B prompts -> (B*G completions, prompt-major; ScoreResult; rewards [B, G])."""
        return self._scored(indices, self.rollout.collect(self._submit_rollout(indices, seed_step)))

    def _submit_rollout(self, indices: list[int], seed_step: int):
        G = self.recipe.algorithm.group_size
        return self.rollout.submit_generate([self.train_set.prompt_token_ids[i] for i in indices], self._sampling(seed_step, G))

    def _next_batch(self) -> tuple[list[int], list[list[Completion]]]:
        """This step's prompt indices and completion groups (B groups of G).

        Synchronous (``rollout.max_staleness`` 0): sampled now, by the current policy. Asynchronous
        (k > 0): the batches of the next k steps are submitted too, so the engines sample them while
        this step trains; the policy pushed after this step reaches only batches submitted later.
        A batch is thus sampled by a policy at most k versions old.
        """
        k = self.recipe.rollout.max_staleness
        if k == 0:
            indices = self.sampler.next_batch()
            if self._routes_per_batch:
                self._publish_for([self.train_set.prompt_token_ids[i] for i in indices])
            return indices, self.rollout.collect(self._submit_rollout(indices, self.step + 1))
        while len(self._prefetched) <= k and self.step + len(self._prefetched) < self.recipe.steps:
            state = self.sampler.state_dict()  # where a checkpoint must resume if this batch is not trained yet
            indices = self.sampler.next_batch()
            step = self.step + len(self._prefetched) + 1
            self._prefetched.append((state, indices, self._submit_rollout(indices, step)))
        _, indices, pending = self._prefetched.popleft()
        return indices, self.rollout.collect(pending)

    def _scored(self, indices: list[int], groups: list):
        G = self.recipe.algorithm.group_size
        flat = [c for g in groups for c in g]
        t0 = time.perf_counter()
        result = self.train_set.score(self.scorer, [indices[c.prompt_index] for c in flat], [c.text for c in flat])
        self._reward_seconds += time.perf_counter() - t0
        return flat, result, torch.tensor(result.total, dtype=torch.float32).view(len(indices), G)

    def _resample_ties(self, indices, flat, result, rewards):
        """2-GRPO+RS: regenerate prompts whose whole group tied, for a bounded number of rounds.

        Returns the updated (flat, per_reward, rewards), the number of extra rollouts spent and the
        reward failures of the extra rounds ({kind: count}).
        """
        G = self.recipe.algorithm.group_size
        per_reward = {k: list(v) for k, v in result.per_reward.items()}
        extra, failures = 0, {}
        for round_ in range(1, self.recipe.algorithm.max_resample_rounds + 1):
            tied = algorithms.tied_groups(rewards).nonzero().flatten().tolist()
            if not tied:
                break
            # A seed per (step, round), offset by 1e6 so it never meets a main rollout's seed.
            new_flat, new_result, new_rewards = self._rollout([indices[b] for b in tied], self.step * 16 + round_ + 1_000_000)
            extra += len(new_flat)
            for kind, count in new_result.failures.items():
                failures[kind] = failures.get(kind, 0) + count
            for j, b in enumerate(tied):
                rows = range(b * G, (b + 1) * G)
                for g, row in enumerate(rows):
                    c = new_flat[j * G + g]
                    c.prompt_index = b
                    flat[row] = c
                    for k in per_reward:
                        per_reward[k][row] = new_result.per_reward[k][j * G + g]
                rewards[b] = new_rewards[j]
        return flat, per_reward, rewards, extra, failures

    def _online_dpo_pairs(self, flat, advantages):
        """Keep discordant pairs only, each as (chosen, rejected): the +1 row of 2-GRPO first."""
        keep_flat, keep_adv = [], []
        for b in range(advantages.shape[0]):
            a0, a1 = advantages[b].tolist()
            if a0 == a1:
                continue  # a tie carries no preference
            first, second = (2 * b, 2 * b + 1) if a0 > a1 else (2 * b + 1, 2 * b)
            keep_flat += [flat[first], flat[second]]
            keep_adv += [1.0, -1.0]
        return keep_flat, keep_adv

    def train_one_step(self) -> dict[str, float]:
        r = self.recipe
        t_start = time.perf_counter()
        self._reward_seconds = self._route_seconds = 0.0
        policy_version = self._handle.version if self._handle else 0  # the policy this step trains
        indices, groups = self._next_batch()
        flat, result, rewards = self._scored(indices, groups)  # N = B*G prompt-major; rewards [B, G]
        per_reward, extra_rollouts, failures = result.per_reward, 0, dict(result.failures)
        tied_before = float(algorithms.tied_groups(rewards).float().mean())
        if r.algorithm.tie_handling == "resample":
            flat, per_reward, rewards, extra_rollouts, extra_failures = self._resample_ties(indices, flat, result, rewards)
            for kind, count in extra_failures.items():  # the resampling rounds' failures count too
                failures[kind] = failures.get(kind, 0) + count
        t_gen = time.perf_counter()

        advantages = self.advantages(rewards)  # [B, G]
        train_flat, train_adv, unit = flat, advantages.flatten().tolist(), 1
        if r.algorithm.name == "online_dpo":
            train_flat, train_adv = self._online_dpo_pairs(flat, advantages)
            unit = 2
        t_reward = time.perf_counter()

        stats: dict[str, float] = {}
        if train_flat:
            batch = TrainBatch(
                prompt_token_ids=[c.prompt_token_ids for c in train_flat],
                response_token_ids=[c.token_ids for c in train_flat],
                advantages=train_adv,
                rollout_logprobs=[c.logprobs for c in train_flat],
                num_sequences=len(train_flat),
                num_tokens=sum(len(c.token_ids) for c in train_flat),
                unit=unit,
            )
            stats = self.trainer.train_step(batch, r.trainer.micro_batch_size)
        t_train = time.perf_counter()

        if stats.get("updates_applied") and not self._routes_per_batch:  # nothing to push when no update was applied
            self._handle = self.trainer.publish_weights()
            self.rollout.load_weights(self._handle)
        t_sync = time.perf_counter()
        self.step += 1

        acc = per_reward[r.accuracy_reward]
        lengths = [len(c.token_ids) for c in flat]
        metrics = {
            "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std().item() if rewards.numel() > 1 else 0.0,
            "accuracy": sum(acc) / len(acc),
            "zero_variance_groups": float(algorithms.tied_groups(rewards).float().mean()),
            "zero_variance_groups_sampled": tied_before,  # before any tie resampling
            "rollouts": float(len(flat) + extra_rollouts),
            "resampled_rollouts": float(extra_rollouts),
            "trained_sequences": float(len(train_flat)),
            "response_length": sum(lengths) / len(lengths),
            "truncated_fraction": sum(c.finish_reason == "length" for c in flat) / len(flat),
            "tokens_per_second": sum(lengths) / max(t_gen - t_start - self._reward_seconds - self._route_seconds, 1e-9),
            "time_generate": t_gen - t_start - self._reward_seconds - self._route_seconds,  # async: waiting for it
            "time_reward": self._reward_seconds + (t_reward - t_gen),
            "time_train": t_train - t_reward,
            "time_weight_sync": t_sync - t_train + self._route_seconds,  # Arrow: routed and pushed before sampling
            "time_step": t_sync - t_start,
            "weight_sync_bytes": float(self._handle.num_bytes) if stats else 0.0,
            "policy_version": float(self._handle.version) if self._handle else 0.0,
            # Versions between the policy this step trained and the one that sampled its batch.
            "rollout_staleness": float(policy_version - min(c.policy_version for c in flat)),
            "rollout_restarts": float(self.rollout.restarts),
            **{f"reward_failures_{k}": float(v) for k, v in failures.items()},
            **stats,
        }
        for name, scores in per_reward.items():
            metrics[f"reward/{name}"] = sum(scores) / len(scores)
        return metrics

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> str:
        """Policy (HF format) + trainer and driver state, written atomically; see ``rl/checkpoint.py``."""
        resumable = self.recipe.trainer.zero_stage in (0, 1, 2)

        def write(tmp: Path) -> None:
            self.trainer.save_pretrained(str(tmp))
            if resumable:
                self.trainer.save_state(str(tmp / "trainer_state"))
            state = {
                "step": self.step,
                # Prefetched batches (asynchronous rollout) are not trained yet: resume draws them again.
                "sampler": self._prefetched[0][0] if self._prefetched else self.sampler.state_dict(),
                "policy_version": self._handle.version if self._handle else 0,
                "reward_failures": dict(self.scorer.total_failures),
                "recipe_fingerprint": ckpt.recipe_fingerprint(self.recipe),
                "base_model": self.paths.model,
                "resumable": resumable,
            }
            (tmp / ckpt.STATE_FILE).write_text(json.dumps(state, indent=2))

        path = ckpt.write_atomically(self.run_dir / "checkpoints" / f"step_{self.step:06d}", write)
        ckpt.prune(self.run_dir, self.recipe.checkpoint.keep_last)
        return str(path)

    def _install_stop_handlers(self) -> list:
        """SIGTERM and SIGINT ask the loop to stop after the current step (the list gets the signal)."""
        received: list = []
        self._old_handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old_handlers[sig] = signal.signal(sig, lambda signum, frame: received.append(signum))
        return received

    def _restore_signal_handlers(self) -> None:
        for sig, handler in getattr(self, "_old_handlers", {}).items():
            signal.signal(sig, handler)
        self._old_handlers = {}

    def _check_numerics(self, metrics: dict, logger) -> None:
        """Skipped (non-finite) updates are logged; ``trainer.max_nonfinite_steps`` in a row stop the run."""
        if not metrics.get("updates_skipped_nonfinite"):
            self._nonfinite_in_a_row = 0
            return
        self._nonfinite_in_a_row += 1
        logger.print(f"[rl] step {self.step}: non-finite loss or gradient, update skipped ({self._nonfinite_in_a_row} in a row)")
        if self._nonfinite_in_a_row >= self.recipe.trainer.max_nonfinite_steps:
            # Skipped updates never touched the weights: the current policy is the last good one.
            path = self.save_checkpoint()
            raise TrainingDiverged(
                f"{self._nonfinite_in_a_row} steps in a row had a non-finite loss or gradient (trainer.max_nonfinite_steps); "
                f"stopped at step {self.step}. The last good policy is in {path}."
            )

    def _restore(self) -> None:
        """Continue exactly where the checkpoint left off (weights were loaded from it at start-up)."""
        state = self.resume_state
        self.trainer.load_state(str(self.resume_from / "trainer_state"))
        self.step = int(state["step"])
        self.sampler.load_state_dict(state["sampler"])
        for kind, count in state["reward_failures"].items():
            self.scorer.total_failures[kind] = count

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict:
        r = self.recipe
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "recipe.resolved.yaml").write_text(_dump_yaml(r))
        start_step = int(self.resume_state["step"]) if self.resume_state else 0
        if self.resume_state:
            # Steps after the checkpoint are redone: their rows go, so each step is logged exactly once.
            ckpt.truncate_metrics(self.run_dir, start_step)
        logger = MetricsLogger(self.run_dir, r.steps, tensorboard=r.logging.tensorboard, progress=r.logging.progress, start_step=start_step)
        logger.print(
            f"[rl] {r.name}: B={r.data.prompts_per_step} prompts x G={r.algorithm.group_size} = {r.rollouts_per_step} rollouts/step, "
            f"{r.steps} steps, {r.rollout.num_actors} rollout actor(s), {r.trainer.num_ranks} trainer rank(s), ZeRO-{r.trainer.zero_stage}; "
            f"train {len(self.train_set)} / held-out {len(self.test_set)} prompts; model {self.paths.model}; run dir {self.run_dir}"
        )
        summary: dict = {"name": r.name, "run_dir": str(self.run_dir), "model": self.paths.model}
        try:
            t0 = time.perf_counter()
            self.start_workers()
            # After Ray's start-up, which installs handlers of its own.
            stop_signal = self._install_stop_handlers()
            summary["startup_seconds"] = time.perf_counter() - t0
            if self.resume_state:
                self._restore()
                logger.print(f"[rl] resumed from {self.resume_from} at step {self.step}")
                before = [row for row in read_metrics(self.run_dir, "eval") if row["step"] == 0]
                if before:
                    summary["accuracy_before"] = before[0]["accuracy"]
            elif r.eval.before:
                ev = self.evaluate("before")
                logger.log(0, ev, kind="eval")
                summary["accuracy_before"] = ev["accuracy"]
                logger.print(f"[rl] held-out accuracy before RL: {ev['accuracy']:.3f} ({int(ev['num_examples'])} prompts, greedy)")
            t_train = time.perf_counter()
            last_ckpt = None
            while self.step < r.steps:
                if stop_signal:
                    break
                metrics = self.train_one_step()
                logger.log(self.step, metrics)
                self._check_numerics(metrics, logger)
                if r.eval.every and self.step % r.eval.every == 0 and self.step < r.steps:
                    logger.log(self.step, self.evaluate(f"step {self.step}"), kind="eval")
                if r.checkpoint.every and self.step % r.checkpoint.every == 0:
                    last_ckpt = self.save_checkpoint()
                    self._write_back_adapter(last_ckpt, summary)
            summary["train_seconds"] = time.perf_counter() - t_train
            if stop_signal:
                # SIGTERM / Ctrl-C: keep the work done so far, then stop everything cleanly.
                last_ckpt = self.save_checkpoint()
                logger.print(f"[rl] {signal.Signals(stop_signal[0]).name}: checkpoint at step {self.step} in {last_ckpt}; "
                             f"continue with resume=auto")
                summary.update(checkpoint=last_ckpt, steps=self.step, interrupted_by=signal.Signals(stop_signal[0]).name)
                raise _Interrupted(stop_signal[0])
            if r.eval.after:
                ev = self.evaluate("after")
                logger.log(self.step, ev, kind="eval")
                summary["accuracy_after"] = ev["accuracy"]
            if r.checkpoint.save_final and (last_ckpt is None or not last_ckpt.endswith(f"{self.step:06d}")):
                last_ckpt = self.save_checkpoint()
            summary["checkpoint"] = last_ckpt
            summary["steps"] = self.step
            summary["library_expert"] = self._write_back_adapter(last_ckpt, summary)
            summary["reward_failures"] = dict(self.scorer.total_failures)
        finally:
            logger.close()
            self.stop_workers()
            self._restore_signal_handlers()
            if "steps" in summary:
                summary["total_seconds"] = time.time() - self.started
                (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        _print_summary(summary)
        return summary


def _dump_yaml(recipe: Recipe) -> str:
    from rl.config import recipe_to_yaml

    return recipe_to_yaml(recipe)


def _print_summary(s: dict) -> None:
    lines = [f"[rl] done: {s['name']} ({s['steps']} steps in {s.get('train_seconds', 0):.0f} s of training, {s['total_seconds']:.0f} s in all)"]
    if "accuracy_before" in s and "accuracy_after" in s:
        lines.append(
            f"[rl] held-out accuracy: {s['accuracy_before']:.3f} -> {s['accuracy_after']:.3f} "
            f"({100 * (s['accuracy_after'] - s['accuracy_before']):+.1f} points)"
        )
    lines.append(f"[rl] checkpoint: {s.get('checkpoint')}   metrics: {s['run_dir']}/metrics.jsonl   summary: {s['run_dir']}/summary.json")
    print("\n".join(lines), flush=True)


def train(recipe: Recipe) -> dict:
    return Trainer(recipe).fit()
