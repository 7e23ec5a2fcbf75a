"""Where a trainer step's time goes: one PolicyTrainer (in this process, no Ray) on the 51.7M Llama
of bench_step.py, 128 sequences of 32 prompt + 128 response tokens, micro-batch 32, both cores.

    .venv/bin/python scripts/bench_step.py --skip-trl      # builds the model once (or any run of it)
    .venv/bin/python scripts/profile_train_step.py         # prints the step time and a cProfile table
"""

from __future__ import annotations

import cProfile
import pstats
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import torch

    from scripts.bench_step import build_model
    from trainer.config import AlgorithmConfig, TrainerConfig
    from trainer.policies import PolicySpec
    from trainer.policy_trainer import PolicyTrainer, TrainerSetup
    from trainer.types import TrainBatch

    torch.set_num_threads(len(__import__("os").sched_getaffinity(0)))
    setup = TrainerSetup(policy=PolicySpec(kind="full", base_model=str(build_model())), dtype="float32",
                         trainer=TrainerConfig(micro_batch_size=32, lr=1e-6), algorithm=AlgorithmConfig(),
                         max_response_len=128, master_port=29611)
    trainer = PolicyTrainer(setup)
    rng, n = random.Random(0), 128
    prompts = [[rng.randrange(10, 31000) for _ in range(32)] for _ in range(n)]
    responses = [[rng.randrange(10, 31000) for _ in range(128)] for _ in range(n)]
    batch = TrainBatch(prompts, responses, [rng.uniform(-1, 1) for _ in range(n)], [[-10.0] * 128 for _ in range(n)], n, n * 128)
    trainer.train_step(batch, 4)  # warm-up: AdamW allocates its moments
    t0 = time.perf_counter()
    trainer.train_step(batch, 4)
    print(f"train_step: {time.perf_counter() - t0:.1f} s")
    profile = cProfile.Profile()
    profile.enable()
    trainer.train_step(batch, 4)
    profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
