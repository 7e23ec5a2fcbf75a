"""Offline DPO: preference pairs through the DeepSpeed trainer, no rollouts.

    pairs    = load + validate + tokenize(recipe.data)        before Ray starts; P_train, P_test
    ref      = trainer.reference_logprobs(pairs)              once, by the initial policy; cached here
    for step in 1..S:                                         S = min(steps, ceil(dpo_epochs * P_train / B))
        batch = pairs[sampler.next_batch()]                   B = data.prompts_per_step pairs
        stats = trainer.train_step(batch, ref[batch])         one optimizer step, DeepSpeed ranks
    trainer.evaluate(held_out, ref[held_out])                 before, every eval.every steps, after

DPO (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290) with the loss the recipe names
(``algorithm.dpo_loss``: sigmoid = DPO / conservative DPO with ``dpo_label_smoothing``, ipo),
``algorithm.dpo_beta``. Sequences are cut to ``rollout.max_model_len`` tokens (prompt +
response; see ``rl/preference_data.py``). ``model.path: builtin:tiny-text`` builds a tiny model
from the training pairs' texts (``rl/tasks/tiny_text.py``).

Run layout as for GRPO: ``<run_dir>/metrics.jsonl`` (``kind: train`` per step, ``kind: eval``),
``tensorboard/``, ``recipe.resolved.yaml``, ``summary.json``, ``checkpoints/step_NNNNNN/`` (HF
format, written to a temporary name and renamed).

    rl train recipes/dpo-hh-tiny.yaml            (the CLI calls train_dpo for algorithm.name: dpo)
    python -m rl.dpo recipes/dpo-hh-tiny.yaml [dotted.key=value ...]
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from rl import algorithms
from rl.config import BUILTIN_PREFIX, Recipe, RecipeError, recipe_to_yaml
from rl.data import PromptSampler
from rl.metrics import MetricsLogger
from rl.preference_data import PreferencePairs, load_preference_texts, tokenize_pairs, training_texts
from rl.workers import _chunks, _Group, free_port, init_ray
from trainer.policy_trainer import TrainerSetup

TINY_TEXT = "builtin:tiny-text"
EVAL_KEYS = ("loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward")


# ------------------------------------------------------------------------------------------ workers


class PreferenceTrainerGroup(_Group):
    """N ``PreferenceTrainer`` ranks (Ray actors, or one in this process); pairs are sharded
    across them in contiguous chunks, every rank taking the same number of micro-batches."""

    @classmethod
    def create(cls, setup: TrainerSetup, num_ranks: int, use_ray: bool, num_cpus: float = 1.0, num_gpus: float = 0.0):
        from trainer.preference_trainer import PreferenceTrainer

        port = setup.master_port or free_port()  # one rendezvous port for the whole group
        setups = [dataclasses.replace(setup, rank=r, world_size=num_ranks, master_port=port) for r in range(num_ranks)]
        if not use_ray:
            if num_ranks != 1:
                raise RecipeError("recipe field 'trainer.num_ranks': more than 1 rank needs use_ray: true")
            return cls([PreferenceTrainer(setups[0])], remote=False)
        import ray

        actor_cls = ray.remote(PreferenceTrainer)
        group = cls([actor_cls.options(num_cpus=num_cpus, num_gpus=num_gpus).remote(s) for s in setups], remote=True)
        group.call_all("ready")  # surface start-up errors here, not at the first step
        return group

    def _shards(self, n: int, micro_batch_size: int) -> tuple[list[range], int]:
        """One contiguous range of pairs per rank (sizes differ by at most one; a range may be
        empty) and the micro-batch count every rank runs."""
        shards = _chunks(n, len(self.workers))
        return shards, max(1, math.ceil(max(len(s) for s in shards) / micro_batch_size))

    def reference_logprobs(self, pairs: PreferencePairs, micro_batch_size: int) -> tuple[list[float], list[float]]:
        shards, num_micro = self._shards(len(pairs), micro_batch_size)
        results = self.call_each("reference_logprobs", [(pairs.select(list(s)), num_micro) for s in shards])
        return [x for c, _ in results for x in c], [x for _, r in results for x in r]

    def evaluate(self, pairs: PreferencePairs, ref_chosen: Sequence[float], ref_rejected: Sequence[float], micro_batch_size: int) -> dict[str, float]:
        shards, num_micro = self._shards(len(pairs), micro_batch_size)
        args = [(pairs.select(list(s)), [ref_chosen[i] for i in s], [ref_rejected[i] for i in s], num_micro) for s in shards]
        return _combine(self.call_each("evaluate", args))

    def train_step(self, batch: PreferencePairs, micro_batch_size: int, ref_chosen: Sequence[float], ref_rejected: Sequence[float]) -> dict[str, float]:
        shards, num_micro = self._shards(len(batch), micro_batch_size)
        args = []
        for s in shards:
            shard = dataclasses.replace(batch.select(list(s)), batch_pairs=len(batch))
            args.append((shard, num_micro, [ref_chosen[i] for i in s], [ref_rejected[i] for i in s]))
        return _combine(self.call_each("train_step", args))

    def save_pretrained(self, path: str) -> Optional[str]:
        return self.call_all("save_pretrained", path)[0]

    def close(self) -> None:
        self.call_all("close")


_MAX_KEYS = ("grad_norm", "lr", "train_seconds")
_SUM_KEYS = ("pairs", "tokens")


def _combine(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """Pair-weighted means across ranks; sums of counts; maxima of grad norm, lr and time."""
    total = sum(r["pairs"] for r in per_rank)
    out: dict[str, float] = {}
    for key in per_rank[0]:
        values = [r[key] for r in per_rank]
        if key in _SUM_KEYS:
            out[key] = sum(values)
        elif key in _MAX_KEYS:
            out[key] = max(values)
        else:
            out[key] = sum(v * r["pairs"] for v, r in zip(values, per_rank)) / total if total else 0.0
    return out


# ------------------------------------------------------------------------------------------ the run


def check_dpo_recipe(recipe: Recipe) -> None:
    """Settings that would not reach offline DPO's math fail here, naming the field."""
    r = recipe
    if r.algorithm.name != "dpo":
        raise RecipeError(f"recipe field 'algorithm.name': train_dpo runs offline DPO (got {r.algorithm.name!r})")
    if r.trainer.mini_batches != 1:
        raise RecipeError("recipe field 'trainer.mini_batches': offline DPO takes one optimizer step per batch of data.prompts_per_step pairs; set it to 1")
    if r.algorithm.kl_coef != 0:
        raise RecipeError("recipe field 'algorithm.kl_coef': DPO's KL strength is algorithm.dpo_beta; set kl_coef to 0")
    adapter = getattr(r, "adapter", None)
    if adapter is not None and adapter.mode != "none":
        raise RecipeError("recipe field 'adapter.mode': offline DPO trains the full model; adapter policies are not wired into it yet")
    if getattr(r, "resume", None):
        raise RecipeError("recipe field 'resume': offline DPO does not resume yet; start a fresh run")
    for field, value in (("data.train", r.data.train), ("data.test", r.data.test)):
        if value and value.startswith(BUILTIN_PREFIX):
            raise RecipeError(f"recipe field '{field}': offline DPO needs a preference file (no builtin preference data: {value})")
    if r.model.path.startswith(BUILTIN_PREFIX) and r.model.path != TINY_TEXT:
        raise RecipeError(f"recipe field 'model.path': offline DPO on text needs an HF model directory or '{TINY_TEXT}' (got {r.model.path!r})")
    try:
        algorithms.get("preference_loss", r.algorithm.dpo_loss)
    except KeyError as e:
        raise RecipeError(f"recipe field 'algorithm.dpo_loss': {e.args[0]}") from None
    if r.algorithm.dpo_loss == "ipo" and r.algorithm.dpo_label_smoothing:
        raise RecipeError("recipe field 'algorithm.dpo_label_smoothing': not defined for ipo; set it to 0")


