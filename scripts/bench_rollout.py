"""Rollout throughput: this framework's Ray rollout actor vs raw vLLM, side by side in one run.

    .venv/bin/python scripts/bench_rollout.py [--model DIR] [--prompts 512] [--n 8] [--max-new-tokens 6] [--repeats 3]

Both sides use the same model, prompts, sampling and engine settings, each in a fresh process
(so neither inherits the other's threads or engine): the framework side goes through
`RolloutGroup.generate` (a Ray actor, per-prompt seeds, Completion dataclasses with per-token
logprobs), the raw side calls `LLM.generate` in-process with logprobs on. Writes a markdown table
to docs/benchmarks/rollout.md with the machine described.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="HF model dir (default: the embedded tiny model)")
    ap.add_argument("--prompts", type=int, default=512)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "rollout.md"))
    ap.add_argument("--side", choices=["framework", "raw"], default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side is None:
        return report(args)
    print("RESULT " + json.dumps(measure(args)), flush=True)


def report(args) -> None:
    results = {}
    # Ray gives an actor with num_cpus=1 OMP_NUM_THREADS=1; raw vLLM is measured with that and with
    # the process defaults, so the ratio separates the framework's overhead from thread settings.
    for key, side, env in (("framework", "framework", {}), ("raw", "raw", {"OMP_NUM_THREADS": "1"}), ("raw_default", "raw", {})):
        cmd = [sys.executable, __file__, "--side", side, "--prompts", str(args.prompts), "--n", str(args.n),
               "--max-new-tokens", str(args.max_new_tokens), "--repeats", str(args.repeats)] + (
                   ["--model", args.model] if args.model else [])
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True, env={**os.environ, **env}).stdout
        results[key] = json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[len("RESULT "):])
    fw, raw, model = results["framework"]["tps"], results["raw"]["tps"], results["raw"]["model"]
    raw_d = results["raw_default"]["tps"]
    fw_m, raw_m, raw_dm = statistics.median(fw), statistics.median(raw), statistics.median(raw_d)
    from rl.metrics import describe_machine

    machine = describe_machine()
    text = (
        "# Rollout throughput: framework vs raw vLLM\n\n"
        f"Command: `.venv/bin/python scripts/bench_rollout.py --prompts {args.prompts} --n {args.n} "
        f"--max-new-tokens {args.max_new_tokens} --repeats {args.repeats}`\n\n"
        f"Machine: {machine}. Model: the embedded tiny model (`{Path(model).parent.name}`). {args.prompts} prompts x {args.n} samples, "
        f"<= {args.max_new_tokens} new tokens, temperature 1, per-token logprobs on both sides; each side in a fresh process, "
        "one warm-up call, then the repeats.\n\n"
        "| side | generated tokens/s (median of repeats) | all repeats |\n|---|---|---|\n"
        f"| framework (`RolloutGroup.generate`, 1 Ray actor) | {fw_m:,.0f} | {', '.join(f'{x:,.0f}' for x in fw)} |\n"
        f"| raw vLLM (`LLM.generate`, in-process, OMP_NUM_THREADS=1 as in the actor) | {raw_m:,.0f} | "
        f"{', '.join(f'{x:,.0f}' for x in raw)} |\n"
        f"| raw vLLM (`LLM.generate`, in-process, default threads) | {raw_dm:,.0f} | {', '.join(f'{x:,.0f}' for x in raw_d)} |\n\n"
        f"Ratio framework / raw vLLM with the same threads: **{fw_m / raw_m:.2f}**; with default threads: {fw_m / raw_dm:.2f}\n"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


def measure(args) -> dict:

    from rl.tasks.tiny_model import TinyModelSpec, build_tiny_model
    from rollout.types import SamplingSpec
    from rl.workers import RolloutGroup, init_ray
    from rollout.vllm_worker import EngineSpec
    from transformers import AutoTokenizer

    model = args.model or str(Path(build_tiny_model(TinyModelSpec())) / "model")
    tok = AutoTokenizer.from_pretrained(model)
    prompts = [tok(f"{a}+{b}=")["input_ids"] for a, b in zip(range(args.prompts), range(7, 7 + args.prompts))]
    prompts = [p for p in prompts][: args.prompts]
    spec = EngineSpec(model_path=model, max_model_len=64)
    sampling = SamplingSpec(n=args.n, max_new_tokens=args.max_new_tokens, temperature=1.0, seed=0)

    def timed(fn) -> list[float]:
        fn()  # warm-up
        out = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            tokens = fn()
            out.append(tokens / (time.perf_counter() - t0))
        return out

    if args.side == "framework":  # one Ray rollout actor
        init_ray(1)
        group = RolloutGroup.create(spec, 1, use_ray=True)
        tps = timed(lambda: sum(len(c.token_ids) for g in group.generate(prompts, sampling) for c in g))
        group.shutdown()
        return {"tps": tps, "model": model}

    # Raw vLLM, in this process, same engine settings and per-prompt seeds.
    for k, v in spec.env().items():
        os.environ[k] = v
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=model, dtype="float32", max_model_len=64, gpu_memory_utilization=0.3, enforce_eager=True, seed=0)
    params = [SamplingParams(n=args.n, max_tokens=args.max_new_tokens, temperature=1.0, logprobs=0, seed=i) for i in range(len(prompts))]
    raw_prompts = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    tps = timed(lambda: sum(len(c.token_ids) for o in llm.generate(raw_prompts, params, use_tqdm=False) for c in o.outputs))
    return {"tps": tps, "model": model}


if __name__ == "__main__":
    main()
