"""Merging many experts: sparse adapters vs LoRA vs full fine-tunes, on the embedded task family or on
SmolLM2-135M-Instruct with a family of short chat tasks (``--family smollm2``: :mod:`experiments.chat_family`).

After "Exploring Sparse Adapters for Scalable Merging of Parameter Efficient Experts" (Arnob et al.
2025, https://arxiv.org/abs/2507.07140), claim: after merging many experts, sparse adapters keep more
of each expert's in-distribution performance than merged LoRA or merged full fine-tunes.

    .venv/bin/python scripts/experiment_merging.py                       # 3 seeds, 6 sub-tasks
    .venv/bin/python scripts/experiment_merging.py --quick --out /tmp/m --runs /tmp/m   # tables only
    .venv/bin/python scripts/experiment_merging.py --family smollm2      # the real model: 6 chat tasks, 3 seeds

Protocol (what departs from the paper is listed in the report, ``DEPARTURES``):
1. Base: the embedded model, ``build_tiny_model(TinyModelSpec())`` (2-digit addition, SFT to ~30%), or SmolLM2.
2. One expert per sub-task of the family and per kind, trained by SFT from the
   base with the same data stream, steps, batch and seed for every kind (only the lr differs):
   ``full`` (every weight), ``lora`` (PEFT, r=8, alpha=16, q/k/v/o/gate/up/down) and ``sparse``
   (5% of the entries of the same projections, SNIP mask on a calibration batch of the sub-task,
   trained through ``adapters.sparse.SparseAdapter``).
3. Merges per kind, of subsets of 2, 4 and all experts: full = base + mean of the deltas (uniform
   weight averaging); LoRA = base + mean of the dense deltas (``merge_lora_uniform``); sparse = base +
   summed deltas divided per entry by the number of experts touching it (``merge_sparse``).
4. Greedy exact-match accuracy on each sub-task's test split: the base, each expert on its own
   sub-task (its "merge of one"), each merge on every sub-task it merged. Normalized accuracy =
   merged accuracy / that expert's own accuracy.
Experts are cached under ``--runs`` (safetensors + JSON; a rerun reuses them). Writes
``<out>/merging.md``, ``merging.json`` and ``merging.png`` (``merging-smollm2.*`` with ``--family smollm2``).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]  # experiments/ is beside the package, not in it

import torch  # noqa: E402

from experiments import chat_family  # noqa: E402
from experiments.arithmetic_family import SUBTASKS  # noqa: E402
from experiments.family_experts import ARITHMETIC, KINDS, PROJECTIONS, Settings, evaluate, train_expert  # noqa: E402
from rl.claims import mean_std  # noqa: E402
from rl.metrics import describe_machine, recorded_machine  # noqa: E402
from rl.tasks.tiny_model import TinyModelSpec, build_tiny_model  # noqa: E402

# What the report says of each family: its base, where its sub-tasks are defined, and how it departs from the paper.
FAMILY_TEXT = {
    "arithmetic": {
        "base": "the embedded model (2-digit addition, SFT stopped at ~30% accuracy)",
        "source": "experiments/arithmetic_family.py",
        "departures": [
            "Scale: a 1.05M-parameter Llama (4 layers, hidden 128) and up to 6 synthetic arithmetic sub-tasks, not a "
            "billion-parameter LM and up to 20 FLAN tasks. All but `add` are skills the base lacks (0% before SFT), so "
            "each expert moves far from the base.",
            "LoRA r=8 on the seven projections is ~9% of the weights, more than the sparse adapter's 5%."],
    },
    "smollm2-chat": {
        "base": "SmolLM2-135M-Instruct (`builtin:smollm2-135m-instruct`), every prompt in ChatML with one demonstration",
        "source": "experiments/chat_family.py",
        "departures": [
            "Scale: a 135M-parameter pretrained chat model and 6 short chat tasks it already does in part (numbers and "
            "letters), not a billion-parameter LM and up to 20 FLAN tasks. Each expert is a short SFT run (a few hundred "
            "examples), so it moves little from the base.",
            "LoRA r=8 on the seven projections trains 2.4M weights, fewer than the sparse adapter's 5% of them (5.3M)."],
    },
}
DEPARTURES = [
    "Sparse masks: global top-k of |W * dL/dW| (SNIP) over the seven projection matrices, on one calibration "
    "batch of the sub-task's own SFT loss at the base weights; embeddings, norms and lm_head are not adapted "
    "(LoRA adapts the same matrices). The paper's exact selection schedule may differ; we keep the mask fixed.",
    "LoRA dropout 0; AdamW without weight decay; linear warm-up then linear decay to 0 for every kind.",
    "Only in-distribution (the merged sub-tasks' own test splits) is measured, not held-out tasks.",
    "Subsets of 2 and 4 experts: the same few random subsets (fixed subset seed) for every kind and seed.",
]


def choose_subsets(s: Settings) -> dict[int, list[tuple[str, ...]]]:
    """For each size: ``s.subsets`` random subsets (all of them if there are fewer), the same for every kind/seed."""
    rng = random.Random(s.subset_seed)
    out = {}
    for k in s.sizes():
        combos = list(itertools.combinations(s.subtasks, k))
        out[k] = sorted(rng.sample(combos, min(s.subsets, len(combos)))) if k < len(s.subtasks) else combos
    return out


# ------------------------------------------------------------------------------------------
# summary, report, plot
# ------------------------------------------------------------------------------------------


def summarize(merges: list[dict], s: Settings, seeds: list[int]) -> dict:
    """summary[kind][size] = per seed: mean ratio (over subsets, of the mean over members), and per sub-task
    ratio and accuracy (mean over the subsets containing it); then mean and std over seeds."""
    out: dict = {}
    for kind in KINDS:
        out[kind] = {}
        for size in [1, *s.sizes()]:
            per_seed = []
            for seed in seeds:
                rows = [m for m in merges if m["kind"] == kind and m["size"] == size and m["seed"] == seed]
                subset_means = [statistics.mean(v for v in m["ratio"].values() if v is not None) for m in rows
                                if any(v is not None for v in m["ratio"].values())]
                task_ratio, task_acc = {}, {}
                for t in s.subtasks:
                    r = [m["ratio"][t] for m in rows if m["ratio"].get(t) is not None]
                    a = [m["accuracy"][t] for m in rows if t in m["accuracy"]]
                    task_ratio[t] = statistics.mean(r) if r else None
                    task_acc[t] = statistics.mean(a) if a else None
                per_seed.append({"seed": seed, "mean_ratio": statistics.mean(subset_means) if subset_means else None,
                                 "mean_accuracy": statistics.mean(statistics.mean(m["accuracy"].values()) for m in rows),
                                 "ratio": task_ratio, "accuracy": task_acc})
            vals = [p["mean_ratio"] for p in per_seed if p["mean_ratio"] is not None]
            out[kind][size] = {"per_seed": per_seed, "mean_ratio": statistics.mean(vals) if vals else None,
                               "std_ratio": statistics.stdev(vals) if len(vals) > 1 else 0.0}
    return out


def claim_statement(summary: dict, s: Settings) -> dict:
    """Whether sparse merges keep more of the experts' accuracy than LoRA and full merges at the largest size: the
    verdict from 95% intervals over seeds (``rl.claims``), on the normalized (merged / own) and absolute accuracy."""
    from rl.claims import HOLDS, DOES_NOT_HOLD, at_least, describe

    n = max(s.sizes()) if s.sizes() else 1
    at = {k: summary[k][n] for k in KINDS}
    undefined = [k for k in KINDS if at[k]["mean_ratio"] is None]
    if undefined:
        return {"size": n, "holds": None, "text": f"Not decidable: every {'/'.join(undefined)} expert has 0% accuracy on its own "
                "sub-task, so merged / own accuracy is undefined."}
    ratio = normalized_per_seed(summary, n)
    accuracy = {k: [p["mean_accuracy"] for p in at[k]["per_seed"]] for k in KINDS}
    others = ("lora", "full")
    normalized = {o: at_least(ratio["sparse"], ratio[o]) for o in others}
    absolute = {o: at_least(accuracy["sparse"], accuracy[o]) for o in others}
    verdicts = {c.verdict for c in normalized.values()}
    holds = True if verdicts == {HOLDS} else False if DOES_NOT_HOLD in verdicts else None
    overall = {True: "holds", False: "does not hold"}.get(holds, "is not distinguishable at this scale")
    keep = ", ".join(f"{k} {100 * statistics.mean(ratio[k]):.1f}%" for k in KINDS)
    text = (f"After merging all {n} experts, the share of the experts' own accuracy each kind keeps: {keep} "
            f"({len(ratio['sparse'])} seed(s)). Sparse vs each kind, normalized (merged / own): "
            + "; ".join(f"vs {o}: {describe(normalized[o])}" for o in others)
            + ". Absolute accuracy: " + "; ".join(f"vs {o}: {describe(absolute[o])}" for o in others)
            + f". The claim (sparse > LoRA and full after merging) {overall} on the normalized accuracy.")
    smaller = smaller_merges(summary, [size for size in s.sizes() if size < n], others)
    if smaller:
        text += f" Normalized, with fewer experts merged (sparse - each kind, 95% interval over seeds): {smaller}."
    best = max(at[k]["mean_ratio"] for k in KINDS)
    if best < 0.5:
        text += (f" Every kind loses most of its experts' accuracy when merged (the best keeps {100 * best:.1f}%), so this "
                 "compares failures rather than working merges.")
    return {"size": n, "holds": holds, "verdicts": {o: [normalized[o].verdict, absolute[o].verdict] for o in others},
            "best_ratio": best, "text": text}


def normalized_per_seed(summary: dict, size: int) -> dict[str, list[float]]:
    """Each kind's normalized accuracy (merged / own) per seed at ``size`` experts merged, where it is defined."""
    return {k: [p["mean_ratio"] for p in summary[k][size]["per_seed"] if p["mean_ratio"] is not None] for k in KINDS}