def resolve_model(recipe: Recipe, train_texts: list[str], log: Callable[[str], None] = print) -> str:
    """The model directory: ``model.path``, or ``builtin:tiny-text`` built from the training texts."""
    if recipe.model.path != TINY_TEXT:
        return recipe.model.path
    from rl.tasks.tiny_text import TinyTextSpec, build_tiny_text

    spec = TinyTextSpec()
    if recipe.rollout.max_model_len > spec.max_position_embeddings:
        spec = dataclasses.replace(spec, max_position_embeddings=recipe.rollout.max_model_len)
    return str(Path(build_tiny_text(train_texts, spec, log=log)) / "model")


def _write_checkpoint(group: PreferenceTrainerGroup, run_dir: Path, step: int, keep_last: int) -> str:
    """``checkpoints/step_NNNNNN/`` in HF format: written under a ``.tmp`` name, then renamed."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    group.save_pretrained(str(tmp.resolve()))  # absolute: the rank may run in another directory
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    kept = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and not p.name.endswith(".tmp"))
    for old in kept[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return str(final)


class OfflineDPO:
    """One offline-DPO run. Everything that can fail on bad input happens in ``__init__``,
    before Ray starts; ``fit()`` runs it."""

    def __init__(self, recipe: Recipe, log: Callable[[str], None] = lambda s: print(f"[dpo] {s}", flush=True)):
        check_dpo_recipe(recipe)
        r = self.recipe = recipe
        self.log = log
        self.started = time.time()
        self.run_dir = r.run_dir(time.strftime("%Y%m%d-%H%M%S", time.localtime(self.started)))
        train_texts, test_texts = load_preference_texts(r.data, r.data.train, r.data.test, r.seed)
        self.model_path = resolve_model(r, training_texts(train_texts), log)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.model_path, trust_remote_code=r.model.trust_remote_code)
        self.max_len = r.rollout.max_model_len  # prompt + response tokens per sequence
        self.train_pairs, train_report = tokenize_pairs(train_texts, tokenizer, self.max_len, r.data)
        self.test_pairs, test_report = tokenize_pairs(test_texts, tokenizer, self.max_len, r.data)
        self.data_report = {
            "pairs_train": len(self.train_pairs),
            "pairs_test": len(self.test_pairs),
            "pairs_truncated": train_report.truncated + test_report.truncated,
            "pairs_dropped_identical_after_truncation": len(train_report.dropped_identical) + len(test_report.dropped_identical),
        }
        B = r.data.prompts_per_step
        self.steps_per_epoch = math.ceil(len(self.train_pairs) / B)
        self.total_steps = min(r.steps, r.algorithm.dpo_epochs * self.steps_per_epoch)
        # The whole schedule up front: the reference is computed only for the pairs it visits.
        sampler = PromptSampler(len(self.train_pairs), B, r.seed, r.data.shuffle)
        self.schedule = [sampler.next_batch() for _ in range(self.total_steps)]
        self.step = 0
        self.group: Optional[PreferenceTrainerGroup] = None

    def start_workers(self) -> None:
        r = self.recipe
        if r.use_ray:
            init_ray(r.trainer.num_ranks * r.trainer.num_cpus_per_rank)
        setup = TrainerSetup(
            model_path=self.model_path,
            dtype=r.model.dtype,
            trainer=r.trainer,
            algorithm=r.algorithm,
            max_response_len=self.max_len,
            seed=r.seed,
            master_port=0,
            trust_remote_code=r.model.trust_remote_code,
        )
        self.group = PreferenceTrainerGroup.create(setup, r.trainer.num_ranks, r.use_ray, r.trainer.num_cpus_per_rank, r.trainer.num_gpus_per_rank)

    def stop_workers(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group.shutdown()
            self.group = None

    def compute_reference(self) -> None:
        """Reference log-probs of the visited training pairs and of the held-out pairs, once."""
        micro = self.recipe.trainer.micro_batch_size
        used = sorted({i for batch in self.schedule for i in batch})
        c, rj = self.group.reference_logprobs(self.train_pairs.select(used), micro)
        self.ref_train: dict[int, tuple[float, float]] = {i: (a, b) for i, a, b in zip(used, c, rj)}
        self.ref_test = self.group.reference_logprobs(self.test_pairs, micro)

    def evaluate(self) -> dict[str, float]:
        t0 = time.perf_counter()
        ev = self.group.evaluate(self.test_pairs, *self.ref_test, self.recipe.trainer.micro_batch_size)
        return {**ev, "seconds": time.perf_counter() - t0}

    def train_one_step(self) -> dict[str, float]:
        t0 = time.perf_counter()
        idx = self.schedule[self.step]
        batch = self.train_pairs.select(idx)
        ref_c = [self.ref_train[i][0] for i in idx]
        ref_r = [self.ref_train[i][1] for i in idx]
        stats = self.group.train_step(batch, self.recipe.trainer.micro_batch_size, ref_c, ref_r)
        self.step += 1
        dt = time.perf_counter() - t0
        return {
            **stats,
            "epoch": self.step * self.recipe.data.prompts_per_step / len(self.train_pairs),
            "time_step": dt,
            "pairs_per_second": stats["pairs"] / max(dt, 1e-9),
            "tokens_per_second": stats["tokens"] / max(dt, 1e-9),
        }

    def fit(self) -> dict:
        r = self.recipe
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "recipe.resolved.yaml").write_text(recipe_to_yaml(r))
        # The progress bar of MetricsLogger shows GRPO's reward/accuracy; DPO prints its own lines.
        logger = MetricsLogger(self.run_dir, self.total_steps, tensorboard=r.logging.tensorboard, progress=False)
        self.log(
            f"{r.name}: offline DPO ({r.algorithm.dpo_loss}, beta={r.algorithm.dpo_beta}), B={r.data.prompts_per_step} pairs/step, "
            f"{self.total_steps} steps (= min(steps={r.steps}, dpo_epochs={r.algorithm.dpo_epochs} x {self.steps_per_epoch} batches)), "
            f"{r.trainer.num_ranks} rank(s), ZeRO-{r.trainer.zero_stage}; pairs: {self.data_report['pairs_train']} train / "
            f"{self.data_report['pairs_test']} held-out, {self.data_report['pairs_truncated']} cut to {self.max_len} tokens; "
            f"model {self.model_path}; run dir {self.run_dir}"
        )
        summary: dict = {"name": r.name, "algorithm": "dpo", "run_dir": str(self.run_dir), "model": self.model_path, **self.data_report}
        print_every = max(1, self.total_steps // 20)
        try:
            t0 = time.perf_counter()
            self.start_workers()
            summary["startup_seconds"] = time.perf_counter() - t0
            t_ref = time.perf_counter()
            self.compute_reference()
            summary["reference_seconds"] = time.perf_counter() - t_ref
            if r.eval.before:
                ev = self.evaluate()
                logger.log(0, ev, kind="eval")
                summary["eval_before"] = {k: ev[k] for k in EVAL_KEYS}
            t_train = time.perf_counter()
            last_ckpt = None
            while self.step < self.total_steps:
                m = self.train_one_step()
                logger.log(self.step, m)
                if r.logging.progress and (self.step % print_every == 0 or self.step == self.total_steps):
                    self.log(
                        f"step {self.step}/{self.total_steps}  loss {m['loss']:.4f}  reward acc {m['reward_accuracy']:.3f}  "
                        f"margin {m['reward_margin']:+.4f}  grad norm {m['grad_norm']:.3f}  {m['time_step']:.2f} s"
                    )
                if r.eval.every and self.step % r.eval.every == 0 and self.step < self.total_steps:
                    ev = self.evaluate()
                    logger.log(self.step, ev, kind="eval")
                    self.log(f"held-out at step {self.step}: loss {ev['loss']:.4f}, reward accuracy {ev['reward_accuracy']:.3f}")
                if r.checkpoint.every and self.step % r.checkpoint.every == 0:
                    last_ckpt = _write_checkpoint(self.group, self.run_dir, self.step, r.checkpoint.keep_last)
            summary["train_seconds"] = time.perf_counter() - t_train
            if r.eval.after:
                ev = self.evaluate()
                logger.log(self.step, ev, kind="eval")
                summary["eval_after"] = {k: ev[k] for k in EVAL_KEYS}
            if r.checkpoint.save_final and (last_ckpt is None or not last_ckpt.endswith(f"{self.step:06d}")):
                last_ckpt = _write_checkpoint(self.group, self.run_dir, self.step, r.checkpoint.keep_last)
            summary["checkpoint"] = last_ckpt
            summary["steps"] = self.step
            summary["total_seconds"] = time.time() - self.started
        finally:
            logger.close()
            self.stop_workers()
        for key in EVAL_KEYS:  # flat before/after keys, as GRPO's accuracy_before/after
            for when in ("before", "after"):
                if f"eval_{when}" in summary:
                    summary[f"{key}_{when}"] = summary[f"eval_{when}"][key]
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self._print_summary(summary)
        return summary

    def _print_summary(self, s: dict) -> None:
        lines = [f"done: {s['name']} ({s['steps']} DPO steps in {s.get('train_seconds', 0):.0f} s of training, {s['total_seconds']:.0f} s in all)"]
        if "eval_before" in s and "eval_after" in s:
            b, a = s["eval_before"], s["eval_after"]
            lines.append(
                f"held-out ({s['pairs_test']} pairs): loss {b['loss']:.4f} -> {a['loss']:.4f}, "
                f"reward accuracy {b['reward_accuracy']:.3f} -> {a['reward_accuracy']:.3f}, "
                f"margin {b['reward_margin']:+.4f} -> {a['reward_margin']:+.4f}"
            )
        lines.append(f"checkpoint: {s.get('checkpoint')}   metrics: {s['run_dir']}/metrics.jsonl   summary: {s['run_dir']}/summary.json")
        for line in lines:
            self.log(line)


def train_dpo(recipe: Recipe) -> dict:
    """Run offline DPO as the recipe says; returns the summary (also written to summary.json)."""
    return OfflineDPO(recipe).fit()


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m rl.dpo RECIPE.yaml [dotted.key=value ...]`` (the same as ``rl train`` for a DPO recipe)."""
    from rl.config import load_recipe

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(main.__doc__)
        return 0 if argv else 2
    try:
        train_dpo(load_recipe(argv[0], argv[1:]))
    except RecipeError as e:
        print(f"rl: error in recipe:\n{e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
