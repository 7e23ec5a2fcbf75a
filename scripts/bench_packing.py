"""The trainer's step on sampled replies of very different lengths: padded micro-batches vs token-budget
micro-batches packed into one row (``trainer.max_tokens_per_micro_batch``), side by side in one run.

    .venv/bin/python scripts/bench_packing.py [--prompts 8] [--group 4] [--new-tokens 384]
                                              [--arms padded:8 packed:1024:sdpa packed:1024] [--steps 2]

The batch is real: SmolLM2-135M-Instruct (``builtin:smollm2-135m-instruct``) samples ``--group`` replies to each
of ``--prompts`` GSM8K questions (the smollm2-gsm8k recipe's template, chat format, temperature 1, up to
``--new-tokens``) with vLLM, once (cached in .cache/bench-packing/). Each arm then runs the policy trainer
(``trainer.policy_trainer.PolicyTrainer``: DeepSpeed ZeRO-0, float32, GRPO's clipped loss, random +-1 advantages)
on that batch in a fresh process: one warm-up step, then ``--steps`` timed steps (median reported).
``padded:M`` cuts the batch into micro-batches of M rows in length order (the default path); ``packed:K`` fills
micro-batches with whole sequences up to K tokens and packs each into one row, attended with the trainer's default
kernel for packed rows (``sdpa_varlen``: SDPA per sequence); ``packed:K:KERNEL`` names another
``trainer.attn_implementation`` (``sdpa``: transformers' SDPA with a block-diagonal mask over the row). Reported per arm: seconds per
step, tokens per second (prompt + reply tokens, no padding), the share of the forward's positions that are
padding, peak RSS above the loaded model, and the loss (the same batch, so the same loss up to float rounding).
Writes docs/benchmarks/packing.md (+ .json) with the machine described.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TEMPLATE = "{question}\nLet's think step by step and put the final answer after '####'."


def model_dir() -> str:
    from rl.tasks.pretrained import build_pretrained

    return str(build_pretrained("builtin:smollm2-135m-instruct", log=lambda s: None))


def sample(args, out: Path) -> None:
    """vLLM samples the batch (in this process) and writes its token ids to ``out``."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    model = model_dir()
    tok = AutoTokenizer.from_pretrained(model)
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()[: args.prompts]]
    prompts = [tok.apply_chat_template([{"role": "user", "content": TEMPLATE.format(question=r["question"])}],
                                       add_generation_prompt=True, tokenize=True) for r in rows]
    prompts = [list(p["input_ids"]) if isinstance(p, dict) or hasattr(p, "keys") else list(p) for p in prompts]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    llm = LLM(model=model, dtype="float32", max_model_len=args.new_tokens + 256, seed=0, enable_prefix_caching=False,
              gpu_memory_utilization=0.3, enforce_eager=True)
    params = SamplingParams(temperature=1.0, max_tokens=args.new_tokens, n=args.group, seed=0)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    batch = {"prompts": [], "responses": []}
    for p, o in zip(prompts, outputs):
        for c in o.outputs:
            batch["prompts"].append(p)
            batch["responses"].append(list(c.token_ids))
    out.write_text(json.dumps(batch))


