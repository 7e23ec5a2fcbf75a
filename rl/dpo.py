"""Offline DPO: preference pairs through the DeepSpeed trainer, no rollouts.

    pairs    = load + validate + tokenize(recipe.data)        before Ray starts; P_train, P_test
    ref      = trainer.reference_logprobs(pairs)              once, by the initial policy; cached here
    for step in 1..S:                                         S = min(steps, ceil(dpo_epochs * P_train / B))
        batch = pairs[sampler.next_batch()]                   B = data.prompts_per_step pairs
        stats = trainer.train_pairs(batch, ref[batch])        one optimizer step, DeepSpeed ranks
    trainer.evaluate(held_out, ref[held_out])                 before, every eval.every steps, after

DPO (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290) with the loss the recipe names
(``algorithm.dpo_loss``: sigmoid = DPO / conservative DPO with ``dpo_label_smoothing``, ipo),
``algorithm.dpo_beta``. Sequences are cut to ``rollout.max_model_len`` tokens (prompt +
response; see ``rl/preference_data.py``). ``model.path: builtin:tiny-text`` builds a tiny model
from the training pairs' texts (``rl/tasks/tiny_text.py``).

The loop, checkpoints (HF format, atomic), metrics and summary are ``rl.run.Run``'s, as for GRPO;
the ranks are ``rl.workers.PreferenceTrainerGroup``.

    rl train recipes/dpo-hh-tiny.yaml            (the CLI runs OfflineDPORun for algorithm.name: dpo)
    python -m rl.dpo recipes/dpo-hh-tiny.yaml [dotted.key=value ...]
"""

from __future__ import annotations

import math
import sys
import time
from typing import Optional

from rl.config import BUILTIN_PREFIX, Recipe, RecipeError
from rl.data import PromptSampler
from rl.metrics import MetricsLogger
from rl.preference_data import load_preference_texts, tokenize_pairs, training_texts
from rl.prepare import TINY_TEXT
from rl.run import Run
from trainer import algorithms

EVAL_KEYS = ("loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward")


def check_dpo_recipe(recipe: Recipe) -> None:
    """Settings that would not reach offline DPO's math fail here, naming the field."""
    r = recipe
    if r.algorithm.spec.online:
        raise RecipeError(f"recipe field 'algorithm.name': train_dpo runs offline DPO (got {r.algorithm.name!r})")
    if r.trainer.mini_batches != 1:
        raise RecipeError("recipe field 'trainer.mini_batches': offline DPO takes one optimizer step per batch of data.prompts_per_step "
                          "pairs; set it to 1")
    if r.algorithm.kl_coef != 0:
        raise RecipeError("recipe field 'algorithm.kl_coef': DPO's KL strength is algorithm.dpo_beta; set kl_coef to 0")
    if r.resume:
        raise RecipeError("recipe field 'resume': offline DPO does not resume yet; start a fresh run")
    for field, value in (("data.train", r.data.train), ("data.test", r.data.test)):
        if value and value.startswith(BUILTIN_PREFIX):
            raise RecipeError(f"recipe field '{field}': offline DPO needs a preference file (no builtin preference data: {value})")
    if r.model.path.startswith(BUILTIN_PREFIX) and r.model.path != TINY_TEXT:
        raise RecipeError(f"recipe field 'model.path': offline DPO on text needs an HF model directory or '{TINY_TEXT}' "
                          f"(got {r.model.path!r})")
    try:
        algorithms.get("preference_loss", r.algorithm.dpo_loss)
    except KeyError as e:
        raise RecipeError(f"recipe field 'algorithm.dpo_loss': {e.args[0]}") from None
    if r.algorithm.dpo_loss == "ipo" and r.algorithm.dpo_label_smoothing:
        raise RecipeError("recipe field 'algorithm.dpo_label_smoothing': not defined for ipo; set it to 0")


