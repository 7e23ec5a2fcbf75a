"""Weight sync per transport, side by side, on two simulated Ray nodes (``rl.local_cluster``; root).

    .venv/bin/python scripts/bench_transports.py [--steps 5]

Brings up a head node (2 CPUs) and a worker node (1 CPU), each with its own IP and /dev/shm, and
submits the same short GRPO run (``rl submit``) six ways: trainer and engine on the head with
``shared_file``, ``object_store``, ``collective`` and ``ipc``, and the engine on the worker node with
``auto`` (which picks ``object_store``) and ``collective``. Two models: the embedded 1.05M-parameter one (4.2 MB per sync) and the
51.7M Llama of ``bench_step.py`` (207 MB). Reports the median weight-sync seconds per step (trainer
publish + every engine loading it in place) and bytes; writes docs/benchmarks/transports.{md,json}.

    --layouts ipc shared_file   # only the layouts whose label contains one of these; the other rows are kept
    --report-only               # write the page again from the JSON
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.bench_step import PROMPT_TOKENS, REWARD_FILE, build_model, write_prompts  # noqa: E402

BOTH_ON_HEAD = ["trainer.resources={head: 0.5}", "rollout.resources={head: 0.5}"]  # the head node has one unit of `head`
LAYOUTS = [
    ("one node, shared_file", [*BOTH_ON_HEAD, "cluster.weight_transport=shared_file"]),
    ("one node, object_store", [*BOTH_ON_HEAD, "cluster.weight_transport=object_store"]),
    ("one node, collective", [*BOTH_ON_HEAD, "cluster.weight_transport=collective"]),
    ("one node, ipc", [*BOTH_ON_HEAD, "cluster.weight_transport=ipc"]),
    ("engine on the other node, auto (object_store)", ["trainer.resources={head: 1}", "rollout.resources={worker: 1}"]),
    ("engine on the other node, collective", ["trainer.resources={head: 1}", "rollout.resources={worker: 1}",
                                              "cluster.weight_transport=collective"]),
]


def model_overrides(which: str) -> list[str]:
    if which == "embedded":
        from rl.prepare import resolve_builtins
        from rl.config import load_recipe

        paths = resolve_builtins(load_recipe(str(ROOT / "recipes" / "quickstart.yaml")))
        return [f"model.path={paths.model}", f"data.train={paths.train}", f"data.test={paths.test}",
                "rollout.max_new_tokens=6", "rollout.max_model_len=64"]
    model = build_model()
    return [f"model.path={model}", f"data.train={write_prompts('synthetic', 256)}", "data.test_fraction=0.05", "data.chat_template=never",
            "rollout.max_new_tokens=8", f"rollout.max_model_len={PROMPT_TOKENS + 16}",
            f"rewards.functions=[{{fn: '{REWARD_FILE}:pseudo_random'}}]"]


def run(cluster, overrides: list[str], out: Path) -> dict:
    from rl.local_cluster import cluster_env

    cmd = [*cluster.exec_prefix("head"), "env", *(f"{k}={v}" for k, v in cluster_env().items()), sys.executable, "-m", "rl.cli",
           "submit", "recipes/quickstart.yaml", *overrides, f"output_dir={out}", "--address", cluster.jobs_address,
           "--python", sys.executable]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if "SUCCEEDED" not in proc.stdout:
        raise RuntimeError(proc.stdout[-3000:] + proc.stderr[-3000:])
    rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"][1:]
    summary = json.loads((out / "summary.json").read_text())
    return {"sync_s": statistics.median(r["time_weight_sync"] for r in rows), "bytes": rows[0]["weight_sync_bytes"],
            "step_s": statistics.median(r["time_step"] for r in rows), "transport": summary.get("weight_transport"),
            "nodes": summary.get("nodes")}


def reading(results: list[dict]) -> list[str]:
    """What the table says, from its numbers (the 51.7M model: the embedded one syncs in tens of milliseconds)."""
    sync = {r["layout"]: r["sync_s"] for r in results if r["model"] == "llama-51m"}
    lines = ["Reading (the 51.7M model):"]
    one_node = {k: v for k, v in sync.items() if k.startswith("one node")}
    if one_node:
        best = min(one_node, key=one_node.get)
        lines.append(f"- On one node `{best.removeprefix('one node, ')}` is the fastest ({one_node[best]:.2f} s per sync).")
    if "one node, ipc" in sync and "one node, shared_file" in sync:
        ipc, file = sync["one node, ipc"], sync["one node, shared_file"]
        lines.append(f"- `ipc` took {ipc / file:.2f}x the time of `shared_file` on this CPU ({ipc:.2f} vs {file:.2f} s per "
                     "sync): the engine maps the trainer's packed buckets instead of reading a safetensors file, and "
                     f"{'that is faster here' if ipc < file else 'that is not faster here'}; `auto` picks `shared_file` on "
                     "one node (it also falls back to disk when /dev/shm is small). `ipc` is meant for a GPU, where it "
                     "keeps the weights on the device (not measured here).")
    far = {k.removeprefix("engine on the other node, "): v for k, v in sync.items() if k.startswith("engine on the other")}
    if len(far) == 2:
        coll, store = far["collective"], far["auto (object_store)"]
        lines.append(f"- Across nodes `collective` took {coll / store:.2f}x the time of `object_store` ({coll:.2f} vs "
                     f"{store:.2f} s: no copy into a store and out again, and the engine loads the tensors as they "
                     "arrive), but an engine that dies cannot rejoin its group, while `object_store` lets a restarted "
                     "engine fetch the current version: `auto` picks `object_store`; set "
                     "`cluster.weight_transport=collective` for speed.")
    return lines


def page(results: list[dict], steps: int) -> str:
    from rl.metrics import recorded_machine_of_rows

    lines = ["# Weight sync per transport, two simulated nodes", "",
             f"Command: `.venv/bin/python scripts/bench_transports.py --steps {steps}` (`--layouts ...` re-measures some rows "
             "and keeps the rest; each row has its date)", "",
             f"Machine: {recorded_machine_of_rows(results)}. Two Ray nodes on this machine "
             "(`rl.local_cluster`: a network namespace with its own IP and a private /dev/shm each; the veth between "
             "them is memory, not a network, so cross-node times here are a lower bound of a real link). Sync = trainer "
             "rank 0 publishing + the engine loading in place, median over the steps after the first; fp32 weights. "
             "Rows measured on one date ran side by side in one run; compare across dates with care (this machine's "
             "speed varies by 10-30% over hours).", "",
             "| model | layout | transport | bytes per sync | sync s | step s | measured |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['layout']} | {r['transport']} | {r['bytes'] / 1e6:.1f} MB | {r['sync_s']:.3f} | "
              f"{r['step_s']:.2f} | {r['date']} |" for r in results]
    return "\n".join([*lines, "", *reading(results)]) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--layouts", nargs="+", help="only the layouts whose label contains one of these (the other rows are kept)")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    from rl.local_cluster import LocalCluster
    from rl.metrics import describe_machine, rows_measured_on

    out = ROOT / "docs" / "benchmarks" / "transports"
    kept = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else []
    if args.report_only:
        out.with_suffix(".md").write_text(page(kept, args.steps))
        return
    machine = describe_machine()
    kept = rows_measured_on(kept, machine)
    layouts = [(label, lo) for label, lo in LAYOUTS if not args.layouts or any(k in label for k in args.layouts)]
    common = [f"steps={args.steps}", "data.prompts_per_step=4", "algorithm.group_size=2", "trainer.micro_batch_size=8",
              "eval.before=false", "eval.after=false", "checkpoint.save_final=false", "logging.progress=false",
              "logging.tensorboard=false", "trainer.num_cpus_per_rank=1", "rollout.num_cpus_per_actor=1"]
    models = {"embedded": model_overrides("embedded"), "llama-51m": model_overrides("llama-51m")}
    cluster = LocalCluster.load("rlbench")
    cluster.down()
    cluster.up(head_cpus=2, worker_cpus=1)
    results = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for model, mo in models.items():
                for label, lo in layouts:
                    r = run(cluster, [*common, *mo, *lo], Path(tmp) / f"{model}-{len(results)}")
                    results.append({"model": model, "layout": label, **r, "date": time.strftime("%Y-%m-%d"), "machine": machine})
                    print(results[-1], flush=True)
    finally:
        cluster.down()
    new = {(r["model"], r["layout"]): r for r in results}
    order = [(m, label) for m in models for label, _ in LAYOUTS]
    merged = {**{(r["model"], r["layout"]): r for r in kept}, **new}
    results = [merged[k] for k in order if k in merged]
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text(page(results, args.steps))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