def arm(args, spec: str, batch_file: Path, out: Path) -> None:
    """One arm's steps in this process; numbers to ``out``."""
    from rl.workers.base import free_port
    from trainer.config import AlgorithmConfig, TrainerConfig
    from trainer.policies import PolicySpec
    from trainer.policy_trainer import PolicyTrainer
    from trainer.stats import reduce_stats
    from trainer.setup import TrainerSetup
    from trainer.types import TrainBatch

    kind, size, *kernel = spec.split(":")
    data = json.loads(batch_file.read_text())
    rng = random.Random(0)
    responses = data["responses"]
    batch = TrainBatch(data["prompts"], responses, [rng.choice([-1.0, 1.0]) for _ in responses], [[0.0] * len(r) for r in responses],
                       num_sequences=len(responses), num_tokens=sum(map(len, responses)))
    cfg = TrainerConfig(lr=1e-6, torch_threads=os.cpu_count() or 1,
                        micro_batch_size=int(size) if kind == "padded" else 8,
                        max_tokens_per_micro_batch=int(size) if kind == "packed" else 0,
                        attn_implementation=kernel[0] if kernel else None)
    setup = TrainerSetup(policy=PolicySpec(kind="full", base_model=model_dir()), dtype="float32", trainer=cfg,
                         algorithm=AlgorithmConfig(loss_aggregation="token-mean"), max_response_len=args.new_tokens,
                         master_port=free_port())
    trainer = PolicyTrainer(setup)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    micro = trainer._micro_batches(batch)  # the micro-batches a training step cuts (one rank)
    positions = sum(mb["packed_input_ids"].numel() if "packed_input_ids" in mb else mb["input_ids"].numel() for _, mb in micro)
    real = sum(len(p) + len(r) for p, r in zip(batch.prompt_token_ids, batch.response_token_ids))
    seconds, losses = [], []
    for _ in range(1 + args.steps):
        t0 = time.perf_counter()
        stats = trainer.train_step(batch, len(micro))
        seconds.append(time.perf_counter() - t0)
        losses.append(reduce_stats([stats])["loss"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step = statistics.median(seconds[1:])
    out.write_text(json.dumps({
        "arm": spec, "micro_batches": len(micro), "seconds_per_step": step, "tokens_per_second": real / step,
        "padding_share": 1 - real / positions, "peak_rss_gib": peak / 2**20, "above_model_gib": (peak - base_rss) / 2**20,
        "first_step_loss": losses[0],
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=384)
    ap.add_argument("--arms", nargs="+", default=["padded:8", "packed:1024:sdpa", "packed:1024"])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    ap.add_argument("--sample", metavar="OUT", help=argparse.SUPPRESS)
    ap.add_argument("--arm", nargs=3, metavar=("SPEC", "BATCH", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.sample:
        sample(args, Path(args.sample))
        return
    if args.arm:
        arm(args, args.arm[0], Path(args.arm[1]), Path(args.arm[2]))
        return
    command = "python scripts/bench_packing.py" + (" " + " ".join(sys.argv[1:]) if len(sys.argv) > 1 else "")
    key = hashlib.sha256(json.dumps([args.prompts, args.group, args.new_tokens, args.data]).encode()).hexdigest()[:12]
    cache = ROOT / ".cache" / "bench-packing"
    cache.mkdir(parents=True, exist_ok=True)
    batch_file = cache / f"batch-{key}.json"
    base = [sys.executable, __file__, "--prompts", str(args.prompts), "--group", str(args.group), "--new-tokens",
            str(args.new_tokens), "--steps", str(args.steps), "--data", args.data]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))}
    if not batch_file.is_file():
        subprocess.run(base + ["--sample", str(batch_file)], check=True, env=env)
    results = []
    for spec in args.arms:
        tmp = cache / f"arm-{spec.replace(':', '-')}.json"
        subprocess.run(base + ["--arm", spec, str(batch_file), str(tmp)], check=True, env=env)
        results.append(json.loads(tmp.read_text()))
    data = json.loads(batch_file.read_text())
    lengths = sorted(len(r) for r in data["responses"])
    from rl.metrics import describe_machine

    ref = results[0]
    lines = ["# Packed token-budget micro-batches vs padded micro-batches: the trainer's step on replies of varied length",
             "", f"Reproduce: `{command}`", "",
             f"Machine: {describe_machine()}. SmolLM2-135M-Instruct, float32, one trainer rank (ZeRO-0), "
             f"{len(lengths)} replies sampled by vLLM at temperature 1 to {args.prompts} GSM8K questions (up to "
             f"{args.new_tokens} new tokens): reply lengths min {lengths[0]}, median {lengths[len(lengths) // 2]}, "
             f"max {lengths[-1]}; prompts {min(map(len, data['prompts']))}-{max(map(len, data['prompts']))} tokens. "
             f"Median of {args.steps} steps after a warm-up step.", "",
             "| arm | micro-batches | s / step | tokens / s | vs the first arm | padding share | peak RSS above the model (GiB) | "
             "loss of the first step |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['arm']} | {r['micro_batches']} | {r['seconds_per_step']:.1f} | {r['tokens_per_second']:.0f} | "
                     f"{r['tokens_per_second'] / ref['tokens_per_second']:.2f}x | {r['padding_share']:.1%} | "
                     f"{r['above_model_gib']:.2f} | {r['first_step_loss']:.6f} |")
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    (out / "packing.json").write_text(json.dumps({"command": command, "reply_lengths": lengths, "arms": results}, indent=1))
    (out / "packing.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
