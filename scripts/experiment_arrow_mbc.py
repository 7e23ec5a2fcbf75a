"""Arrow routing and MBC libraries on held-out sub-tasks ("Towards Modular LLMs by Building and Reusing a Library
of LoRAs", Ostapenko et al. 2024, arXiv:2405.11157), on the embedded arithmetic family or on SmolLM2-135M-Instruct
with a family of short chat tasks (``--family smollm2``: :mod:`experiments.chat_family`).

    .venv/bin/python scripts/experiment_arrow_mbc.py                  # 3 seeds zero-shot, RL from each start on seed 0
    .venv/bin/python scripts/experiment_arrow_mbc.py --quick --out /tmp/a --runs /tmp/a   # tables only
    .venv/bin/python scripts/experiment_arrow_mbc.py --family smollm2  # the real model, 3 seeds zero-shot, RL on seed 0
    .venv/bin/python scripts/experiment_arrow_mbc.py --family smollm2 --rl-only  # only the RL, from that run's libraries

Claims tested: (1) Arrow routing over a library beats a uniform merge of it on held-out tasks; (2) a library built by
model-based clustering (MBC: one LoRA per cluster of tasks, trained on the union of their data) beats the library of
one LoRA per task.

Protocol:
1. Sub-tasks of the family; ``--held-out`` ones are never trained on by any expert.
2. Per-task library: one LoRA per remaining sub-task, trained by SFT from the base: the very experts of
   ``scripts/experiment_merging.py`` (``experiments.family_experts``: same settings, same cache).
3. MBC library: ``adapters.cluster.cluster_experts`` (the mttl pipeline: flattened LoRA weights, entries below the
   0.8 quantile zeroed, TruncatedSVD, k-means on cosine similarity) groups the per-task experts into ``--clusters``
   clusters; one LoRA per cluster is trained by SFT on the union of its tasks' data, for as many steps as its tasks'
   experts together (the same data budget as the per-task library).
4. Zero-shot greedy accuracy on the held-out sub-tasks (and on the library's own tasks) of: the base; each library
   merged uniformly (mean of the experts' deltas); Arrow over each library (PEFT ``create_arrow_model``: per token
   and layer, the top-k experts by |<h, prototype>|, softmax weights; ``--top-k``).
   Checks reported first (``## Arrow checks``): Arrow over a library of one per-task expert gives that expert's logits
   (merged into the base), and where each task's tokens are routed (share to its own expert, against chance).
5. GRPO from each start as the policy on the held-out sub-tasks through ``rl train``'s stack (Ray, vLLM, DeepSpeed):
   a new LoRA on the base, a LoRA starting from each library's uniform merge, and a new LoRA beside each library's
   Arrow-routed experts (vLLM serves the routing averaged over each batch's prompts; truncated IS corrects the gap).
Writes ``<out>/arrow-mbc.md`` and ``arrow-mbc.json`` (``arrow-mbc-smollm2.*`` with ``--family smollm2``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

import torch  # noqa: E402

from adapters.arrow import peft_arrow_routing  # noqa: E402
from adapters.cluster import cluster_experts  # noqa: E402
from adapters.library import AdapterLibrary  # noqa: E402
from experiments import family_experts as experts  # noqa: E402  the per-task experts and their SFT (shared with experiment_merging)
from experiments.chat_family import EXPERT_SETTINGS  # noqa: E402
from experiments.arms import is_finished, recorded_path, resolved_path  # noqa: E402
from rl.claims import mean_std  # noqa: E402
from rl.tasks.cache import cached_build  # noqa: E402
from rl.tasks.tiny_model import TinyModelSpec, build_tiny_model  # noqa: E402
from rl.tasks.tiny_sft import encode_sft_batch  # noqa: E402

STARTS = ("base", "per-task merge", "per-task Arrow", "MBC merge", "MBC Arrow")  # the compared starts (RL from each too)
OWN = "own expert"  # each library task scored with its own per-task expert alone: the ceiling a library start aims at
BEST = "best single expert"  # the per-task expert best on the held-out tasks, alone: what a router choosing one could reach
EXPERT = "expert"  # the key of BEST's entry that names the expert
MERGING_REPORT = {"arithmetic": "[merging.md](merging.md)", "smollm2-chat": "[merging-smollm2.md](merging-smollm2.md)"}


def lora_state(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(d / "adapter_model.safetensors"))


def train_cluster_expert(members: list[str], seed: int, s, base, tokenizer, runs: Path, base_name: str, log, family) -> Path:
    """One LoRA trained by SFT on the union of ``members``' data, ``len(members)`` times a per-task expert's steps."""
    s_union = dataclasses.replace(s, sft_steps=s.sft_steps * len(members))
    key = hashlib.sha256(json.dumps([experts.expert_key("lora", "+".join(members), seed, s_union, base_name)]).encode()).hexdigest()[:10]

    def build(out: Path) -> dict:
        t0 = time.time()
        rows = [r for t in members for r in family.problems(t, s.sft_steps * s.batch_size, seed, "train")]
        random.Random(seed).shuffle(rows)  # every batch mixes the cluster's tasks
        kind = experts.LoraKind(tokenizer, s_union, family.loss)
        torch.manual_seed(seed)
        model, params = kind.prepare(copy.deepcopy(base), [])
        losses = experts.sft(model, tokenizer, params, rows, s.lr_lora, s_union, family.loss)
        kind.save(model, None, out)
        return {"members": members, "seed": seed, "sft_steps": s_union.sft_steps, "final_loss": round(statistics.mean(losses[-20:]), 5),
                "train_seconds": round(time.time() - t0, 1)}

    d, _ = cached_build(runs / "cluster-experts", f"cluster-{'+'.join(members)}-seed{seed}-{key}", build,
                        f"MBC expert {'+'.join(members)}", log)
    return d


def make_library(root: Path, dirs: dict[str, Path], model_dir: Path) -> AdapterLibrary:
    lib = AdapterLibrary(root, create=True)
    for name, d in dirs.items():
        if name not in lib:
            lib.add(name, d, {"base_model": str(model_dir)})
    return lib


def zero_shot(lib: AdapterLibrary, dirs: dict[str, Path], s, base, tokenizer, test_rows: dict, top_ks: list[int],
              family) -> dict[str, dict]:
    """Greedy accuracy per task of the library (expert name -> its PEFT directory) merged uniformly ("merge") and
    Arrow-routed with each of ``top_ks`` experts per token ("arrow" for the first, "arrow top-k" for the others);
    "routing": {k: {task: {expert: mean routing weight}}} of each Arrow model (``arrow_routing``)."""
    kind = experts.LoraKind(tokenizer, s)
    base_state = {n: p.detach().clone() for n, p in base.state_dict().items()}
    deltas = kind.merge([kind.load(d) for d in dirs.values()])
    out = {"merge": experts.evaluate(copy.deepcopy(base), base_state, deltas, tokenizer, list(test_rows), test_rows, family),
           "routing": {}}
    for i, k in enumerate(top_ks):
        arrow_model = experts_arrow(lib, list(dirs), base, k)
        out["arrow" if i == 0 else f"arrow top-{k}"] = {
            t: family.accuracy(arrow_model, tokenizer, rows, t) for t, rows in test_rows.items()}
        out["routing"][str(min(k, len(dirs)))] = arrow_routing(arrow_model, list(dirs), tokenizer, test_rows)
    return out


def arrow_routing(arrow_model, names: list[str], tokenizer, test_rows: dict, n_rows: int = 64) -> dict[str, dict[str, float]]:
    """{task: {expert: mean routing weight}} over every routed module and the tokens of ``n_rows`` teacher-forced test
    rows (prompt + answer) of each task: with top-1 routing, the share of (token, module) pairs sent to each expert."""
    out = {}
    for t, rows in test_rows.items():
        batch = encode_sft_batch(tokenizer, rows[:n_rows])
        per_module = peft_arrow_routing(arrow_model, batch["input_ids"], batch["attention_mask"])  # {module: [E]}
        mean = torch.stack(list(per_module.values())).mean(0)
        out[t] = {name: round(w.item(), 4) for name, w in zip(names, mean)}
    return out


@torch.no_grad()
def one_expert_gap(lib: AdapterLibrary, dirs: dict[str, Path], s, base, tokenizer, test_rows: dict, n_rows: int = 64) -> float:
    """Largest |logit| difference between Arrow over a library of one expert and that expert merged into the base
    (the "own expert" row), over each expert and ``n_rows`` teacher-forced test rows of its task: float error when the
    Arrow model is evaluated as it should be (tests/unit/test_adapters_arrow.py)."""
    kind = experts.LoraKind(tokenizer, s)
    base_state = {n: p.detach().clone() for n, p in base.state_dict().items()}
    merged, gap = copy.deepcopy(base), 0.0
    for t, d in dirs.items():
        batch = encode_sft_batch(tokenizer, test_rows[t][:n_rows])
        experts.evaluate(merged, base_state, kind.merge([kind.load(d)]), tokenizer, [], test_rows)
        arrow_model = experts_arrow(lib, [t], base, 1).eval()
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        gap = max(gap, (arrow_model(**inputs).logits - merged(**inputs).logits).abs().max().item())
    return gap


def single_experts(dirs: dict[str, Path], s, base, tokenizer, test_rows: dict, held: list[str], family) -> tuple[dict, dict]:
    """Each library expert alone on the base, scored once on its own task and the ``held`` tasks: (its own task's
    accuracy per task, the held-out accuracies of the expert best on them on average with its name under ``"expert"``)."""
    kind = experts.LoraKind(tokenizer, s)
    base_state = {n: p.detach().clone() for n, p in base.state_dict().items()}
    model = copy.deepcopy(base)
    scores = {e: experts.evaluate(model, base_state, kind.merge([kind.load(d)]), tokenizer, [e, *held], test_rows, family)
              for e, d in dirs.items()}
    best = max(scores, key=lambda e: statistics.mean(scores[e][t] for t in held))
    return {e: scores[e][e] for e in dirs}, {**{t: scores[best][t] for t in held}, EXPERT: best}


def experts_arrow(lib: AdapterLibrary, names: list[str], base, top_k: int):
    from adapters.arrow import build_peft_arrow_model

    return build_peft_arrow_model(lib, names, copy.deepcopy(base), top_k=min(top_k, len(names)), temperature=1.0)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# GRPO on the chat family: the rows' prompts are already in ChatML (system message, demonstration, question), replies are
# a few tokens, and the reward is the family's own check (the last number or word of the first line).
SMOLLM2_RL = ['data.template="{prompt}"', "data.chat_template=never", "rollout.max_new_tokens=20", "rollout.max_model_len=256",
              "trainer.micro_batch_size=16", "rewards.functions=[{fn: experiments/chat_family.py:reward}]"]


def rl_runs(args, libs: dict[str, tuple[Path, list[str]]], model_dir: Path, train_file: Path, test_file: Path, seed: int) -> dict:
    """GRPO from each start; returns {start: {"before", "after"}} of held-out greedy accuracy."""
    from rl.config import load_recipe
    from rl.online import OnlineRun

    common = [*(SMOLLM2_RL if args.family == "smollm2" else []),
              f"seed={seed}", f"model.path={model_dir}", f"data.train={train_file}", f"data.test={test_file}",
              f"data.max_test_examples={args.test_prompts * len(args.held_out)}", f"steps={args.rl_steps}",
              f"data.prompts_per_step={args.rl_prompts}", f"algorithm.group_size={args.rl_group}", f"trainer.lr={args.rl_lr}",
              "trainer.warmup_steps=0", "logging.progress=false", "checkpoint.save_final=false", "adapter.save_as=null",
              f"eval.every={max(1, args.rl_steps // 4)}", "algorithm.kl_coef=0.0", *args.overrides]
    plan = {"base": ("recipes/lora-arithmetic.yaml", ["adapter.library=null"])}
    for lib_name, (root, names) in libs.items():
        plan[f"{lib_name} merge"] = ("recipes/lora-merge-arithmetic.yaml",
                                     [f"adapter.library={root}", f"adapter.experts={json.dumps(names)}"])
        plan[f"{lib_name} Arrow"] = ("recipes/arrow-arithmetic.yaml", [f"adapter.library={root}", f"adapter.experts={json.dumps(names)}",
                                                                      f"adapter.top_k={min(args.top_k, len(names))}"])
    if args.quick:  # the Arrow start alone: LoRA and merge policies train through the same path (tests/e2e/test_adapter_policy.py)
        plan = {start: v for start, v in plan.items() if start.endswith("Arrow")}
    out = {}
    for start, (recipe, extra) in plan.items():
        run_dir = Path(args.runs) / "rl" / f"{start.replace(' ', '_')}-seed{seed}"
        summary_path = run_dir / "summary.json"
        if not is_finished(run_dir):
            OnlineRun(load_recipe(recipe, [*common, *extra, f"output_dir={run_dir}"])).fit()
        summary = json.loads(summary_path.read_text())
        out[start] = {"before": summary["accuracy_before"], "after": summary["accuracy_after"], "run_dir": recorded_path(run_dir),
                      "seconds": summary.get("total_seconds")}  # its own run, also when an earlier invocation ran it
        print(json.dumps({"rl": start, **out[start]}), flush=True)
    return out


def report(result: dict, args, command: str) -> str:
    from rl.metrics import recorded_machine

    held, lib_tasks, seeds = args.held_out, result["library_tasks"], args.seeds
    described = result.get("descriptions", experts.ARITHMETIC.subtasks)  # runs before the chat family lack these two
    base_description = result.get("base_description", "the embedded model (2-digit addition)")
    zs = result["zero_shot"]  # seed -> start -> task -> accuracy

    def cell(start: str, tasks: list[str]) -> str:
        if any(t not in zs[str(s)][start] for s in seeds for t in tasks):
            return "–"
        return mean_std([statistics.mean(zs[str(s)][start][t] for t in tasks) for s in seeds], percent=True)

    lines = [
        "# Arrow routing and MBC libraries on held-out sub-tasks (arXiv:2405.11157)",
        "",
        f"Reproduce: `{command}`",
        "",
        f"Machine: {recorded_machine(result)}. Wall-clock of this run: {result['seconds']:.0f} s (cached experts are reused).",
        "",
        "## Protocol",
        "",
        f"- Base: {base_description}. Library tasks: {', '.join(f'`{t}`' for t in lib_tasks)}; held out (no "
        f"expert ever trained on them): {', '.join(f'`{t}` ({described[t]})' for t in held)}.",
        f"- Per-task library: one LoRA per library task (r={result['settings']['lora_rank']}, SFT {result['settings']['sft_steps']} "
        f"steps of {result['settings']['batch_size']}, lr {result['settings']['lr_lora']:g}; the experts of "
        f"{MERGING_REPORT.get(result.get('family', 'arithmetic'), 'merging.md')}, same cache).",
        f"- MBC library: the per-task LoRAs clustered into {args.clusters} clusters (`adapters.cluster.cluster_experts`: flattened "
        "LoRA weights, entries below the 0.8 quantile of |x| zeroed, TruncatedSVD, k-means on the cosine-similarity rows, "
        "scikit-learn); one LoRA per cluster trained by SFT on the union of its tasks' data, for the summed steps of its tasks.",
        f"- Zero-shot: greedy exact match on {args.test_prompts} test prompts per task; uniform merge = base + mean of the "
        f"experts' deltas; Arrow = PEFT `create_arrow_model`, top-{args.top_k} experts per token and layer, temperature 1 "
        f"(rows marked top-k: the same library routed to k experts, zero-shot only); {OWN}: each library task with its own "
        "per-task expert alone.",
        f"- Seeds {', '.join(map(str, seeds))} (expert data order and init); mean ± std over seeds, in %.",
        "",
        "Clusters found: " + "; ".join(f"seed {s}: " + " | ".join("+".join(m) for m in result["clusters"][str(s)]) for s in seeds) + ".",
        "",
        "## Zero-shot accuracy (%)",
        "",
        "| start | " + " | ".join(f"`{t}` (held out)" for t in held) + " | held-out mean | library tasks mean |",
        "|---|" + "---|" * (len(held) + 2),
    ]
    for start in [start for start in zs[str(seeds[0])] if start in (*STARTS, OWN, BEST) or " top-" in start]:
        lines.append(f"| {start} | " + " | ".join(cell(start, [t]) for t in held) + f" | {cell(start, held)} | {cell(start, lib_tasks)} |")

    def held_per_seed(start: str) -> list[float]:
        return [statistics.mean(zs[str(s)][start][t] for t in held) for s in seeds]

    def held_mean(start: str) -> float:
        return statistics.mean(held_per_seed(start))

    def verdict(a: str, b: str) -> str:
        """``a >= b`` from the 95% interval over seeds of the difference (``rl.claims``), the interval with it."""
        from rl.claims import at_least

        c = at_least(held_per_seed(a), held_per_seed(b))
        interval = f"95% interval of first - second: [{100 * c.low:+.1f}, {100 * c.high:+.1f}] points; " if c.low is not None else ""
        if max(held_mean(a), held_mean(b)) < 0.02:
            return interval + "not testable here: both below 2%"
        return interval + f"**{c.verdict}**"
    lines += arrow_check_lines(result, seeds)
    lines += ["", "## The paper's claims at this scale", "",
              f"- Arrow beats the uniform merge on held-out tasks: per-task library {100 * held_mean('per-task Arrow'):.1f}% vs "
              f"{100 * held_mean('per-task merge'):.1f}% ({verdict('per-task Arrow', 'per-task merge')}); MBC library "
              f"{100 * held_mean('MBC Arrow'):.1f}% vs {100 * held_mean('MBC merge'):.1f}% ({verdict('MBC Arrow', 'MBC merge')}).",
              f"- MBC beats one adapter per task: Arrow {100 * held_mean('MBC Arrow'):.1f}% vs {100 * held_mean('per-task Arrow'):.1f}% "
              f"({verdict('MBC Arrow', 'per-task Arrow')}); uniform merge {100 * held_mean('MBC merge'):.1f}% vs "
              f"{100 * held_mean('per-task merge'):.1f}% ({verdict('MBC merge', 'per-task merge')}).",
              f"- Base: {100 * held_mean('base'):.1f}% on the held-out tasks" + (
                  f"; the best single library expert alone (an upper bound for a router that picks one expert per task): "
                  f"{100 * held_mean(BEST):.1f}% ({', '.join(f'seed {sd}: `{zs[str(sd)][BEST][EXPERT]}`' for sd in seeds)})."
                  if BEST in zs[str(seeds[0])] else ".")]
    rl = result.get("rl")
    if rl:
        rs = result.get("rl_settings", {"steps": args.rl_steps, "prompts": args.rl_prompts, "group": args.rl_group, "lr": args.rl_lr})
        per_run = all(r.get("seconds") for r in rl.values())
        # An --rl-only invocation times only the runs it made itself: the runs' own times add up to the whole.
        wall = sum(r["seconds"] for r in rl.values()) if per_run else rs.get("seconds")
        smollm2 = args.family == "smollm2"
        figure = f"{'arrow-mbc-smollm2' if smollm2 else 'arrow-mbc'}-rl.png"
        lines += ["", f"## GRPO from each start on the held-out tasks (seed {args.rl_seed})", "",
                  f"{rs['steps']} steps of {rs['prompts']} prompts x {rs['group']}, lr {rs['lr']:g}, a LoRA of rank 8 trained "
                  "(new on the base or beside the Arrow experts; the merged LoRA itself for a merge start), no KL; held-out greedy "
                  "accuracy through vLLM before and after. Arrow starts are served with the routing averaged over each batch "
                  "(`adapter.arrow_serving: batch`) and trained with truncated IS (cap 2)."
                  + (" Reward: the family's own check (`experiments/chat_family.py:reward`), prompts in the same chat as the "
                     "zero-shot tables." if smollm2 else "")
                  + (f" Wall-clock of the GRPO runs: {wall:.0f} s in all (each run's own in the table)." if wall else "")
                  + (f" Reproduce: `{rs['command']}`." if "command" in rs else ""), "",
                  "| start | before | after | gain (points) |" + (" run (s) |" if per_run else ""),
                  "|---|---|---|---|" + ("---|" if per_run else "")]
        for start, r in rl.items():
            lines.append(f"| {start} | {100 * r['before']:.1f} | {100 * r['after']:.1f} | {100 * (r['after'] - r['before']):+.1f} |"
                         + (f" {r['seconds']:.0f} |" if per_run else ""))
        lines += ["", f"Curves (reward, held-out accuracy, KL, length, step time of each run): [{figure}]({figure})."]
    return "\n".join(lines) + "\n"


def arrow_check_lines(result: dict, seeds: list[int]) -> list[str]:
    """The report's "Arrow checks" section: the one-expert identity and where the routing sends each task's tokens."""
    checks = result.get("arrow_checks")
    if not checks:
        return []
    lib_tasks, first = result["library_tasks"], checks[str(seeds[0])]["routing"]["per-task"]  # {k: {task: {expert: w}}}
    k1 = "1" if "1" in first else next(iter(first))  # the detailed table: top-1 if it was run
    all_tasks = list(first[k1])

    def own(label: str, seed: int, task: str) -> str:
        """The expert of ``task`` in a library: itself (per-task) or the cluster that holds it (MBC)."""
        return task if label == "per-task" else f"mbc-{next(i for i, m in enumerate(result['clusters'][str(seed)]) if task in m)}"

    gap = max(checks[str(sd)]["one_expert_max_logit_gap"] for sd in seeds)
    lines = ["", "## Arrow checks", "",
             f"- A library of one expert is that expert: the largest |logit| gap between Arrow (top-1) over one per-task "
             f"expert and that expert merged into the base is {gap:.1e} over the experts, seeds and (up to) 64 test rows of its task "
             "(float error; `tests/unit/test_adapters_arrow.py` checks logits and greedy accuracy on the test model).",
             "- Routing: the mean routing weight that a task's tokens (up to 64 teacher-forced test rows, prompt + answer, every "
             "routed module) give to the task's own expert (per-task library) or to its cluster's expert (MBC), in %; with "
             "top-1 it is the share of (token, module) pairs sent there. Chance is 1/E.", "",
             "| library | top-k | " + " | ".join(f"`{t}`" for t in lib_tasks) + " | chance |", "|---|---|" + "---|" * (len(lib_tasks) + 1)]
    for label in ("per-task", "MBC"):
        for k in checks[str(seeds[0])]["routing"][label]:
            r = {sd: checks[str(sd)]["routing"][label][k] for sd in seeds}
            cells = [mean_std([r[sd][t][own(label, sd, t)] for sd in seeds], percent=True) for t in lib_tasks]
            lines.append(f"| {label} | {k} | " + " | ".join(cells) + f" | {100 / len(r[seeds[0]][lib_tasks[0]]):.1f} |")
    lines += ["", f"Per-task library, top-{k1}: where each task's tokens go (%, mean over seeds). Rows that look alike mean "
              "the routing does not tell the tasks apart.", "",
              "| task | " + " | ".join(f"→ `{e}`" for e in lib_tasks) + " |", "|---|" + "---|" * len(lib_tasks)]
    for t in all_tasks:
        w = [statistics.mean(checks[str(sd)]["routing"]["per-task"][k1][t][e] for sd in seeds) for e in lib_tasks]
        lines.append(f"| `{t}`{' (held out)' if t not in lib_tasks else ''} | " + " | ".join(f"{100 * x:.1f}" for x in w) + " |")
    return lines


def zero_shot_all(args, s, family, base, tokenizer, model_dir: Path, base_name: str, runs: Path, expert_runs: Path,
                  lib_tasks: list[str], test_rows: dict, result: dict, log) -> dict[str, tuple[Path, list[str]]]:
    """Each seed's libraries (per-task experts, MBC clusters) and their zero-shot results and Arrow checks, into
    ``result``; returns the libraries GRPO starts from ({label: (root, expert names)}, seed ``args.rl_seed``)."""
    libs_for_rl = {}
    for seed in args.seeds:
        per_task = {}
        for t in lib_tasks:
            experts.train_expert("lora", t, seed, s, base, tokenizer, expert_runs, base_name, log, family)
            per_task[t] = expert_runs / "experts" / experts.expert_key("lora", t, seed, s, base_name)
        clusters = cluster_experts({t: lora_state(d) for t, d in per_task.items()}, k=args.clusters, seed=seed)
        members = [sorted(m) for _, m in sorted(clusters.items())]
        result["clusters"][str(seed)] = members
        mbc = {f"mbc-{i}": train_cluster_expert(m, seed, s, base, tokenizer, runs, base_name, log, family)
               for i, m in enumerate(members)}
        lib_task = make_library(runs / f"library-per-task-seed{seed}", per_task, model_dir)
        lib_mbc = make_library(runs / f"library-mbc-seed{seed}", mbc, model_dir)
        zs = {"base": {t: family.accuracy(base, tokenizer, rows, t) for t, rows in test_rows.items()}}
        zs[OWN], zs[BEST] = single_experts(per_task, s, base, tokenizer, test_rows, args.held_out, family)
        checks = {"one_expert_max_logit_gap": one_expert_gap(lib_task, per_task, s, base, tokenizer, test_rows), "routing": {}}
        for label, lib, dirs in (("per-task", lib_task, per_task), ("MBC", lib_mbc, mbc)):
            r = zero_shot(lib, dirs, s, base, tokenizer, test_rows, [args.top_k, *args.diagnostic_top_k], family)
            checks["routing"][label] = r["routing"]
            zs[f"{label} merge"], zs[f"{label} Arrow"] = r["merge"], r["arrow"]
            zs.update({f"{label} Arrow {k[len('arrow '):]}": v for k, v in r.items() if k.startswith("arrow top-")})
            if seed == args.rl_seed and label in args.rl_libraries:
                libs_for_rl[label] = (lib.root, list(dirs))
        result["zero_shot"][str(seed)] = zs
        result.setdefault("arrow_checks", {})[str(seed)] = checks
        log(f"seed {seed}: clusters {members}; " + json.dumps({k: {t: v if isinstance(v, str) else round(v, 3) for t, v in d.items()}
                                                                for k, d in zs.items()}))
    return libs_for_rl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--family", choices=["arithmetic", "smollm2"], default="arithmetic",
                    help="arithmetic: the embedded model's sub-tasks; smollm2: SmolLM2-135M-Instruct on short chat tasks")
    ap.add_argument("--held-out", nargs="+", default=None, help="default: sub add3 (arithmetic), sub last (smollm2)")
    ap.add_argument("--clusters", type=int, default=2)
    ap.add_argument("--sft-steps", type=int, default=None, help="per-task expert SFT steps (default: Settings'; "
                    "experiment_merging's run used 400: the same value reuses its cached experts)")
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--diagnostic-top-k", type=int, nargs="*", default=[1],
                    help="also route zero-shot with these k (report rows only; RL uses --top-k)")
    ap.add_argument("--test-prompts", type=int, default=None, help="per task (default 256; smollm2: 64)")
    ap.add_argument("--rl-seed", type=int, default=0)
    ap.add_argument("--rl-steps", type=int, default=None, help="default 40 (smollm2: 20)")
    ap.add_argument("--rl-prompts", type=int, default=None, help="default 64 (smollm2: 8)")
    ap.add_argument("--rl-group", type=int, default=None, help="default 8 (smollm2: 4)")
    ap.add_argument("--rl-lr", type=float, default=None, help="default 2e-3 (smollm2: 2e-4)")
    ap.add_argument("--no-rl", action="store_true")
    ap.add_argument("--rl-only", action="store_true", help="only the GRPO runs, from the libraries of a finished run "
                    "(its JSON in --out and its runs); the zero-shot results are kept")
    ap.add_argument("--rl-libraries", nargs="*", default=["per-task", "MBC"], choices=["per-task", "MBC"],
                    help="the libraries whose merge and Arrow starts get a GRPO run (base always does)")
    ap.add_argument("--quick", action="store_true", help="a few SFT and RL steps, one seed: checks the tables are produced")
    ap.add_argument("--runs", default=None, help="default: runs/experiment-arrow-mbc[-smollm2]")
    ap.add_argument("--expert-runs", default=None, help="where the per-task experts are cached (default: experiment_merging's)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "experiments"))
    ap.add_argument("--report-only", action="store_true", help="write the report again from <out>/arrow-mbc[-smollm2].json")
    ap.add_argument("overrides", nargs="*", help="extra recipe overrides for every GRPO run (use_ray=false: in this process)")
    args = ap.parse_args()
    command = "python scripts/experiment_arrow_mbc.py" + (" " + " ".join(sys.argv[1:]) if len(sys.argv) > 1 else "")
    smollm2 = args.family == "smollm2"
    s = dataclasses.replace(experts.Settings(), **EXPERT_SETTINGS) if smollm2 else experts.Settings()
    args.held_out = args.held_out or (["sub", "last"] if smollm2 else ["sub", "add3"])
    args.test_prompts = args.test_prompts or (s.test_prompts if smollm2 else 256)
    for name, embedded, real in (("rl_steps", 40, 20), ("rl_prompts", 64, 8), ("rl_group", 8, 4), ("rl_lr", 2e-3, 2e-4)):
        if getattr(args, name) is None:  # SmolLM2: the rollouts and LoRA rate of recipes/smollm2-arithmetic-lora.yaml
            setattr(args, name, real if smollm2 else embedded)
    if args.sft_steps:
        s = dataclasses.replace(s, sft_steps=args.sft_steps)
    if args.quick:
        args.seeds, args.test_prompts = args.seeds[:1], 16
        args.rl_steps, args.rl_prompts, args.rl_group = 1, 8, 4
        args.rl_libraries = ["MBC"]  # one GRPO run: from the MBC library's Arrow start
        s = dataclasses.replace(s, sft_steps=4 if smollm2 else 10, warmup_steps=2)
    os.chdir(ROOT)
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.time()
    stem = "arrow-mbc-smollm2" if smollm2 else "arrow-mbc"
    if args.report_only:  # the run's own seeds; the other settings are this command's (give the run's options)
        result = json.loads((Path(args.out) / f"{stem}.json").read_text())
        args.seeds = [int(sd) for sd in result["zero_shot"]]
        result.setdefault("command", command.replace(" --report-only", ""))
        (Path(args.out) / f"{stem}.md").write_text(report(result, args, result["command"]))
        return
    runs = Path(args.runs or ROOT / "runs" / f"experiment-{stem}")
    args.runs = str(runs)
    default_expert_runs = ROOT / "runs" / ("experiment-merging-smollm2" if smollm2 else "experiment-merging")
    expert_runs = Path(args.expert_runs) if args.expert_runs else (runs if args.quick else default_expert_runs)
    log = lambda msg: print(f"[arrow-mbc] {msg}", flush=True)  # noqa: E731

    from transformers import AutoModelForCausalLM, AutoTokenizer

    if smollm2:
        from experiments.chat_family import ChatFamily
        from rl.tasks.pretrained import build_pretrained

        model_dir = build_pretrained("builtin:smollm2-135m-instruct", log=log)
        base_name, tokenizer = model_dir.parent.name, AutoTokenizer.from_pretrained(model_dir)
        family = ChatFamily(tokenizer)
        base_description = ("SmolLM2-135M-Instruct (`builtin:smollm2-135m-instruct`), every prompt in ChatML with the same "
                            "system message and one demonstration (experiments/chat_family.py)")
    else:
        model_root = Path(build_tiny_model(TinyModelSpec()))
        model_dir, base_name = model_root / "model", model_root.name
        tokenizer, family = AutoTokenizer.from_pretrained(model_dir), experts.ARITHMETIC
        base_description = "the embedded model (2-digit addition)"
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lib_tasks = [t for t in family.subtasks if t not in args.held_out]
    all_tasks = [*args.held_out, *lib_tasks]
    test_rows = {t: family.problems(t, args.test_prompts, 0, "test") for t in all_tasks}

    if args.rl_only:  # the libraries of the finished run, as it made them
        result = json.loads((Path(args.out) / f"{stem}.json").read_text())
        libs_for_rl = {label: (lib.root, lib_tasks if label == "per-task" else lib.names())
                       for label, lib in (("per-task", AdapterLibrary(runs / f"library-per-task-seed{args.rl_seed}")),
                                          ("MBC", AdapterLibrary(runs / f"library-mbc-seed{args.rl_seed}")))
                       if label in args.rl_libraries}
        args.seeds = [int(sd) for sd in result["zero_shot"]]  # the run's own seeds, for the report's tables
    else:
        from rl.metrics import describe_machine

        # The machine is recorded with the results: a re-render states it.
        result = {"command": command, "machine": describe_machine(), "family": family.name, "base_description": base_description,
                  "descriptions": family.subtasks, "library_tasks": lib_tasks, "settings": dataclasses.asdict(s),
                  "zero_shot": {}, "clusters": {}}
        libs_for_rl = zero_shot_all(args, s, family, base, tokenizer, model_dir, base_name, runs, expert_runs, lib_tasks,
                                    test_rows, result, log)

    if not args.no_rl and args.rl_seed in args.seeds:
        t_rl = time.time()
        data = runs / "data"
        n_train = max(args.rl_prompts * args.rl_steps, 512)
        # Each row names its task: the chat family's reward checks letters case-sensitively for some tasks only.
        train_rows = [{**r, "task": t} for t in args.held_out for r in family.problems(t, n_train // len(args.held_out),
                                                                                      args.rl_seed, "train")]
        random.Random(args.rl_seed).shuffle(train_rows)
        test_file = write_jsonl(data / "held-out-test.jsonl", [{**r, "task": t} for t in args.held_out for r in test_rows[t]])
        result["rl"] = rl_runs(args, libs_for_rl, model_dir, write_jsonl(data / "held-out-train.jsonl", train_rows), test_file,
                               args.rl_seed)
        result["rl_settings"] = {"steps": args.rl_steps, "prompts": args.rl_prompts, "group": args.rl_group, "lr": args.rl_lr,
                                 "seconds": time.time() - t_rl, "command": command}
    if not args.rl_only:
        result["seconds"] = time.time() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str))
    if result.get("rl"):
        from rl.plot import plot_runs

        plot_runs([str(resolved_path(r["run_dir"])) for r in result["rl"].values()], str(out / f"{stem}-rl.png"), labels=list(result["rl"]))
    text = report(result, args, command)
    (out / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