class OfflineDPORun(Run):
    """One offline-DPO run. Everything that can fail on bad input happens in ``__init__``, before Ray starts."""

    progress_label = "DPO"
    log_prefix = "[dpo]"

    def __init__(self, recipe: Recipe):
        check_dpo_recipe(recipe)
        super().__init__(recipe)
        r = recipe
        train_texts, test_texts = load_preference_texts(r.data, r.data.train, r.data.test, r.seed)
        self.model_path = r.model.path
        if r.model.path == TINY_TEXT:
            from rl.tasks.tiny_text import tiny_text_model

            self.model_path = tiny_text_model(training_texts(train_texts), r.rollout.max_model_len,
                                              lambda s: print(f"[dpo] {s}", flush=True))
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
        from types import SimpleNamespace

        from rl.prepare import check_library_write, prepare_policy

        check_library_write(r, resuming=False)
        # The policy as the online path decides it (full, LoRA, sparse, merged or Arrow-routed experts); a sparse
        # adapter's mask is calibrated on the pairs' prompts.
        self.policy = prepare_policy(r, self.model_path, SimpleNamespace(prompt_token_ids=self.train_pairs.prompt_ids),
                                     merge_into=self.run_dir / "start-adapter")
        B = r.data.prompts_per_step
        self.steps_per_epoch = math.ceil(len(self.train_pairs) / B)
        self.total_steps = min(r.steps, r.algorithm.dpo_epochs * self.steps_per_epoch)
        # The whole schedule up front: the reference is computed only for the pairs it visits.
        sampler = PromptSampler(len(self.train_pairs), B, r.seed, r.data.shuffle)
        self.schedule = [sampler.next_batch() for _ in range(self.total_steps)]

    def start_workers(self) -> None:
        from rl.launch import Workers
        from rl.workers import PreferenceTrainerGroup

        self.workers = Workers(self.recipe, policy=self.policy, trainer_group=PreferenceTrainerGroup,
                               max_response_len=self.max_len, log_dir=self.log_dir, say=self.print)
        self.workers.setup()
        self._compute_reference()

    def _compute_reference(self) -> None:
        """Reference log-probs of the visited training pairs and of the held-out pairs, once, before any update."""
        t0 = time.perf_counter()
        micro = self.recipe.trainer.micro_batch_size
        used = sorted({i for batch in self.schedule for i in batch})
        c, rj = self.trainer.reference_logprobs(self.train_pairs.select(used), micro)
        self.ref_train: dict[int, tuple[float, float]] = {i: (a, b) for i, a, b in zip(used, c, rj)}
        self.ref_test = self.trainer.reference_logprobs(self.test_pairs, micro)
        self.reference_seconds = time.perf_counter() - t0

    def evaluate(self) -> dict[str, float]:
        t0 = time.perf_counter()
        ev = self.trainer.evaluate(self.test_pairs, *self.ref_test, self.recipe.trainer.micro_batch_size)
        return {**ev, "seconds": time.perf_counter() - t0}

    def train_one_step(self) -> dict[str, float]:
        t0 = time.perf_counter()
        idx = self.schedule[self.step]
        ref_c = [self.ref_train[i][0] for i in idx]
        ref_r = [self.ref_train[i][1] for i in idx]
        stats = self.trainer.train_pairs(self.train_pairs.select(idx), self.recipe.trainer.micro_batch_size, ref_c, ref_r)
        self.step += 1
        dt = time.perf_counter() - t0
        return {
            **stats,
            "epoch": self.step * self.recipe.data.prompts_per_step / len(self.train_pairs),
            "time_step": dt,
            "pairs_per_second": stats["pairs"] / max(dt, 1e-9),
            "tokens_per_second": stats["tokens"] / max(dt, 1e-9),
        }

    def header(self) -> str:
        r, d = self.recipe, self.data_report
        return (f"{r.name}: offline DPO ({r.algorithm.dpo_loss}, beta={r.algorithm.dpo_beta}), B={r.data.prompts_per_step} pairs/step, "
                f"{self.total_steps} steps (= min(steps={r.steps}, dpo_epochs={r.algorithm.dpo_epochs} x {self.steps_per_epoch} batches)), "
                f"{r.trainer.num_ranks} rank(s), ZeRO-{r.trainer.zero_stage}; pairs: {d['pairs_train']} train / "
                f"{d['pairs_test']} held-out, {d['pairs_truncated']} cut to {self.max_len} tokens; "
                f"model {self.model_path}; run dir {self.run_dir}")

    def after_checkpoint(self, path: str, summary: dict) -> None:
        summary["library_expert"] = self.write_back_adapter(path, summary)

    def adapter_provenance(self) -> tuple[str, str, tuple[str, ...]]:
        return self.model_path, self.recipe.data.train, ("reward_accuracy_before", "reward_accuracy_after")

    def record_eval(self, when: str, ev: dict, summary: dict, logger: MetricsLogger) -> None:
        if when in ("before", "after"):
            summary[f"eval_{when}"] = {k: ev[k] for k in EVAL_KEYS}
            for k in EVAL_KEYS:  # flat before/after keys, as GRPO's accuracy_before/after
                summary[f"{k}_{when}"] = ev[k]
        else:
            self.print(f"held-out at {when}: loss {ev['loss']:.4f}, reward accuracy {ev['reward_accuracy']:.3f}")

    def _begin(self, summary: dict, logger: MetricsLogger) -> None:
        summary.update(algorithm=self.recipe.algorithm.name, model=self.model_path, reference_seconds=self.reference_seconds,
                       **self.data_report)
        super()._begin(summary, logger)

    def summary_lines(self, s: dict) -> list[str]:
        if "eval_before" not in s or "eval_after" not in s:
            return []
        b, a = s["eval_before"], s["eval_after"]
        return [f"held-out ({s['pairs_test']} pairs): loss {b['loss']:.4f} -> {a['loss']:.4f}, "
                f"reward accuracy {b['reward_accuracy']:.3f} -> {a['reward_accuracy']:.3f}, "
                f"margin {b['reward_margin']:+.4f} -> {a['reward_margin']:+.4f}"]


def train_dpo(recipe: Recipe) -> dict:
    """Run offline DPO as the recipe says; returns the summary (also written to summary.json)."""
    return OfflineDPORun(recipe).fit()


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m rl.dpo RECIPE.yaml [dotted.key=value ...]`` (the same as ``rl train`` for a DPO recipe)."""
    from rl.config import load_recipe

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(main.__doc__)
        return 0 if argv else 2
    try:
        OfflineDPORun(load_recipe(argv[0], argv[1:])).fit()
    except RecipeError as e:
        print(f"rl: error in recipe:\n{e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
