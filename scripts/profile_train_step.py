"""Where a trainer step's time goes: one PolicyTrainer (in this process, no Ray) on the 51.7M Llama
of bench_step.py, 128 sequences of 32 prompt + 128 response tokens, micro-batch 32, both cores.

    .venv/bin/python scripts/bench_step.py --skip-trl      # builds the model once (or any run of it)
    .venv/bin/python scripts/profile_train_step.py         # prints the step time and a cProfile table
    .venv/bin/python scripts/profile_train_step.py --in-actor   # the same step here and in a Ray actor, alternating
    .venv/bin/python scripts/profile_train_step.py --vs-raw     # the same batch: the trainer's step vs a raw HF one
    .venv/bin/python scripts/profile_train_step.py --memory     # peak memory per setting, each in a fresh process
                                                                # (docs/benchmarks/trainer-memory.md)
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


def make_trainer_and_batch(torch_threads: int = 0, **trainer_settings):
    """The PolicyTrainer of the benchmark's model and one batch of 128 sequences (32 + 128 tokens); ``trainer_settings``
    are TrainerConfig fields."""
    from scripts.bench_step import build_model
    from trainer.config import AlgorithmConfig, TrainerConfig
    from trainer.policies import PolicySpec
    from trainer.policy_trainer import PolicyTrainer
    from trainer.setup import TrainerSetup
    from trainer.types import TrainBatch

    setup = TrainerSetup(policy=PolicySpec(kind="full", base_model=str(build_model())), dtype="float32",
                         trainer=TrainerConfig(micro_batch_size=32, lr=1e-6, torch_threads=torch_threads, **trainer_settings),
                         algorithm=AlgorithmConfig(),
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


# The trainer settings that bound its memory, alone and together (each measured in a fresh process).
MEMORY_ARMS = {
    "defaults": {},
    "logits_chunk_rows=1024": {"logits_chunk_rows": 1024},
    "gradient_checkpointing": {"gradient_checkpointing": True},
    "both": {"logits_chunk_rows": 1024, "gradient_checkpointing": True},
    "both, logits_chunk_rows=256": {"logits_chunk_rows": 256, "gradient_checkpointing": True},
    "logits_chunk_rows=1024, host_mmap_threshold_mib=1": {"logits_chunk_rows": 1024, "host_mmap_threshold_mib": 1},
    "both, host_mmap_threshold_mib=1": {"logits_chunk_rows": 1024, "gradient_checkpointing": True, "host_mmap_threshold_mib": 1},
}


def memory_arm(name: str) -> dict:
    """Two steps (micro-batch 32) of one setting in this process: its peak resident memory and the second step's time."""
    import os
    import resource

    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    trainer, batch = make_trainer_and_batch(**MEMORY_ARMS[name])
    built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    trainer.train_step(batch, 4)  # AdamW allocates its moments here
    t0 = time.perf_counter()
    trainer.train_step(batch, 4)
    return {"arm": name, "step_s": round(time.perf_counter() - t0, 1), "built_gib": round(built, 2),
            "peak_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def memory_report(rounds: int, out: Path, arms: list[str], report_only: bool = False) -> None:
    """Every arm in a fresh process (ru_maxrss only grows), arms alternating each round; writes ``out``.md/.json.
    ``arms``: only these (the saved results of the others are kept). Each result is saved as it comes, so an
    interrupted run keeps what it measured; ``report_only``: the page again from the saved results. Each result records
    its machine; saved results from another machine are dropped (the page states one)."""
    import json
    import subprocess

    from rl.metrics import describe_machine, recorded_machine_of_rows, rows_measured_on

    saved = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else []
    machine = describe_machine()  # recorded with each result: a re-render states it
    results = saved if report_only else rows_measured_on([r for r in saved if arms and r["arm"] not in arms], machine)
    for _ in range(0 if report_only else rounds):
        for name in arms or MEMORY_ARMS:
            done = subprocess.run([sys.executable, __file__, "--memory-arm", name], capture_output=True, text=True, check=True)
            results.append({**json.loads(done.stdout.strip().splitlines()[-1]), "machine": machine})
            print(results[-1], flush=True)
            out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    lines = ["# The trainer's peak memory on the 51.7M model", "",
             "Command: `.venv/bin/python scripts/profile_train_step.py --memory`", "", f"Machine: {recorded_machine_of_rows(results)}.", "",
             "One PolicyTrainer in a fresh process per setting (no Ray), the 51.7M Llama of bench_step.py (hidden 512, 6 "
             "layers, vocabulary 32,000, fp32, ZeRO-0, AdamW), 128 sequences of 32 prompt + 128 response tokens in 4 "
             "micro-batches of 32, two steps. Peak: the process's peak resident memory (`ru_maxrss`), which a trainer "
             "actor's `trainer_peak_rss_gib` also reports; built: after the model and DeepSpeed engine were made. "
             "`host_mmap_threshold_mib=1`: blocks of 1 MiB or more mapped on their own and given back when freed; glibc's "
             "default keeps what the micro-batches free for reuse, which the peak then counts.", "",
             "| setting | peak GiB | built GiB | step s |", "|---|---|---|---|"]
    for name in MEMORY_ARMS:
        mine = [r for r in results if r["arm"] == name]
        if not mine:
            continue
        span = lambda key: "-".join(f"{v:g}" for v in sorted({min(r[key] for r in mine), max(r[key] for r in mine)}))  # noqa: E731
        lines.append(f"| {name} | {span('peak_gib')} | {span('built_gib')} | {span('step_s')} |")
    lines += ["", "Step times share the machine with whatever else ran (read the memory, and the times only side by "
              "side within one run)."]
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    import argparse
    import os

    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--in-actor", action="store_true", help="time the same step in a Ray actor too, alternating with this process")
    ap.add_argument("--vs-raw", action="store_true", help="alternate the trainer's step with a raw HF forward/backward + AdamW "
                    "step of the same batch in this process (the ratio without the run-to-run noise of separate processes)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--memory", action="store_true", help="peak memory of each setting in MEMORY_ARMS, each in a fresh "
                    "process, --rounds rounds (writes docs/benchmarks/trainer-memory.md)")
    ap.add_argument("--memory-arm", choices=sorted(MEMORY_ARMS), help=argparse.SUPPRESS)
    ap.add_argument("--arms", nargs="+", choices=sorted(MEMORY_ARMS), default=[],
                    help="--memory: only these settings (the saved results of the others are kept)")
    ap.add_argument("--report-only", action="store_true", help="--memory: write the page again from the saved results")
    args = ap.parse_args()
    if args.memory_arm:
        import json

        print(json.dumps(memory_arm(args.memory_arm)))
        return
    if args.memory:
        memory_report(args.rounds, ROOT / "docs" / "benchmarks" / "trainer-memory", args.arms, args.report_only)
        return
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
