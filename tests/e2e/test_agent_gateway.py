"""Agents through the OpenAI-compatible gateway on the real stack (the official ``openai`` client, Ray actors,
a vLLM engine, a DeepSpeed engine): an episode's tokens are exactly those the engine sampled from (vLLM's own
scoring and the trainer agree with the sampler on every reply token), what the agent added is masked out,
and an agent that raises, hangs or sends a bad request costs only its episode, counted."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from rl.config import load_recipe

pytestmark = pytest.mark.e2e

PLUGIN = Path(__file__).parent / "plugins" / "agents.py"
LOGPROB_TOL = 1e-4  # float32 in vLLM and the trainer; the multi-turn test measures ~1e-6


def _plugin():
    spec = importlib.util.spec_from_file_location("agents_plugin", PLUGIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_agent_episodes_are_the_engines_tokens_and_failures_cost_only_their_episode(tiny_model_root, ray_session, tmp_path):
    from rl.online import OnlineRun

    recipe = load_recipe(None, [
        f"model.path={tiny_model_root / 'model'}", f"data.train={tiny_model_root / 'data' / 'train.jsonl'}",
        f"data.test={tiny_model_root / 'data' / 'test.jsonl'}", "data.prompts_per_step=6", "data.max_test_examples=8",
        "algorithm.group_size=2", "rollout.max_new_tokens=6", "rollout.max_model_len=64", "trainer.lr=3e-3",
        "trainer.micro_batch_size=64", "rewards.functions=[{fn: arithmetic_exact}, {fn: length_penalty, weight: 1.0}]",
        f"agent.fn={PLUGIN}:run_episode", "agent.timeout_s=10", "agent.concurrency=4", "eval.before=false", "eval.after=false",
        "logging.progress=false", f"output_dir={tmp_path}",
    ])
    plugin = _plugin()
    run = OnlineRun(recipe)
    # One prompt per behaviour: its index in the training set.
    chosen: dict[str, int] = {}
    for i, row in enumerate(run.train_set.rows):
        chosen.setdefault(plugin.behaviour(recipe.data.template.format(**row)), i)
    assert set(chosen) == set(plugin.BEHAVIOURS)
    run.start_workers()
    try:
        run.rollouts.sample([0], seed_step=0)  # the engine's first calls are slow: not inside the agents' time limit
        sampled = run.rollouts.sample(list(chosen.values()), seed_step=1)
        by_kind = dict(zip(chosen, sampled.groups))
        added = run.tokenizer(plugin.ADDED, add_special_tokens=False)["input_ids"]
        good = by_kind["two_calls"].completions
        for e in good:
            assert not e.failure and e.num_turns == 2 and e.env_reward == 0.5
            zeros = [j for j, m in enumerate(e.loss_mask) if m == 0]
            assert e.token_ids[zeros[0]:zeros[0] + len(added)] == added and len(zeros) == len(added)  # the agent's text
            assert all(e.logprobs[j] == 0.0 for j in zeros) and len(e.token_ids) == len(e.logprobs) == len(e.loss_mask)
        g = by_kind["two_calls"]  # the recipe's rewards on the last reply, plus the agent's 0.5
        assert g.rewards == pytest.approx([a + lp + 0.5 for a, lp in zip(g.per_reward["arithmetic_exact"], g.per_reward["length_penalty"])])
        # Token in, token out: the engine scoring each whole episode, and the trainer, give every reply token the
        # logprob it was sampled with, so each reply was sampled from exactly the episode's preceding tokens.
        engine_gap, trainer_gap = _policy_token_gaps(run, good)
        assert engine_gap < LOGPROB_TOL and trainer_gap < LOGPROB_TOL, (engine_gap, trainer_gap)

        failures = {kind: [e.failure for e in by_kind[kind].completions] for kind in chosen if kind != "two_calls"}
        assert failures == {"raises": ["agent_error"] * 2, "hangs": ["agent_timeout"] * 2,
                            "other_temperature": ["agent_bad_request"] * 2, "edits_history": ["agent_bad_request"] * 2}
        assert "a bug in the agent" in by_kind["raises"].completions[0].failure_detail
        assert "rollout.temperature" in by_kind["other_temperature"].completions[0].failure_detail
        assert "differs from what this episode sampled" in by_kind["edits_history"].completions[0].failure_detail
        fallback = recipe.rewards.fallback
        assert all(r == fallback for kind in failures for r in by_kind[kind].rewards)
        assert {k: v for k, v in sampled.failures.items() if v} == {"agent_error": 2, "agent_timeout": 2, "agent_bad_request": 4}
        # And the run trains through them.
        m = run.train_one_step()
        assert m["policy_version"] == 1 and m["trained_sequences"] == 12 and m["turns_mean"] > 0.0
        _official_client_checks(run.episodes.gateway)
    finally:
        run.stop_workers()


def _official_client_checks(gw) -> None:
    """Through the openai package: model listing, a completion capped at rollout.max_new_tokens with the policy
    version that produced it, a chat request to a model without a chat template refused with a clear message,
    and no call accepted once the episode is closed."""
    import openai

    key = gw.open_episode(seed=7)
    client = openai.OpenAI(base_url=gw.url, api_key=key, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["policy"]
    reply = client.completions.create(model="policy", prompt="12+34=", max_tokens=100)
    assert reply.system_fingerprint == "policy-v1" and 1 <= reply.usage.completion_tokens <= 6
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        client.chat.completions.create(model="policy", messages=[{"role": "user", "content": "12+34="}])
    tokens = gw.close_episode(key)
    assert tokens.calls == 1 and tokens.seen == "12+34=" + reply.choices[0].text and "no chat template" in tokens.rejected
    # Streamed: the same episode seed and call index sample the same reply, delivered as chunks.
    streamed_key = gw.open_episode(seed=7)
    chunks = list(openai.OpenAI(base_url=gw.url, api_key=streamed_key, max_retries=0).completions.create(
        model="policy", prompt="12+34=", max_tokens=100, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == reply.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks] == [None, reply.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens and chunks[0].system_fingerprint == "policy-v1"
    assert gw.close_episode(streamed_key).token_ids == tokens.token_ids
    with pytest.raises(openai.BadRequestError, match="unknown or finished episode"):
        client.completions.create(model="policy", prompt="12+34=", max_tokens=6)


def _policy_token_gaps(run, episodes):
    from trainer.types import TrainBatch

    prompts = [e.prompt_token_ids for e in episodes]
    scored = run.rollout.score(prompts, [e.token_ids for e in episodes])
    batch = TrainBatch(prompts, [e.token_ids for e in episodes], [0.0] * len(episodes), [e.logprobs for e in episodes],
                       len(episodes), 0, loss_mask=[e.loss_mask for e in episodes])
    trainer = run.trainer.compute_logprobs(batch)
    engine_gap = trainer_gap = 0.0
    for e, engine_row, trainer_row in zip(episodes, scored, trainer):
        sampled = [lp for lp, m in zip(e.logprobs, e.loss_mask) if m]
        engine = [lp for lp, m in zip(engine_row, e.loss_mask) if m]
        engine_gap = max([engine_gap, *(abs(a - b) for a, b in zip(sampled, engine))])
        trainer_gap = max([trainer_gap, *(abs(a - b) for a, b in zip(sampled, trainer_row))])
    return engine_gap, trainer_gap
