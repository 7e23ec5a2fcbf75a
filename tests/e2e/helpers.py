"""Pieces several e2e tests share (this directory is on ``sys.path`` under pytest; the cluster
scripts put it there themselves)."""

from __future__ import annotations

from trainer.types import TrainBatch


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
