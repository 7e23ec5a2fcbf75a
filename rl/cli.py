"""``rl`` command line.

    rl train RECIPE.yaml [dotted.key=value ...]   run a recipe
    rl config RECIPE.yaml [dotted.key=value ...]  print the fully resolved recipe and derived sizes
"""

from __future__ import annotations

import argparse
import logging
import sys

from rl.config import RecipeError, load_recipe, recipe_to_yaml


def _cmd_config(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides, check_paths=False)
    print(recipe_to_yaml(recipe), end="")
    print(f"# derived: rollouts_per_step = {recipe.data.prompts_per_step} x {recipe.algorithm.group_size} = {recipe.rollouts_per_step}")
    return 0


def _cmd_train(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    from rl.driver import Trainer

    Trainer(recipe).fit()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rl", description="RL post-training: vLLM rollout actors + DeepSpeed trainer on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, help_ in (
        ("train", _cmd_train, "run a recipe"),
        ("config", _cmd_config, "print the resolved recipe"),
    ):
        p = sub.add_parser(name, help=help_)
        p.add_argument("recipe", help="a recipe YAML (see recipes/)")
        p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. trainer.lr=1e-4")
        p.set_defaults(fn=fn)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    try:
        return args.fn(args)
    except RecipeError as e:
        print(f"rl: error in recipe:\n{e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
