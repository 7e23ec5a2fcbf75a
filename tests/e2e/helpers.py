"""Pieces several e2e tests share (this directory is on ``sys.path`` under pytest; the cluster
scripts put it there themselves)."""

from __future__ import annotations

from pathlib import Path

from trainer.types import TrainBatch

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART_CLI_STEPS = 6


def quickstart_cli_cmd(tiny_model_root: Path, out: Path, *extra: str) -> list[str]:
    """`rl train recipes/quickstart.yaml` on the tiny test model as a user types it: 6 steps, a checkpoint and an
    evaluation every 2, lr high enough that the policy visibly moves, W&B (offline) and MLflow (file store) on."""
    import sys

    return [
        sys.executable, "-m", "rl.cli", "train", str(ROOT / "recipes" / "quickstart.yaml"),
        f"model.path={tiny_model_root / 'model'}", f"data.train={tiny_model_root / 'data' / 'train.jsonl'}",
        f"data.test={tiny_model_root / 'data' / 'test.jsonl'}", f"steps={QUICKSTART_CLI_STEPS}", "data.prompts_per_step=8",
        "algorithm.group_size=4", "data.max_test_examples=16", "trainer.lr=2e-3", "eval.every=2", "checkpoint.every=2",
        "checkpoint.keep_last=1", "logging.progress=false", "logging.wandb=true", "logging.mlflow=true", f"output_dir={out}", *extra,
    ]


def random_train_batch(tok, n: int = 12, seed: int = 0) -> TrainBatch:
    """n arithmetic prompts with random (mostly wrong) answers and random advantages in [-1, 1]."""
    import random

    rng = random.Random(seed)
    prompts, responses, adv = [], [], []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        prompts.append(tok(f"{a}+{b}=")["input_ids"])
        responses.append(tok(str(rng.randint(0, 198)), add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
        adv.append(rng.uniform(-1, 1))
    rollout_lp = [[-1.0] * len(r) for r in responses]
    return TrainBatch(prompts, responses, adv, rollout_lp, num_sequences=n, num_tokens=sum(map(len, responses)))


def vllm_trainer_gap(run, n: int = 4) -> float:
    """Largest |vLLM - trainer| logprob over the gold answers of n held-out prompts of an OnlineRun."""
    prompts, tok = run.test_set.prompt_token_ids[:n], run.tokenizer
    completions = [tok(r["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in run.test_set.rows[:n]]
    vllm_lp = run.rollout.score(prompts, completions)
    trainer_lp = run.trainer.compute_logprobs(TrainBatch(prompts, completions, [0.0] * n, [[] for _ in prompts], n, 0))
    return max(abs(a - b) for ra, rb in zip(vllm_lp, trainer_lp) for a, b in zip(ra, rb))
