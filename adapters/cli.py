"""``rl library ...``: manage an adapter library from the command line.

    rl library add NAME ADAPTER_DIR --root LIB --base-model MODEL_DIR [--task T --data D --steps N ...] [--create]
    rl library list --root LIB [--json]
    rl library show NAME --root LIB [--base-model MODEL_DIR]     verify hashes (and compatibility)
    rl library remove NAME --root LIB
    rl library merge NEW NAME NAME ... --root LIB [--weights 0.5,0.5] [--rank R]
    rl library export NAME DEST --root LIB
    rl library cluster -k K --root LIB [NAME ...] [--quantile 0.8 --svd-dims 64 --seed S --mode params|delta]
                       [--write-data DIR [--data-map MAP.json] [--recipe R]]   MBC, and its per-cluster data

``--root`` defaults to ``$RL_ADAPTER_LIBRARY``. ``register(subparsers)`` adds the ``library`` command
to a parent argparse parser; each handler returns an exit code (2 on a LibraryError, message on stderr).
``python -m adapters.cli library ...`` runs it standalone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from adapters.library import AdapterLibrary, LibraryError, file_sha256


def _library(args, create: bool = False) -> AdapterLibrary:
    root = args.root or os.environ.get("RL_ADAPTER_LIBRARY")
    if not root:
        raise LibraryError("no library given: pass --root DIR or set RL_ADAPTER_LIBRARY")
    return AdapterLibrary(root, create=create or getattr(args, "create", False))


def _csv(text: str | None) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()] if text else []


def _json_arg(text: str, what: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise LibraryError(f"{what} is not valid JSON: {e}") from None


def _cmd_add(args) -> int:
    lib = _library(args)
    meta = {}
    if args.meta:
        meta = _json_arg(Path(args.meta).read_text(), f"--meta file {args.meta}")
        if not isinstance(meta, dict):
            raise LibraryError(f"--meta file {args.meta} must hold a JSON object")
    for key, value in (("base_model", args.base_model), ("base_model_hash", args.base_model_hash), ("task", args.task),
                       ("data", args.data), ("steps", args.steps)):
        if value is not None:
            meta[key] = value
    if args.recipe:
        p = Path(args.recipe)
        meta["recipe"] = {"path": str(p.resolve()), "sha256": file_sha256(p)} if p.is_file() else args.recipe
    if args.parents:
        meta["parents"] = _csv(args.parents)
    if args.metrics:
        meta["metrics"] = _json_arg(args.metrics, "--metrics")
    expert = lib.add(args.name, args.adapter_dir, meta)
    print(f"added {expert.name} ({expert.adapter_type}, rank {expert.rank}) to {lib.root}")
    return 0


def _cmd_list(args) -> int:
    experts = _library(args).list()
    if args.json:
        print(json.dumps([e.meta for e in experts], indent=2))
        return 0
    if not experts:
        print("(empty library)")
        return 0
    rows = [("name", "type", "rank", "modules", "steps", "task", "created")]
    for e in experts:
        rows.append((e.name, e.adapter_type, str(e.rank if e.rank is not None else "-"), ",".join(e.target_modules),
                     str(e.meta.get("steps") if e.meta.get("steps") is not None else "-"), str(e.meta.get("task") or "-"),
                     e.meta.get("created", "-")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def _cmd_show(args) -> int:
    lib = _library(args)
    expert = lib.get(args.name, verify=not args.no_verify)
    if args.base_model:
        lib.check_compatible(args.name, args.base_model)
    print(json.dumps(expert.meta, indent=2, sort_keys=True))
    checks = ["hashes verified"] if not args.no_verify else []
    if args.base_model:
        checks.append(f"compatible with {args.base_model}")
    if checks:
        print("# " + "; ".join(checks), file=sys.stderr)
    return 0


def _cmd_remove(args) -> int:
    lib = _library(args)
    lib.remove(args.name)
    print(f"removed {args.name} from {lib.root}")
    return 0


def _cmd_merge(args) -> int:
    lib = _library(args)
    weights = [float(w) for w in _csv(args.weights)] if args.weights else None
    meta = {"task": args.task} if args.task else None
    expert = lib.merge(args.names, args.new_name, weights=weights, rank=args.rank, meta=meta)
    err = expert.meta.get("metrics", {}).get("refactor_rel_error")
    extra = f", re-factoring relative error {err:.3g}" if err is not None else ""
    print(f"merged {', '.join(args.names)} into {expert.name} ({expert.adapter_type}{extra})")
    return 0


def _cmd_export(args) -> int:
    dest = _library(args).export(args.name, args.dest)
    print(f"exported {args.name} to {dest}")
    return 0


def _cmd_cluster(args) -> int:
    """MBC (adapters.cluster): print the clusters; with --write-data also write each cluster's union of
    training data and print the ``rl train`` line that trains its LoRA into the library."""
    import shlex

    from adapters.cluster import cluster_experts, write_cluster_data
    from adapters.library import validate_name

    lib = _library(args)
    names = args.names or [e.name for e in lib.list() if e.adapter_type == "lora"]
    if not names:
        raise LibraryError(f"no LoRA experts to cluster in {lib.root}")
    if len(set(names)) != len(names):
        raise LibraryError(f"an expert is named twice in {names}")
    if not 1 <= args.k <= len(names):
        raise LibraryError(f"-k {args.k}: need 1 <= k <= the number of experts ({len(names)}: {', '.join(sorted(names))})")
    if args.data_map and not args.write_data:
        raise LibraryError("--data-map is only read with --write-data DIR")
    experts = {n: lib.get(n, verify=False) for n in names}
    states = {n: lib.load_lora_state(n) for n in names}  # verified
    scales = {n: e.scaling for n, e in experts.items()}  # delta mode: s·BA
    try:
        found = cluster_experts(states, args.k, quantile=args.quantile, svd_dims=args.svd_dims, seed=args.seed,
                                mode=args.mode, kmeans_input=args.kmeans_input, scales=scales)
    except ValueError as e:
        raise LibraryError(str(e)) from None
    clusters = {validate_name(f"{args.prefix}{c}"): members for c, members in sorted(found.items())}
    report = {c: {"experts": m} for c, m in clusters.items()}
    if args.write_data:
        taken = [c for c in clusters if c in lib]
        if taken:
            raise LibraryError(f"expert(s) {taken} already exist in {lib.root}: the cluster LoRAs need free names (--prefix)")
        data = {n: e.meta.get("data") for n, e in experts.items()}  # what `rl train ... adapter.save_as` recorded
        if args.data_map:
            mapping = _json_arg(Path(args.data_map).read_text(), f"--data-map file {args.data_map}")
            if not isinstance(mapping, dict):
                raise LibraryError(f"--data-map file {args.data_map} must hold a JSON object {{expert: data file(s)}}")
            unknown = sorted(n for n in mapping if n not in lib)
            if unknown:
                raise LibraryError(f"--data-map names experts not in {lib.root}: {unknown}")
            data.update({n: v for n, v in mapping.items() if n in data})
        try:
            manifest = write_cluster_data(clusters, data, args.write_data)
        except ValueError as e:
            raise LibraryError(str(e)) from None
        for c, entry in manifest.items():
            cmd = ["rl", "train", args.recipe, f"data.train={entry['path']}", "adapter.kind=lora", "adapter.source=new",
                   f"adapter.library={lib.root}", f"adapter.save_as={c}"]
            report[c].update(data=entry["path"], rows=entry["rows"], train=shlex.join(cmd))
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return 0
    for c, r in report.items():
        print(f"{c}: {', '.join(r['experts'])}" + (f"  ({r['rows']} rows in {r['data']})" if "data" in r else ""))
    if args.write_data:
        print(f"# train one LoRA per cluster (manifest: {Path(args.write_data) / 'clusters.json'}):")
        for r in report.values():
            print(r["train"])
    return 0


def _guard(fn):
    def run(args) -> int:
        try:
            return fn(args)
        except LibraryError as e:
            print(f"rl library: error: {e}", file=sys.stderr)
            return 2

    return run


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``library`` and its subcommands to an ``argparse`` subparsers object; handlers set ``fn``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", help="the library directory (default: $RL_ADAPTER_LIBRARY)")
    lib = subparsers.add_parser("library", help="manage an adapter library (LoRA / sparse experts)")
    sub = lib.add_subparsers(dest="library_command", required=True)

    p = sub.add_parser("add", parents=[common], help="add an adapter directory (PEFT LoRA or sparse)")
    p.add_argument("name")
    p.add_argument("adapter_dir")
    p.add_argument("--create", action="store_true", help="create the library directory if missing")
    p.add_argument("--base-model", help="the base model directory it was trained on (hashed)")
    p.add_argument("--base-model-hash", help="the base model's hash, when its directory is not at hand")
    p.add_argument("--task")
    p.add_argument("--data")
    p.add_argument("--recipe", help="a recipe file (path + sha256 recorded) or a description")
    p.add_argument("--steps", type=int)
    p.add_argument("--parents", help="comma-separated expert names")
    p.add_argument("--metrics", help="a JSON object, e.g. '{\"accuracy\": 0.9}'")
    p.add_argument("--meta", help="a JSON file with more meta fields (flags override it)")
    p.set_defaults(fn=_guard(_cmd_add))

    p = sub.add_parser("list", parents=[common], help="list experts")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_guard(_cmd_list))

    p = sub.add_parser("show", parents=[common], help="print an expert's meta after verifying its files")
    p.add_argument("name")
    p.add_argument("--base-model", help="also check it was trained on this base model directory")
    p.add_argument("--no-verify", action="store_true", help="skip the content-hash check")
    p.set_defaults(fn=_guard(_cmd_show))

    p = sub.add_parser("remove", parents=[common], help="delete an expert")
    p.add_argument("name")
    p.set_defaults(fn=_guard(_cmd_remove))

    p = sub.add_parser("merge", parents=[common], help="merge experts into a new one")
    p.add_argument("new_name")
    p.add_argument("names", nargs="+")
    p.add_argument("--weights", help="comma-separated, used as given (LoRA only; default uniform 1/E)")
    p.add_argument("--rank", type=int, help="rank of the merged LoRA (default: the experts' rank)")
    p.add_argument("--task", help="task description for the merged expert")
    p.set_defaults(fn=_guard(_cmd_merge))

    p = sub.add_parser("export", parents=[common], help="copy an expert to a new directory")
    p.add_argument("name")
    p.add_argument("dest")
    p.set_defaults(fn=_guard(_cmd_export))

    _add_cluster(sub, common)
    return lib


def _add_cluster(sub, common) -> None:
    p = sub.add_parser("cluster", parents=[common], help="group LoRA experts by model-based clustering (MBC)",
                       description="MBC (arXiv:2405.11157): flatten each expert, zero entries below the --quantile of |x|, "
                       "TruncatedSVD to --svd-dims, k-means on the unit vectors (cosine). --write-data also writes each "
                       "cluster's union of training data and prints the `rl train` line for its LoRA.")
    p.add_argument("names", nargs="*", help="experts to cluster (default: all LoRA experts)")
    p.add_argument("-k", type=int, required=True, help="number of clusters (at most the number of experts)")
    p.add_argument("--quantile", type=float, default=0.8,
                   help="per expert, zero entries with |x| below this quantile (0.8: keep the top 20%%; 0: keep all)")
    p.add_argument("--svd-dims", type=int, default=64, help="TruncatedSVD dimensions (capped at the number of experts)")
    p.add_argument("--seed", type=int, default=0, help="random_state of the SVD and of k-means")
    p.add_argument("--mode", choices=("params", "delta"), default="params",
                   help="vectorize the A/B factors (paper) or the deltas s·BA (factorization-invariant; dense, small models)")
    p.add_argument("--kmeans-input", choices=("similarity", "unit"), default="similarity",
                   help="k-means on the rows of the experts' cosine-similarity matrix (mttl), or on their unit vectors")
    p.add_argument("--prefix", default="cluster-", help="cluster names: PREFIX0, PREFIX1, ... (also the trained LoRAs' names)")
    p.add_argument("--write-data", metavar="DIR", help="write DIR/<cluster>.jsonl, the union of its experts' training data "
                   "(meta 'data': a .jsonl file or a directory of them), and print an `rl train` line per cluster")
    p.add_argument("--data-map", metavar="FILE", help="a JSON object {expert: data file or list of files}, overriding meta 'data'")
    p.add_argument("--recipe", default="RECIPE", help="the recipe named in the printed `rl train` lines")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_guard(_cmd_cluster))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rl")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
