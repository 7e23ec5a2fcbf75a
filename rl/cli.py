"""``rl`` command line.

    rl train RECIPE.yaml [dotted.key=value ...]   run a recipe (GRPO, 2-GRPO, online or offline DPO)
    rl config RECIPE.yaml [dotted.key=value ...]  print the fully resolved recipe and derived sizes
    rl eval RECIPE.yaml [overrides] [--k K] [--checkpoint CKPT]   evaluate the recipe's policy (or a run's checkpoint)
    rl submit RECIPE.yaml [overrides] --address URL   run a recipe as a Ray Job on a cluster
    rl status|logs|stop JOB --address URL         follow or stop a submitted job
    rl runs [DIR ...]                             list runs: status (running/finished/failed/interrupted/died), steps, accuracy
    rl plot RUN_DIR [RUN_DIR ...] [--out F]       overlay the curves of several runs in one PNG
    rl library add|list|show|remove|merge|export|cluster   the adapter library (see adapters/)
"""

from __future__ import annotations

import argparse
import logging
import sys

from rl.config import RecipeError, load_recipe, recipe_to_yaml


def _cmd_config(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides, check_paths=False)
    print(recipe_to_yaml(recipe), end="")
    if not recipe.algorithm.spec.online:  # offline: no rollouts
        print(f"# derived: preference pairs per step = data.prompts_per_step = {recipe.data.prompts_per_step}")
    else:
        print(f"# derived: rollouts_per_step = {recipe.data.prompts_per_step} x {recipe.algorithm.group_size} = {recipe.rollouts_per_step}")
    return 0


def _cmd_train(args) -> int:
    recipe = load_recipe(args.recipe, [*args.overrides, *(["logging.verbose=true"] if args.verbose else [])])
    if not recipe.algorithm.spec.online:
        from rl.dpo import OfflineDPORun as RunClass
    else:
        from rl.online import OnlineRun as RunClass
    RunClass(recipe).fit()
    return 0


def _cmd_eval(args) -> int:
    from rl.evaluate import run_eval

    run_eval(load_recipe(args.recipe, args.overrides), k=args.k, temperature=args.temperature, out_path=args.out,
             checkpoint=args.checkpoint)
    return 0


def _cmd_submit(args) -> int:
    from rl.submit import submit

    _, status = submit(args.recipe, args.overrides, args.address, wait=not args.no_wait, python=args.python)
    return 0 if status in ("SUCCEEDED", "PENDING", "RUNNING") else 1


def _cmd_job(args) -> int:
    from rl import submit as jobs

    if args.command == "status":
        print(jobs.job_status(args.address, args.job_id))
    elif args.command == "logs":
        print(jobs.job_logs(args.address, args.job_id), end="")
    else:
        print(f"[rl] job {args.job_id}: {jobs.stop_job(args.address, args.job_id)}")
    return 0


def _cmd_runs(args) -> int:
    from rl.runs import print_runs

    print_runs(args.roots or None)
    return 0


def _cmd_plot(args) -> int:
    from rl.plot import plot_runs

    print(plot_runs(args.run_dirs, args.out, x=args.x))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Every `rl` subcommand, each with the function that runs it (``args.fn``)."""
    parser = argparse.ArgumentParser(prog="rl", description="RL post-training: vLLM rollout actors + DeepSpeed trainer on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, help_ in (
        ("train", _cmd_train, "run a recipe"),
        ("config", _cmd_config, "print the resolved recipe"),
        ("eval", _cmd_eval, "evaluate the recipe's policy (or a run's checkpoint) on its held-out set"),
        ("submit", _cmd_submit, "run a recipe as a Ray Job on a cluster"),
    ):
        p = sub.add_parser(name, help=help_)
        p.add_argument("recipe", help="a recipe YAML (see recipes/)")
        p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. trainer.lr=1e-4")
        p.set_defaults(fn=fn)
    sub.choices["train"].add_argument("-v", "--verbose", action="store_true",
                                      help="show the engines', trainer ranks' and Ray's logs here (logging.verbose=true)")
    sub.choices["eval"].add_argument("--k", type=int, default=1, help="samples per prompt: 1 = greedy accuracy, >1 = mean@k and pass@k")
    sub.choices["eval"].add_argument("--temperature", type=float, default=None, help="default: 0 for k=1, else rollout.temperature")
    sub.choices["eval"].add_argument("--out", default=None, help="also write the result as JSON here")
    sub.choices["eval"].add_argument("--checkpoint", default=None,
                                     help="a checkpoint (or a run directory: its newest) of a run of this recipe: evaluate that policy")
    sub.choices["submit"].add_argument("--address", default="http://127.0.0.1:8265", help="the cluster's Ray Jobs address")
    sub.choices["submit"].add_argument("--no-wait", action="store_true", help="return once submitted")
    sub.choices["submit"].add_argument("--python", default="python", help="the cluster's interpreter with the dependencies")
    for name, help_ in (("status", "a submitted job's status"), ("logs", "a submitted job's logs so far"),
                        ("stop", "stop a submitted job (its run writes a checkpoint first)")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("job_id", help="the id `rl submit` printed (raysubmit_...)")
        p.add_argument("--address", default="http://127.0.0.1:8265", help="the cluster's Ray Jobs address")
        p.set_defaults(fn=_cmd_job)
    p = sub.add_parser("runs", help="list run directories: name, status, steps, accuracy before/after")
    p.add_argument("roots", nargs="*", help="directories holding runs (default: runs/)")
    p.set_defaults(fn=_cmd_runs)
    p = sub.add_parser("plot", help="overlay the curves of several runs in one PNG")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out", default="plot.png")
    p.add_argument("--x", choices=["step", "rollouts"], default="step", help="x axis: step, or cumulative rollouts")
    p.set_defaults(fn=_cmd_plot)
    from adapters.cli import register as register_library

    register_library(sub)  # rl library add|list|show|remove|merge|export|cluster
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; a known failure ends with one clear line and its own exit code (2: the recipe, 3:
    training diverged, 4: a worker stalled, 5: placement or the cluster's address)."""
    args = build_parser().parse_args(argv)
    # Other libraries' INFO lines stay off the terminal; the framework's own loggers keep theirs.
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s")
    for name in ("rl", "rewards", "adapters"):
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        return args.fn(args)
    except RecipeError as e:
        print(f"rl: error in recipe:\n{e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a clear last line for known failure kinds
        from rl.online import TrainingDiverged
        from rl.placement import PlacementError
        from rl.submit import JobsUnreachable
        from rl.watchdog import WorkerStalled

        if isinstance(e, (PlacementError, JobsUnreachable)):
            print(f"rl: {e}", file=sys.stderr)
            return 5

        if isinstance(e, TrainingDiverged):
            print(f"rl: training stopped: {e}", file=sys.stderr)
            return 3
        if isinstance(e, WorkerStalled):
            print(f"rl: run stopped: {e}", file=sys.stderr)
            return 4
        raise


if __name__ == "__main__":
    sys.exit(main())
