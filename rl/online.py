"""Online RL from the policy's own samples: GRPO (any G), 2-GRPO (+RS), PPO with a critic, on-policy distillation
and online DPO. One step:

    batch    = rollouts.next_batch(...)                  B prompts, each with its rollouts + logprobs, scored
                                                         (rl.rollouts: vLLM actors, episodes, prefetch)
    allocation.complete(batch)                           further rounds: tied groups again (2-GRPO+RS),
                                                         Reinforce-Ada until each prompt has signal
    rows, adv = training_rows(batch)                     rewards shaped, advantages per group; every rollout
                                                         (GRPO), a pool's subset, or discordant pairs (online DPO)
    _add_token_advantages(rows)                          per token: a teacher's verdict on each sampled token, or
                                                         PPO's GAE from the critic's values (rl.token_advantages)
    stats    = trainer.train_step(rows)                  DeepSpeed ranks (PPO: the critic steps beside the policy)
    workers.publish()                                    trainer rank 0 -> every engine, in place, no engine restart

The loop, checkpoints and summary are ``rl.run.Run``'s; the policy (full model or an adapter)
answers for itself in the trainer, so nothing here branches on its kind except through
``PolicySpec``'s answers (``routes_per_batch``).
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from typing import Callable, Optional

from rl import checkpoint as ckpt
from rl.agents import make_episode_runner
from rl.allocation import make_allocation, training_rows
from rl.config import Recipe, RecipeError
from rl.episodes import episode_metrics
from rl.metrics import MetricsLogger, PhaseTimer, read_metrics
from rl.models import check_same_tokenizer, resolve_model_path
from rl.prepare import check_library_write, load_task, prepare_policy, sampling
from rl.resources import engine_spec, memory_warning, trainer_memory
from rl.rollouts import Rollouts, Sampled
from rl.run import Run, TrainingDiverged
from rl.token_advantages import ppo_targets, teacher_token_advantages
from rollout.types import Completion, SamplingSpec
from trainer import algorithms
from trainer.types import TrainBatch


def advantage_fn(recipe: Recipe):
    """The registered advantage estimator with the recipe's options bound (only those it takes)."""
    fn = algorithms.get("advantage", recipe.algorithm.advantage)
    options = {"normalize_std": recipe.algorithm.normalize_std, "std_eps": recipe.algorithm.std_eps}
    bound = {k: v for k, v in options.items() if k in inspect.signature(fn).parameters}
    return lambda rewards: fn(rewards, **bound)


def train_then_sync(rollout, colocated: bool, timer: PhaseTimer, train: Callable[[], dict],
                    publish: Callable[[dict], None]) -> dict:
    """One train step, then the weight push, timed as ``train`` and ``weight_sync``; returns the step's stats.

    Colocated (``rollout.colocate``), the engines give their GPU memory to the trainer ranks beside them while the
    step runs, then take it back in two parts: the weights first, so the push lands while the KV cache is still
    freed, and the KV cache only once the new weights are in.
    """
    with timer.phase("train"):
        if colocated:
            rollout.call_all("sleep")
        stats = train()
    with timer.phase("weight_sync"):
        if colocated:
            rollout.call_all("wake_up", ["weights"])
        publish(stats)
        if colocated:
            rollout.call_all("wake_up", None)
    return stats


