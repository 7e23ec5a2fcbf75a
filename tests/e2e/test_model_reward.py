"""RLHF through the real stack: recipes/rlhf-hh-tiny.yaml at tiny sizes (2 GRPO steps of 4 prompts x
4 completions), the policy on a vLLM actor, a DeepSpeed trainer actor, and ``builtin:tiny-hh-rm``
served by its own Ray actor (``rl.workers.RewardModelGroup``). The builtins are built once into
.cache/test-models (RL_CACHE_DIR), about 1.5 minutes on one core.

Every call the scorer makes to the reward model is recorded on the driver's side of the actor, so
the tests can check that the actor scored every sampled completion, and scored it as the same
model in this process does.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
HH = ROOT / ".." / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
RM = "builtin:tiny-hh-rm"
B, G, STEPS, HELD_OUT = 4, 4, 2, 8


@pytest.fixture(scope="module")
def rlhf_run(ray_session, tmp_path_factory):
    if not HH.exists():
        pytest.skip(f"HH data not found at {HH}")
    from rl.config import load_recipe
    from rl.online import OnlineRun
    from rl.workers import RewardModelGroup

    calls: list[dict] = []
    score = RewardModelGroup.score

    def recorded(self, prompts, completions):
        out = score(self, prompts, completions)
        calls.append({"remote": self.remote, "prompts": list(prompts), "completions": list(completions), "scores": list(out)})
        return out

    run_dir = tmp_path_factory.mktemp("rlhf") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RL_CACHE_DIR", str(ROOT / ".cache" / "test-models"))
        mp.setattr(RewardModelGroup, "score", recorded)
        recipe = load_recipe(ROOT / "recipes" / "rlhf-hh-tiny.yaml", [
            f"data.train={HH}", f"steps={STEPS}", f"data.prompts_per_step={B}", f"algorithm.group_size={G}",
            f"data.max_test_examples={HELD_OUT}", "eval.every=0", "eval.samples=2", "trainer.micro_batch_size=16",
            "logging.progress=false", "logging.tensorboard=false", f"output_dir={run_dir}",
        ])
        run = OnlineRun(recipe)
        summary = run.fit()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return run, summary, rows, calls


def test_run_finishes_with_kl_to_the_reference(rlhf_run):
    run, s, rows, _ = rlhf_run
    assert s["status"] == "finished" and s["steps"] == STEPS
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert all(r["rollouts"] == B * G for r in train)
    assert run.recipe.algorithm.kl_coef > 0 and all(math.isfinite(r["kl"]) and r["kl"] >= 0 for r in train)  # k3 >= 0


def test_the_reward_model_actor_scored_every_sample(rlhf_run):
    run, s, rows, calls = rlhf_run
    train = [r for r in rows if r["kind"] == "train"]
    for r in train:
        assert math.isfinite(r[f"reward/{RM}"]) and math.isfinite(r["reward_mean"])
        assert all(r[f"reward_failures_{k}"] == 0 for k in ("exception", "nan", "timeout", "wrong_length", "wrong_type")), r
    assert sum(run.scorer.total_failures.values()) == 0 and s["reward_failures"] == run.scorer.total_failures
    assert calls and all(c["remote"] for c in calls)  # served by a Ray actor, not in this process
    held_out = len(run.test_set)
    # Evaluation before (greedy, then 2 samples per prompt), each step's batch (one call each: no failure, so no
    # per-sample retries), evaluation after.
    assert [len(c["completions"]) for c in calls] == [held_out, 2 * held_out] + [B * G] * STEPS + [held_out, 2 * held_out]
    assert all(math.isfinite(x) for c in calls for x in c["scores"])


def test_actor_scores_match_the_model_in_process(rlhf_run):
    from rewards import ModelReward, RewardModel

    run, _, _, calls = rlhf_run
    reward = run.scorer.fns[RM]
    assert isinstance(reward, ModelReward) and reward.server is None  # stopped with the other workers
    local = RewardModel(reward.spec)
    for c in calls[2:4]:  # the first two training batches
        assert local.score(c["prompts"], c["completions"]) == pytest.approx(c["scores"], abs=1e-5)
    # The texts scored are the prompts as the policy saw them (the HH dialogue up to "Assistant:").
    assert all(p.endswith("\n\nAssistant:") for p in calls[2]["prompts"])


def test_evaluation_reports_the_reward_model_mean(rlhf_run):
    _, s, rows, calls = rlhf_run
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, STEPS]
    mean = lambda c: sum(c["scores"]) / len(c["scores"])  # noqa: E731
    for r, greedy, sampled in zip(evals, (calls[0], calls[-2]), (calls[1], calls[-1])):
        assert r["reward_mean"] == pytest.approx(mean(greedy), abs=1e-6)
        assert r["reward_mean@2"] == pytest.approx(mean(sampled), abs=1e-6)  # the policy's own samples' score
        assert r[f"reward/{RM}"] == pytest.approx(r["reward_mean"])  # the only reward, weight 1
        # accuracy is the share of greedy replies the reward model scores >= 0.5 (not meaningful for a reward model)
        assert r["accuracy"] == pytest.approx(sum(x >= 0.5 for x in greedy["scores"]) / len(greedy["scores"]))
    assert s["reward_mean_before"] == evals[0]["reward_mean"] and s["reward_mean_after"] == evals[1]["reward_mean"]
    assert s["reward_mean@2_before"] == evals[0]["reward_mean@2"] and s["reward_mean@2_after"] == evals[1]["reward_mean@2"]
