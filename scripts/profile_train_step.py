"""Where a trainer step's time goes: one PolicyTrainer (in this process, no Ray) on the 51.7M Llama
of bench_step.py, 128 sequences of 32 prompt + 128 response tokens, micro-batch 32, both cores.

    .venv/bin/python scripts/bench_step.py --skip-trl      # builds the model once (or any run of it)
    .venv/bin/python scripts/profile_train_step.py         # prints the step time and a cProfile table
    .venv/bin/python scripts/profile_train_step.py --in-actor   # the same step here and in a Ray actor, alternating
    .venv/bin/python scripts/profile_train_step.py --vs-raw     # the same batch: the trainer's step vs a raw HF one
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


def make_trainer_and_batch(torch_threads: int = 0):
    """The PolicyTrainer of the benchmark's model and one batch of 128 sequences (32 + 128 tokens)."""
    from scripts.bench_step import build_model
    from trainer.config import AlgorithmConfig, TrainerConfig
    from trainer.policies import PolicySpec
    from trainer.policy_trainer import PolicyTrainer, TrainerSetup
    from trainer.types import TrainBatch

    setup = TrainerSetup(policy=PolicySpec(kind="full", base_model=str(build_model())), dtype="float32",
                         trainer=TrainerConfig(micro_batch_size=32, lr=1e-6, torch_threads=torch_threads), algorithm=AlgorithmConfig(),
                         max_response_len=128, master_port=29611 + (torch_threads > 0))
    trainer = PolicyTrainer(setup)
    rng, n = random.Random(0), 128
    prompts = [[rng.randrange(10, 31000) for _ in range(32)] for _ in range(n)]
    responses = [[rng.randrange(10, 31000) for _ in range(128)] for _ in range(n)]
    batch = TrainBatch(prompts, responses, [rng.uniform(-1, 1) for _ in range(n)], [[-10.0] * 128 for _ in range(n)], n, n * 128)
    return trainer, batch


class TimedTrainer:
    """The same trainer and batch in a Ray actor with one reserved CPU (Ray sets OMP_NUM_THREADS=1) and
    torch threads set to every core, as ``rl train`` places the trainer of a synchronous run."""

    def __init__(self, threads: int):
        self.trainer, self.batch = make_trainer_and_batch(threads)
        self.trainer.train_step(self.batch, 4)  # warm-up

    def step_seconds(self) -> float:
        t0 = time.perf_counter()
        self.trainer.train_step(self.batch, 4)
        return time.perf_counter() - t0


def raw_step_fn(batch, micro_batch_size: int = 32):
    """bench_step.py's raw training side on ``batch``; returns a function timing one step."""
    from scripts.bench_step import build_model, raw_train_step

    return raw_train_step(build_model(), list(zip(batch.prompt_token_ids, batch.response_token_ids)), micro_batch_size)


def main() -> None:
    import argparse
    import os

    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--in-actor", action="store_true", help="time the same step in a Ray actor too, alternating with this process")
    ap.add_argument("--vs-raw", action="store_true", help="alternate the trainer's step with a raw HF forward/backward + AdamW "
                    "step of the same batch in this process (the ratio without the run-to-run noise of separate processes)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    if args.in_actor:
        import ray

        ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
        actor = ray.remote(num_cpus=1)(TimedTrainer).remote(cores)
        ray.get(actor.step_seconds.remote())
    torch.set_num_threads(cores)
    trainer, batch = make_trainer_and_batch()
    trainer.train_step(batch, 4)  # warm-up: AdamW allocates its moments
    if args.vs_raw:
        raw = raw_step_fn(batch)
        raw()  # warm-up
        ours, theirs = [], []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            trainer.train_step(batch, 4)
            ours.append(time.perf_counter() - t0)
            theirs.append(raw())
        print(f"train_step: {', '.join(f'{x:.1f}' for x in ours)} s; raw forward/backward + AdamW: "
              f"{', '.join(f'{x:.1f}' for x in theirs)} s; median ratio {sorted(a / b for a, b in zip(ours, theirs))[len(ours) // 2]:.2f}")
        return
    if args.in_actor:
        here, there = [], []
        for _ in range(args.rounds):  # alternate, so a slower minute of the machine hits both sides
            t0 = time.perf_counter()
            trainer.train_step(batch, 4)
            here.append(time.perf_counter() - t0)
            there.append(ray.get(actor.step_seconds.remote()))
        print(f"train_step in this process: {', '.join(f'{x:.1f}' for x in here)} s; in a Ray actor (num_cpus=1, "
              f"torch threads {cores}): {', '.join(f'{x:.1f}' for x in there)} s; median ratio actor/process "
              f"{sorted(b / a for a, b in zip(here, there))[len(here) // 2]:.2f}")
        return
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