def smaller_merges(summary: dict, sizes: list[int], others: tuple[str, ...]) -> str:
    """The sparse-vs-each-kind verdicts on normalized accuracy at each of ``sizes`` experts merged, for the report."""
    from rl.claims import at_least

    parts = []
    for size in sizes:
        ratio = normalized_per_seed(summary, size)
        verdicts = []
        for o in others:
            c = at_least(ratio["sparse"], ratio[o])
            interval = f"[{c.low:+.3f}, {c.high:+.3f}] " if c.low is not None else ""
            verdicts.append(f"vs {o} {interval}**{c.verdict}**")
        parts.append(f"{size} experts: " + ", ".join(verdicts))
    return "; ".join(parts)


def plot(summary: dict, s: Settings, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = [1, *s.sizes()]
    for kind in KINDS:
        pts = [(k, summary[kind][k]) for k in sizes if summary[kind][k]["mean_ratio"] is not None]
        ax.errorbar([k for k, _ in pts], [100 * v["mean_ratio"] for _, v in pts], yerr=[100 * v["std_ratio"] for _, v in pts],
                    marker="o", capsize=3, label=kind)
    ax.set_xticks(sizes)
    ax.set_xlabel("experts merged")
    ax.set_ylabel("merged accuracy / expert's own accuracy (%)")
    ax.set_title(f"Merging experts on the {s.family} family (mean ± std over seeds)", fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def report(result: dict, s: Settings, command: str, stem: str = "merging") -> str:
    summary, seeds, tasks = result["summary"], result["seeds"], list(s.subtasks)
    experts = result["experts"]
    lines = [
        "# Merging experts: sparse adapters vs LoRA vs full fine-tunes (arXiv:2507.07140)",
        "",
        f"Reproduce: `{command}`",
        "",
        f"Machine: {recorded_machine(result)}, torch threads {result.get('threads', 1)}. Wall-clock of this run: {result['seconds']:.0f} s "
        f"(expert training as first built: {sum(e['train_seconds'] for e in experts):.0f} s in all; cached experts are reused).",
        "",
        "Claim (paper): after merging many experts, sparse adapters keep more in-distribution performance than merged "
        "LoRA or merged full fine-tunes.",
        "",
        "## Protocol",
        "",
        f"- Base: {FAMILY_TEXT[s.family]['base']}: `{result['base']}`.",
        f"- Sub-tasks ({FAMILY_TEXT[s.family]['source']}; train/test split by a stable hash of the prompt, 10% test):",
    ]
    for t in tasks:
        sz = result["subtasks"][t]
        lines.append(f"  - `{t}`: {sz['description']}; {sz['train']} train / {sz['test']} test problems, "
                     f"{result['test_prompts'][t]} test prompts evaluated.")
    lines += [
        f"- Experts: one per sub-task and kind, trained by SFT from the base: {s.sft_steps} steps of {s.batch_size} "
        f"train-split problems (the same stream and seed for every kind), AdamW, {s.warmup_steps} warm-up steps then "
        "linear decay to 0; loss on answer + EOS tokens.",
        f"  - `full`: every weight, lr {s.lr_full:g}.",
        f"  - `lora`: PEFT LoRA r={s.lora_rank}, alpha={s.lora_alpha}, on {', '.join(PROJECTIONS)}, lr {s.lr_lora:g}.",
        f"  - `sparse`: {100 * s.keep_ratio:g}% of the entries of the same projections, chosen by connection sensitivity "
        f"(SNIP, |W * dL/dW| on {s.calibration_rows} train problems of the sub-task, global top-k), lr {s.lr_sparse:g}.",
        "- Merges: `full` = base + mean of the experts' deltas (uniform weight averaging); `lora` = base + mean of the "
        "dense deltas B·A·alpha/r; `sparse` = base + summed deltas divided per entry by the number of experts touching it.",
        f"- Subsets: sizes {', '.join(map(str, s.sizes()))}; below the whole family, {s.subsets} random subsets "
        f"(seed {s.subset_seed}), the same for every kind and seed: "
        + "; ".join(f"{k}: " + ", ".join("+".join(c) for c in result["subsets"][str(k)]) for k in s.sizes() if k < len(tasks)) + ".",
        "- Score: greedy exact match on each merged sub-task's test prompts. Normalized accuracy = merged accuracy / the "
        "same expert's own accuracy; a subset's score is the mean over its sub-tasks, and a size's score the mean over "
        f"its subsets. Seeds {', '.join(map(str, seeds))} (expert training data order and init); mean ± std over seeds.",
        "",
        "Departures from the paper:",
        "",
        *[f"- {d}" for d in (*FAMILY_TEXT[s.family]["departures"], *DEPARTURES)],
        "",
        "## Result",
        "",
        result["claim"]["text"],
        "",
        f"![normalized accuracy vs experts merged]({stem}.png)",
        "",
        "### Normalized accuracy (merged / own expert, %), mean ± std over seeds",
        "",
        "| kind | experts merged | " + " | ".join(tasks) + " | mean |",
        "|---|---|" + "---|" * len(tasks) + "---|",
    ]
    for kind in KINDS:
        for size in s.sizes():
            cell = summary[kind][size]
            per = [mean_std([p["ratio"][t] for p in cell["per_seed"] if p["ratio"][t] is not None], percent=True) for t in tasks]
            lines.append(f"| {kind} | {size} | " + " | ".join(per)
                         + f" | {mean_std([p['mean_ratio'] for p in cell['per_seed'] if p['mean_ratio'] is not None], percent=True)} |")
    lines += [
        "",
        "A sub-task's cell averages the subsets that contain it (\"–\": in none of them).",
        "",
        "### Absolute accuracy (%), mean ± std over seeds",
        "",
        "| model | " + " | ".join(tasks) + " | mean |",
        "|---|" + "---|" * len(tasks) + "---|",
        "| base | " + " | ".join(f"{100 * result['base_accuracy'][t]:.1f}" for t in tasks)
        + f" | {100 * statistics.mean(result['base_accuracy'].values()):.1f} |",
    ]
    for kind in KINDS:
        for size in [1, *s.sizes()]:
            cell = summary[kind][size]
            label = f"{kind} expert (own sub-task)" if size == 1 else f"{kind} merge of {size}"
            per = [mean_std([p["accuracy"][t] for p in cell["per_seed"] if p["accuracy"][t] is not None], percent=True) for t in tasks]
            mean = mean_std([p["mean_accuracy"] for p in cell["per_seed"]], percent=True)
            lines.append(f"| {label} | " + " | ".join(per) + f" | {mean} |")
    lines += [
        "",
        "### Mean normalized accuracy per seed (%)",
        "",
        "| kind | experts merged | " + " | ".join(f"seed {sd}" for sd in seeds) + " |",
        "|---|---|" + "---|" * len(seeds),
    ]
    for kind in KINDS:
        for size in s.sizes():
            vals = summary[kind][size]["per_seed"]
            lines.append(f"| {kind} | {size} | " + " | ".join("–" if p["mean_ratio"] is None else f"{100 * p['mean_ratio']:.1f}"
                                                              for p in vals) + " |")
    lines += [
        "",
        "### Experts",
        "",
        "| kind | lr | trainable parameters | final SFT loss (mean over seeds) | train s per expert (mean) |",
        "|---|---|---|---|---|",
    ]
    for kind in KINDS:
        es = [e for e in experts if e["kind"] == kind]
        lines.append(f"| {kind} | {s.lr(kind):g} | {es[0]['trainable_parameters']:,} | "
                     f"{statistics.mean(e['final_loss'] for e in es):.4f} | {statistics.mean(e['train_seconds'] for e in es):.1f} |")
    overlap = [d["mask_overlap"] for d in result["diagnostics"] if "mask_overlap" in d]
    if overlap:
        lines += ["", f"Sparse masks: on average {mean_std(overlap, percent=True)}% of one expert's entries are also trained by "
                  "another expert "
                  "(mean over ordered pairs of all the family's experts; mean ± std over seeds). Only outside these overlaps does "
                  "the sparse merge keep an expert's values unchanged."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=["arithmetic", "smollm2"], default="arithmetic",
                    help="arithmetic: the embedded model's sub-tasks; smollm2: SmolLM2-135M-Instruct on short chat tasks")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    for field in ("sft_steps", "lr_full", "lr_lora", "lr_sparse", "test_prompts", "subsets"):
        ap.add_argument(f"--{field.replace('_', '-')}", type=type(getattr(Settings(), field)), default=None,
                        help="default: the family's (experiments.family_experts.Settings; experiments.chat_family.EXPERT_SETTINGS)")
    ap.add_argument("--subtasks", nargs="+", default=None, help=f"default: all of the family's (arithmetic: {', '.join(SUBTASKS)}; "
                    f"smollm2: {', '.join(chat_family.LIBRARY_TASKS)})")
    ap.add_argument("--quick", action="store_true", help="5 SFT steps, 3 sub-tasks, 16 test prompts, one seed: checks the tables")
    ap.add_argument("--out", default=str(ROOT / "docs" / "experiments"))
    ap.add_argument("--runs", default=None, help="default: runs/experiment-merging[-smollm2] (where experiment_arrow_mbc "
                    "looks for its LoRA experts)")
    ap.add_argument("--report-only", action="store_true", help="write the report again from <out>/merging[-smollm2].json, training nothing")
    args = ap.parse_args()
    smollm2 = args.family == "smollm2"
    stem, out = "merging-smollm2" if smollm2 else "merging", Path(args.out)
    if args.report_only:
        result = json.loads((out / f"{stem}.json").read_text())
        s = Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in result["settings"].items()})
        summary = {kind: {int(k): v for k, v in sizes.items()} for kind, sizes in result["summary"].items()}
        result["claim"] = claim_statement(summary, s)
        plot(summary, s, out / f"{stem}.png")
        (out / f"{stem}.md").write_text(report({**result, "summary": summary}, s, result["command"], stem))
        (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
        return
    command = "python scripts/experiment_merging.py" + (" " + " ".join(sys.argv[1:]) if len(sys.argv) > 1 else "")
    d = Settings(**chat_family.EXPERT_SETTINGS) if smollm2 else Settings()
    chosen = {f: getattr(args, f) for f in ("sft_steps", "lr_full", "lr_lora", "lr_sparse", "test_prompts", "subsets")}
    s = replace(d, subtasks=tuple(args.subtasks or d.subtasks), **{f: v for f, v in chosen.items() if v is not None})
    if args.quick:
        args.seeds = args.seeds[:1]
        s = replace(s, sft_steps=4 if smollm2 else 5, subtasks=s.subtasks[:3], test_prompts=16, subsets=2)
    if s.sft_steps != d.sft_steps:  # a shorter run warms up for a tenth of it at most
        s = replace(s, warmup_steps=min(d.warmup_steps, max(1, s.sft_steps // 10)))
    # The tiny model runs on one thread (the machine may be shared); SmolLM2 needs every core.
    threads = (os.cpu_count() or 1) if smollm2 else 1
    torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t_start = time.time()
    runs = Path(args.runs or ROOT / "runs" / f"experiment-{stem}")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    if smollm2:
        from rl.tasks.pretrained import build_pretrained

        model_dir = build_pretrained("builtin:smollm2-135m-instruct")
        base_name, tokenizer = model_dir.parent.name, AutoTokenizer.from_pretrained(model_dir)
        family = chat_family.ChatFamily(tokenizer)
    else:
        model_dir = Path(build_tiny_model(TinyModelSpec())) / "model"
        base_name, tokenizer, family = model_dir.parent.name, AutoTokenizer.from_pretrained(model_dir), ARITHMETIC
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    base_state = {n: t.clone() for n, t in base.state_dict().items()}
    work = copy.deepcopy(base)  # every evaluated model is base_state + a delta, loaded into this one

    test_rows = {t: family.problems(t, min(s.test_prompts, family.split_size(t, "test")), 0, "test") for t in s.subtasks}
    base_acc = evaluate(work, base_state, {}, tokenizer, list(s.subtasks), test_rows, family)
    print(json.dumps({"base_accuracy": base_acc}), flush=True)
    subsets = choose_subsets(s)

    experts_info, merges, diagnostics = [], [], []
    for seed in args.seeds:
        for kind in KINDS:
            experts = {}
            for task in s.subtasks:
                experts[task], info = train_expert(kind, task, seed, s, base, tokenizer, runs, base_name, print, family)
                experts_info.append(info)
            k = KINDS[kind](tokenizer, s, family.loss)
            own = {}
            for task in s.subtasks:
                own[task] = evaluate(work, base_state, k.merge([experts[task]]), tokenizer, [task], test_rows, family)[task]
                merges.append({"kind": kind, "seed": seed, "size": 1, "subset": [task], "accuracy": {task: own[task]},
                               "ratio": {task: 1.0 if own[task] > 0 else None}})
            diagnostics.append({"kind": kind, "seed": seed, **k.diagnostics([experts[t] for t in s.subtasks])})
            print(json.dumps({"kind": kind, "seed": seed, "own_accuracy": own} | diagnostics[-1]), flush=True)
            for size, combos in subsets.items():
                for combo in combos:
                    acc = evaluate(work, base_state, k.merge([experts[t] for t in combo]), tokenizer, list(combo), test_rows, family)
                    ratio = {t: acc[t] / own[t] if own[t] > 0 else None for t in combo}
                    merges.append({"kind": kind, "seed": seed, "size": size, "subset": list(combo), "accuracy": acc, "ratio": ratio})
                print(json.dumps({"kind": kind, "seed": seed, "size": size,
                                  "mean_accuracy": statistics.mean(statistics.mean(m["accuracy"].values())
                                                                   for m in merges[-len(combos):])}), flush=True)

    summary = summarize(merges, s, args.seeds)
    result = {
        "command": command, "machine": describe_machine(),  # recorded with the results: a re-render states it
        "settings": asdict(s), "seeds": args.seeds, "base": base_name, "threads": threads,
        "subtasks": {t: {"description": family.subtasks[t], **{sp: family.split_size(t, sp) for sp in ("train", "test")}}
                     for t in s.subtasks},
        "test_prompts": {t: len(rows) for t, rows in test_rows.items()},
        "subsets": {str(k): [list(c) for c in v] for k, v in subsets.items()},
        "base_accuracy": base_acc, "experts": experts_info, "merges": merges, "diagnostics": diagnostics,
        "summary": {kind: {str(k): v for k, v in sizes.items()} for kind, sizes in summary.items()},
        "claim": claim_statement(summary, s), "seconds": round(time.time() - t_start, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    plot(summary, s, out / f"{stem}.png")
    text = report({**result, "summary": summary}, s, command, stem)
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    print(text)


if __name__ == "__main__":
    main()
