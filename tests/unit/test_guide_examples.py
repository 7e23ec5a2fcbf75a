"""The guide's example files (docs/guide/examples/) work with the code as it is, and every relative
link in README.md and docs/ points at something that exists.

- the example recipe loads with the project's recipe loader (field names cannot rot);
- the example reward function, resolved from the recipe as a run resolves it, scores a sample as
  documented (and its doctests pass);
- the example environment, resolved from the recipe by its import path as the episode driver
  resolves it, takes a step without engines, and drives a two-turn episode through the driver with
  a scripted stand-in for the rollout actors;
- the example data file renders into prompts the embedded model's tokenizer can read.

No engine, trainer or Ray is started.
"""

from __future__ import annotations

import doctest
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "docs" / "guide" / "examples"
RECIPE = "docs/guide/examples/recipe.yaml"


@pytest.fixture
def at_root(monkeypatch):
    """Recipe paths (data, reward file, environment file) are relative to where `rl` runs: the repository root."""
    monkeypatch.chdir(ROOT)


@pytest.fixture
def recipe(at_root):
    from rl.config import load_recipe

    return load_recipe(RECIPE)  # check_paths: the data file must exist too


def test_example_recipe_loads_with_its_own_files(recipe):
    assert recipe.model.path == "builtin:tiny-arithmetic"
    assert recipe.data.train == "docs/guide/examples/additions.jsonl"
    assert [r.fn for r in recipe.rewards.functions] == ["docs/guide/examples/answer_reward.py:close_answer"]
    assert recipe.accuracy_reward == "close_answer"
    assert recipe.environment.name == "docs/guide/examples/second_chance.py:SecondChance"
    assert recipe.rollouts_per_step == 16 * 8


def test_example_reward_scores_a_sample(recipe):
    from rewards import get_reward
    from rl.prepare import make_scorer

    fn = get_reward(recipe.rewards.functions[0].fn)
    completions = ["46", " 46\n7+1=8", "44", "4x", "99"]
    assert fn(["12+34="] * 5, completions, answer=["46"] * 5) == [1.0, 1.0, 0.32, 0.0, 0.0]
    # Through the scorer a run builds from the recipe: weighted total, per-reward key, no failures.
    result = make_scorer(recipe).score(["12+34="] * 5, completions, {"answer": ["46"] * 5, "prompt": ["12+34="] * 5})
    assert result.total == [1.0, 1.0, 0.32, 0.0, 0.0]
    assert result.per_reward["close_answer"] == [1.0, 1.0, 0.32, 0.0, 0.0]
    assert not any(result.failures.values())


@pytest.mark.parametrize("name", ["answer_reward.py", "second_chance.py"])
def test_example_doctests_pass(name):
    """The usage shown at the top of each example file is what the code does."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_guide_{Path(name).stem}", EXAMPLES / name)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    result = doctest.testmod(mod, verbose=False)
    assert result.attempted > 0 and result.failed == 0


def test_example_environment_takes_a_step(recipe):
    from rewards.environments import check_step, get_environment

    cls = get_environment(recipe.environment.name)  # as rl/episodes.py resolves it
    env = cls(**recipe.environment.options)
    env.reset({"prompt": "12+34=", "answer": "46"})
    first = env.step("44")
    assert check_step(first) is None
    assert (first.observation, first.done) == (" 12+34=", False)
    last = env.step("46")
    assert check_step(last) is None and last.done


def test_example_environment_drives_an_episode_without_engines(recipe):
    """Through the episode driver, with a stand-in for the rollout actors that answers 44, then 46."""
    from rl.episodes import EpisodeRunner
    from rl.tasks.tiny_model import build_tokenizer
    from rollout.types import Completion, SamplingSpec

    tok = build_tokenizer()

    class Scripted:
        def __init__(self):
            self.replies = iter(["44", "46"])

        def generate(self, prompts, sampling):
            text = next(self.replies)
            ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            return [[Completion(i, list(p), ids, text, [-0.5] * len(ids), "stop", policy_version=0) for _ in range(sampling.n)]
                    for i, p in enumerate(prompts)]

    runner = EpisodeRunner(recipe.environment, tok, recipe.rollout.max_model_len)
    [[episode]] = runner.run(Scripted(), [tok("12+34=")["input_ids"]], [{"prompt": "12+34=", "answer": "46"}],
                             SamplingSpec(n=1, max_new_tokens=recipe.rollout.max_new_tokens, seed=0))
    assert episode.failure == ""
    assert episode.num_turns == 2 and episode.text == "46"
    assert episode.observation_tokens == len(tok(" 12+34=", add_special_tokens=False)["input_ids"])
    assert episode.loss_mask.count(0) == episode.observation_tokens  # observations are out of the loss


def test_example_data_renders_into_prompts_the_model_reads(recipe):
    from rl.data import load_rows, render_prompt
    from rl.tasks.tiny_model import build_tokenizer

    tok = build_tokenizer()
    rows = load_rows(recipe.data.train)
    assert rows.num_rows >= 20 and set(rows.column_names) == {"prompt", "answer"}
    for row in rows:
        prompt = render_prompt(row, recipe.data, tok)
        assert tok.unk_token_id not in tok(prompt, add_special_tokens=False)["input_ids"], prompt
        a, b = row["prompt"].rstrip("=").split("+")
        assert int(a) + int(b) == int(row["answer"])


# ---------------------------------------------------------------------------- links

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~)")


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _links(path: Path) -> list[str]:
    """Link targets outside fenced code blocks and inline code."""
    out, fenced = [], False
    for line in path.read_text().splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            out += LINK.findall(re.sub(r"`[^`]*`", "", line))
    return out


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    anchors = set()
    fenced = False
    for line in path.read_text().splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
        if fenced or not line.startswith("#"):
            continue
        text = line.lstrip("#").strip().lower()
        slug = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def test_every_relative_link_in_readme_and_docs_resolves():
    broken = []
    for md in _markdown_files():
        for target in _links(md):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (md.parent / path).resolve() if path else md
            if not dest.exists():
                broken.append(f"{md.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{md.relative_to(ROOT)}: {target} (no such heading)")
    assert broken == []


ORGANISATION = re.compile(r"\.\./shared|this workspace|\bissue \d+|\bgoal\b|work period|previous session|this session"
                          r"|an earlier version|not run here|earlier build|(?<!stops )the run before", re.IGNORECASE)


def test_readme_docs_and_recipe_comments_speak_about_the_software():
    """No page or recipe comment refers to how the work was organised, or to paths a user does not have."""
    found = []
    for md in _markdown_files():
        for i, line in enumerate(md.read_text().splitlines(), 1):
            if ORGANISATION.search(line):
                found.append(f"{md.relative_to(ROOT)}:{i}: {line.strip()}")
    for recipe in [*sorted((ROOT / "recipes").glob("*.yaml")), EXAMPLES / "recipe.yaml"]:
        for i, line in enumerate(recipe.read_text().splitlines(), 1):
            comment = line.partition("#")[2] if "#" in line else ""
            if ORGANISATION.search(comment) or "../shared" in line:  # values too: a path only this workspace has
                found.append(f"{recipe.relative_to(ROOT)}:{i}: {line.strip()}")
    assert found == []