class OnlineRun(Run):
    """One GRPO / 2-GRPO / online-DPO run. Everything that can fail on bad input happens here, before Ray starts."""

    def __init__(self, recipe: Recipe):
        resume_from = ckpt.find_resume_checkpoint(recipe)
        super().__init__(recipe, resume_from.parent.parent if resume_from is not None else None)
        self.resume_from = resume_from
        self.resume_state = ckpt.read_state(self.resume_from, recipe) if self.resume_from else None
        self.advantages = advantage_fn(recipe)
        self.algorithm = recipe.algorithm.spec  # which rows train, under which loss
        algorithms.get("policy_loss", recipe.algorithm.policy_loss)
        task = load_task(recipe)
        self.paths, self.tokenizer, self.scorer = task.paths, task.tokenizer, task.scorer
        self.train_set, self.test_set = task.train_set, task.test_set
        # Multi-turn: each rollout is an episode with the recipe's environment or agent (None: one completion).
        self.episodes = make_episode_runner(recipe, self.tokenizer)
        self.max_response_len = recipe.rollout.max_new_tokens * (recipe.environment.max_turns if self.episodes else 1)
        self.allocation = make_allocation(recipe)  # how many rollouts each prompt gets
        self.rollouts = Rollouts(recipe, self.train_set, self.scorer, self.episodes, self.allocation, self.print)
        check_library_write(recipe, resuming=self.resume_from is not None)
        # Resuming starts the policy from the checkpoint; the KL reference stays the original model.
        self.policy = prepare_policy(recipe, self.paths.model, self.train_set,
                                     start_from=str(self.resume_from) if self.resume_from else None,
                                     merge_into=self.run_dir / "start-adapter")
        # On-policy distillation: the teacher scores every sampled token (its own engines, the policy's tokenizer).
        self.teacher_model = None
        if recipe.teacher.model is not None:
            self.teacher_model = resolve_model_path(recipe.teacher.model, "teacher.model")
            check_same_tokenizer(self.teacher_model, self.paths.model, "teacher.model", recipe.model.trust_remote_code)
        # PPO: the critic starts from critic.model, by default the policy's base model (on resume: its checkpoint).
        self.critic_model = resolve_model_path(recipe.critic.model, "critic.model") if recipe.critic.model else None
        self._handle = None  # the policy version the engines hold
        # GiB per trainer rank by part, said at start (with a warning when it is more than the machine has)
        self.memory_estimate = trainer_memory(recipe, self.policy, max(map(len, self.train_set.prompt_token_ids), default=0),
                                              self.max_response_len)

    # ------------------------------------------------------------------ workers

    def start_workers(self) -> None:
        from rl.launch import Workers

        r = self.recipe
        engine = engine_spec(r, self.policy)
        teacher = dataclasses.replace(engine, model_path=self.teacher_model, max_lora_rank=0, max_loras=1) if self.teacher_model else None
        self.workers = Workers(r, policy=self.policy, engine=engine, scorer=self.scorer, teacher_engine=teacher,
                               critic_model=self.critic_model, max_response_len=self.max_response_len,
                               log_dir=self.log_dir, say=self.print)
        self.workers.setup()
        self.rollouts.engines = self.workers.rollout
        if self.policy.is_adapter and not self.policy.routes_per_batch:
            self._publish()  # the engines hold the base; the adapter is pushed before the first rollout

    def stop_workers(self) -> dict:
        final = super().stop_workers()
        final["trainer_memory_estimate_gib"] = {k: round(v, 3) for k, v in self.memory_estimate.items()}
        self.rollouts.forget_prefetched()  # batches in flight died with the engines
        if self.episodes is not None:
            self.episodes.close()  # an agent's gateway
        return final

    def _publish(self, prompts: Optional[list[list[int]]] = None) -> None:
        """Push the current policy to every engine (an Arrow policy is routed over ``prompts``)."""
        self._handle = self.workers.publish(prompts)

    def _publish_update(self, stats: dict) -> None:
        """After a train step: push the policy unless nothing was applied, or a per-batch route pushes it before sampling."""
        if stats.get("updates_applied") and not self.policy.routes_per_batch:
            self._publish()

    # ------------------------------------------------------------------ one step

    def train_one_step(self) -> dict[str, float]:
        r = self.recipe
        timer, t0 = PhaseTimer(), time.perf_counter()
        policy_version = self._handle.version if self._handle else 0  # the policy this step trains
        with timer.phase("generate"):  # async: the time spent waiting for the batch
            batch = self.rollouts.next_batch(self.step, self.total_steps, timer,
                                             self._publish if self.policy.routes_per_batch else None, policy_version)
            tied_sampled = batch.tied_share()
            self.allocation.complete(batch, self.step, self.rollouts, timer)
        with timer.phase("advantage"):
            keep, row_adv = training_rows(batch, self.advantages, r)
            flat = batch.completions
            rows = [flat[i] for i in keep]
            train_batch, token_metrics = self._train_batch(rows, row_adv), {}
        if rows and (self.workers.teacher is not None or self.algorithm.critic):
            with timer.phase("token_advantage"):  # the teacher's or the critic's pass over the batch
                token_metrics = self._add_token_advantages(train_batch, rows, batch.rewards[keep].tolist())
        stats = train_then_sync(self.rollout, bool(r.rollout.colocate and rows), timer,
                                train=lambda: self.trainer.train_step(train_batch, r.trainer.micro_batch_size) if rows else {},
                                publish=self._publish_update)
        self.allocation.observe(batch, self.step + 1)
        self.step += 1
        metrics = self._step_metrics(batch, rows, stats, timer, policy_version)
        metrics.update(token_metrics)
        metrics.update(zero_variance_groups_sampled=tied_sampled, time_step=time.perf_counter() - t0)  # ties: before resampling
        return metrics

    def _train_batch(self, rows: list[Completion], advantages: list[float]) -> TrainBatch:
        masked = any(c.loss_mask for c in rows)  # multi-turn: observation tokens are context, not trained
        return TrainBatch(
            prompt_token_ids=[c.prompt_token_ids for c in rows], response_token_ids=[c.token_ids for c in rows],
            advantages=advantages, rollout_logprobs=[c.logprobs for c in rows], num_sequences=len(rows),
            num_tokens=sum(sum(c.loss_mask) if masked else len(c.token_ids) for c in rows),
            unit=self.algorithm.rows_per_unit,
            loss_mask=[c.loss_mask or [1] * len(c.token_ids) for c in rows] if masked else [],
        )

    def _add_token_advantages(self, batch: TrainBatch, rows: list[Completion], rewards: list[float]) -> dict[str, float]:
        """A teacher's per-token term (on-policy distillation) or PPO's GAE advantages and critic targets, in place."""
        r = self.recipe
        if self.workers.teacher is not None:
            batch.advantages = [r.teacher.reward_coef * a for a in batch.advantages]
            batch.token_advantages, metrics = teacher_token_advantages(self.workers.teacher, rows, r.teacher.kl_coef)
            return metrics
        values = self.trainer.compute_values(batch)
        batch.token_advantages, batch.returns, metrics = ppo_targets(values, rows, rewards, r.algorithm.gae_gamma,
                                                                    r.algorithm.gae_lambda)
        batch.old_values = values
        return metrics

    def _step_metrics(self, batch: Sampled, rows: list, stats: dict, timer: PhaseTimer, policy_version: int) -> dict:
        r, flat, rewards = self.recipe, batch.completions, batch.rewards  # rewards [N], every rollout kept
        acc = batch.per_reward[r.accuracy_reward]
        lengths = [len(c.token_ids) for c in flat]
        times = timer.metrics()
        return {
            "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std().item() if rewards.numel() > 1 else 0.0,
            "accuracy": sum(acc) / len(acc),
            "zero_variance_groups": batch.tied_share(),
            "rollouts": float(batch.sampled_rollouts),
            "resampled_rollouts": float(batch.extra_rollouts),
            "trained_sequences": float(len(rows)),
            "response_length": sum(lengths) / len(lengths),
            "truncated_fraction": sum(c.finish_reason == "length" for c in flat) / len(flat),
            "tokens_per_second": sum(lengths) / max(times.get("time_generate", 0.0), 1e-9),
            **{k: times.get(k, 0.0) for k in ("time_generate", "time_reward", "time_advantage", "time_token_advantage", "time_train",
                                                   "time_weight_sync")},
            "weight_sync_bytes": float(self._handle.num_bytes) if stats and self._handle else 0.0,
            "policy_version": float(self._handle.version) if self._handle else 0.0,
            # Versions between the policy this step trained and the one that sampled its batch.
            "rollout_staleness": float(policy_version - min(c.policy_version for c in flat)),
            "rollout_restarts": float(self.rollout.restarts),
            **{f"reward_failures_{k}": float(v) for k, v in batch.failures.items()},
            **stats,
            **{f"reward/{name}": sum(s) / len(s) for name, s in batch.per_reward.items()},
            **episode_metrics(flat),
            **self.allocation.metrics(batch),
            **batch.partial_metrics,
        }

    # ------------------------------------------------------------------ evaluation, checkpoints

    def evaluate(self) -> dict[str, float]:
        """Greedy decoding on the held-out set through vLLM (accuracy = share the accuracy reward accepts); with
        ``eval.samples`` k > 1 also mean@k, pass@k and reward_mean@k of k samples per prompt at ``eval.temperature``."""
        from rl.evaluate import evaluate_prompts

        if self.policy.routes_per_batch:
            self._publish(self.test_set.prompt_token_ids)
        r = self.recipe
        ev = evaluate_prompts(self.rollout, self.test_set, self.scorer, r.accuracy_reward, sampling(r, 0, 1, greedy=True),
                              self.episodes, r.rewards.fallback)
        k = r.eval.samples
        if k > 1:  # the same seed at every evaluation: curves compare policies, not sampling noise
            spec = SamplingSpec(n=k, max_new_tokens=r.eval.max_new_tokens or r.rollout.max_new_tokens,
                                temperature=r.eval.temperature, top_p=1.0, seed=r.seed)
            sampled = evaluate_prompts(self.rollout, self.test_set, self.scorer, r.accuracy_reward, spec, self.episodes, r.rewards.fallback)
            # reward_mean@k: the reward the policy's own samples earn, what RL against a reward model raises
            ev.update({f"mean@{k}": sampled["accuracy"], f"pass@{k}": sampled[f"pass@{k}"], f"reward_mean@{k}": sampled["reward_mean"]})
            ev["seconds"] += sampled["seconds"]
        return ev

    def header(self) -> str:
        r = self.recipe
        mem, warning = self.memory_estimate, memory_warning(self.memory_estimate, r)
        size = lambda gib: f"{gib:.2f} GiB" if gib >= 1 else f"{gib * 1024:.0f} MiB"  # noqa: E731
        parts = ", ".join(f"{k} {size(v)}" for k, v in mem.items() if v and k != "total")
        return (f"{r.name}: B={r.data.prompts_per_step} prompts x G={r.algorithm.group_size} = {r.rollouts_per_step} rollouts/step, "
                f"{r.steps} steps, {r.rollout.num_actors} rollout actor(s), {r.trainer.num_ranks} trainer rank(s), "
                f"ZeRO-{r.trainer.zero_stage}, policy {self.policy.kind}; train {len(self.train_set)} / held-out "
                f"{len(self.test_set)} prompts; model {self.paths.model}; run dir {self.run_dir}\n"
                f"{self.log_prefix} each trainer rank holds ~{size(mem['total'])} at its peak ({parts}; "
                f"estimated on the meta device)" + (f"\n{self.log_prefix} {warning}" if warning else ""))

    def record_eval(self, when: str, ev: dict, summary: dict, logger: MetricsLogger) -> None:
        if when in ("before", "after"):
            summary[f"accuracy_{when}"] = ev["accuracy"]
            summary[f"reward_mean_{when}"] = ev["reward_mean"]  # the number to watch when the reward is a model
            summary.update({f"{key}_{when}": value for key, value in ev.items() if key.startswith(("mean@", "reward_mean@"))})
        if when == "before":
            self.print(f"held-out accuracy before RL: {ev['accuracy']:.3f} ({int(ev['num_examples'])} prompts, greedy)")

    def checkpoint_state(self) -> dict:
        resumable = self.recipe.trainer.zero_stage in (0, 1, 2)
        return {
            "step": self.step,
            # Prefetched batches (asynchronous rollout) are not trained yet: resume draws them again.
            "sampler": self.rollouts.resume_point(),
            "partial_rollouts": self.rollouts.carried_state(),  # unfinished generations continue after resume
            "allocation": self.allocation.state_dict(),  # Knapsack's success estimates
            "policy_version": self._handle.version if self._handle else 0,
            "reward_failures": dict(self.scorer.total_failures),
            "recipe_fingerprint": ckpt.recipe_fingerprint(self.recipe),
            "base_model": self.paths.model,
            "policy_kind": self.policy.kind,
            "resumable": resumable,
        }

    def restore(self) -> None:
        """Continue exactly where the checkpoint left off (weights were loaded from it at start-up)."""
        state = self.resume_state
        self.trainer.load_state(str(self.resume_from / "trainer_state"))
        self.step = int(state["step"])
        self.rollouts.sampler.load_state_dict(state["sampler"])
        self.rollouts.load_carried(state.get("partial_rollouts", []))
        self.allocation.load_state_dict(state.get("allocation", {}))
        for kind, count in state["reward_failures"].items():
            self.scorer.total_failures[kind] = count

    def _begin(self, summary: dict, logger: MetricsLogger) -> None:
        super()._begin(summary, logger)
        summary["model"] = self.paths.model
        if self.resume_state:
            before = [row for row in read_metrics(self.run_dir, "eval") if row["step"] == 0]
            if before:
                summary["accuracy_before"] = before[0]["accuracy"]
                if "reward_mean" in before[0]:
                    summary["reward_mean_before"] = before[0]["reward_mean"]

    def adapter_provenance(self) -> tuple[str, str, tuple[str, ...]]:
        return self.paths.model, self.paths.train, ("accuracy_before", "accuracy_after")

    def after_checkpoint(self, path: str, summary: dict) -> None:
        summary["library_expert"] = self.write_back_adapter(path, summary)
        summary["reward_failures"] = dict(self.scorer.total_failures)

    def summary_lines(self, s: dict) -> list[str]:
        lines = []
        if "accuracy_before" in s and "accuracy_after" in s:
            gain = 100 * (s["accuracy_after"] - s["accuracy_before"])
            lines.append(f"held-out accuracy: {s['accuracy_before']:.3f} -> {s['accuracy_after']:.3f} ({gain:+.1f} points)")
        if "reward_mean_before" in s and "reward_mean_after" in s:
            lines.append(f"held-out reward mean: {s['reward_mean_before']:.4f} -> {s['reward_mean_after']:.4f} (greedy)")
        for key in sorted(k[: -len("_before")] for k in s if k.startswith("reward_mean@") and k.endswith("_before")):
            if f"{key}_after" in s:
                lines.append(f"held-out {key}: {s[key + '_before']:.4f} -> {s[key + '_after']:.4f} (sampled at eval.temperature)")
        return lines


__all__ = ["OnlineRun", "RecipeError", "Sampled", "TrainingDiverged", "advantage_fn"]
