"""Multi-turn episodes: the environment registry and plugins, the built-in environments, the recipe
section's checks, the episode driver's token layout (turns, observations, loss mask, logprobs) and
its fault isolation, and the trainer's collate honouring the loss mask.

The driver is tested here over a scripted stand-in for the rollout group (a function of the
context, so the layout can be checked token by token); tests/e2e/test_multi_turn.py runs it
through real vLLM actors and a DeepSpeed trainer."""

from __future__ import annotations

import time

import pytest
import torch

from rewards import RewardScorer, RewardSpec
from rewards.config import EnvironmentConfig
from rewards.environments import CalculatorEnvironment, EnvStep, get_environment
from rl.config import RecipeError, load_recipe
from rl.episodes import EpisodeRunner, apply_episode_outcomes, episode_metrics
from rl.tasks.tiny_model import build_tokenizer
from rollout.types import Completion, SamplingSpec
from trainer.batching import collate
from trainer.types import TrainBatch


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


class ScriptedRollout:
    """Stands in for rl.workers.RolloutGroup.generate: the reply to a context is ``reply(text)``,
    each token with logprob -0.5; counts the calls so tests can see one generate per turn."""

    def __init__(self, tok, reply):
        self.tok, self.reply, self.calls = tok, reply, []

    def generate(self, prompts, sampling: SamplingSpec):
        self.calls.append((len(prompts), sampling.n, sampling.seed))
        out = []
        for i, p in enumerate(prompts):
            text = self.reply(self.tok.decode(p, skip_special_tokens=True))
            ids = self.tok(text, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
            out.append([Completion(i, list(p), ids, text, [-0.5] * len(ids), "stop", policy_version=3)
                        for _ in range(sampling.n)])
        return out


def _runner(tok, name, max_turns=3, max_model_len=64, **options):
    return EpisodeRunner(EnvironmentConfig(name=name, max_turns=max_turns, options=options, step_timeout_s=0.5), tok, max_model_len)


def test_scripted_episode_layout(tok):
    rollout = ScriptedRollout(tok, lambda ctx: "7")
    prompts = [tok("1+2=")["input_ids"], tok("3+4=")["input_ids"]]
    groups = _runner(tok, "scripted", max_turns=3, observation=" =", turns=2).run(
        rollout, prompts, [{"answer": 3}, {"answer": 7}], SamplingSpec(n=2, max_new_tokens=4, seed=100))
    assert [len(g) for g in groups] == [2, 2]
    # Turn 1 samples G per prompt; turn 2 one per episode, with its own seed.
    assert rollout.calls == [(2, 2, 100), (4, 1, 100 + 8191)]
    turn = tok("7", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    obs = tok(" =", add_special_tokens=False)["input_ids"]
    for e in (e for g in groups for e in g):
        assert e.token_ids == turn + obs + turn
        assert e.loss_mask == [1] * len(turn) + [0] * len(obs) + [1] * len(turn)
        assert e.logprobs == [-0.5] * len(turn) + [0.0] * len(obs) + [-0.5] * len(turn)
        assert e.num_turns == 2 and e.text == "7" and e.transcript == "7 =7" and not e.failure
    m = episode_metrics([e for g in groups for e in g])
    assert m["turns_mean"] == 2.0 and m["observation_token_fraction"] == pytest.approx(2 / 6)


def test_calculator_call_then_answer(tok):
    # The policy calls the tool with its prompt, then answers with what the calculator said.
    def reply(ctx):
        return ctx.split(" ")[-2] if ctx.endswith(" ") else ctx
    rollout = ScriptedRollout(tok, reply)
    groups = _runner(tok, "calculator").run(rollout, [tok("12*34=")["input_ids"]], [{"answer": 408}], SamplingSpec(n=1, max_new_tokens=8))
    (e,) = groups[0]
    assert e.transcript == "12*34= 408 408" and e.text == "408" and e.num_turns == 2
    result = RewardScorer([RewardSpec("arithmetic_exact")]).score(["12*34="], [e.text], {"answer": [408]})
    assert apply_episode_outcomes(result, [e], fallback=0.0) == {} and result.total == [1.0]


def test_calculator_environment_rules():
    env = CalculatorEnvironment(max_calls=1, call_reward=0.1)
    env.reset({})
    assert env.step("2*(3+4)=") == EnvStep(" 14 ", done=False, reward=0.1)
    assert env.step("5+5=").done  # past max_calls
    env.reset({})
    assert env.step("14").done  # an answer ends the episode
    assert env.step("2**9=").observation == " - "  # a call it cannot evaluate (no powers)


class _Raises:
    def reset(self, row):
        pass

    def step(self, turn):
        raise RuntimeError("tool crashed")


class _Hangs(_Raises):
    def step(self, turn):
        time.sleep(3)


class _Malformed(_Raises):
    def step(self, turn):
        return ("obs", False, 0.0)


@pytest.mark.parametrize("cls, kind", [(_Raises, "env_error"), (_Hangs, "env_timeout"), (_Malformed, "env_malformed")])
def test_faulty_environment_costs_the_episode(tok, cls, kind):
    runner = _runner(tok, "scripted")
    runner.env_cls = cls
    rollout = ScriptedRollout(tok, lambda ctx: "3")
    (g,) = runner.run(rollout, [tok("1+2=")["input_ids"]], [{"answer": 3}], SamplingSpec(n=2, max_new_tokens=4))
    assert [e.failure for e in g] == [kind, kind] and len(rollout.calls) == 1
    result = RewardScorer([RewardSpec("arithmetic_exact")]).score(["1+2="] * 2, [e.text for e in g], {"answer": [3, 3]})
    assert result.total == [1.0, 1.0]  # the answer was right, but the episode failed
    assert apply_episode_outcomes(result, g, fallback=-1.0) == {kind: 2} and result.total == [-1.0, -1.0]


def test_episode_past_max_model_len_is_cut_and_counted(tok):
    runner = _runner(tok, "scripted", max_turns=4, max_model_len=24, observation=" " * 10, turns=4)
    (g,) = runner.run(ScriptedRollout(tok, lambda ctx: "12"), [tok("1+2=")["input_ids"]], [{}], SamplingSpec(n=1, max_new_tokens=4))
    (e,) = g
    assert e.failure == "episode_too_long" and "max_model_len=24" in e.failure_detail
    assert len(e.prompt_token_ids) + len(e.token_ids) <= 24


def test_plugin_environment_from_file(tmp_path, tok):
    plugin = tmp_path / "my_env.py"
    plugin.write_text(
        "from rewards.environments import EnvStep\n"
        "class Echo:\n"
        "    def reset(self, row):\n        self.answer = row['answer']\n"
        "    def step(self, turn):\n        return EnvStep(done=True, reward=float(turn == str(self.answer)))\n")
    cls = get_environment(f"{plugin}:Echo")
    runner = EpisodeRunner(EnvironmentConfig(name=f"{plugin}:Echo"), tok, 64)
    (g,) = runner.run(ScriptedRollout(tok, lambda ctx: "3"), [tok("1+2=")["input_ids"]], [{"answer": 3}], SamplingSpec(n=1))
    assert cls.__name__ == "Echo" and g[0].env_reward == 1.0 and g[0].num_turns == 1


def test_recipe_environment_errors_name_the_field():
    with pytest.raises(RecipeError, match="environment.*calculater.*did you mean 'calculator'"):
        load_recipe(None, ["environment.name=calculater"], check_paths=False)
    with pytest.raises(RecipeError, match="environment.*unexpected keyword"):
        load_recipe(None, ["environment.name=calculator", "environment.options={max_cals: 2}"], check_paths=False)
    with pytest.raises(RecipeError, match="max_staleness=0"):
        load_recipe(None, ["environment.name=scripted", "rollout.max_staleness=1"], check_paths=False)
    with pytest.raises(RecipeError, match="environment.max_turnz"):
        load_recipe(None, ["environment.max_turnz=2"], check_paths=False)
    assert load_recipe(None, ["environment.name=calculator"], check_paths=False).environment.max_turns == 2


def test_collate_trains_only_masked_tokens():
    batch = TrainBatch([[1, 2]], [[3, 4, 5, 6]], [1.0], [[-0.1, -0.2, -0.3, -0.4]], 1, 3, loss_mask=[[1, 0, 0, 1]])
    mb = collate(batch, pad_id=0, device="cpu")
    # Response tokens sit at positions 2..5, predicted at 1..4.
    assert mb["response_mask"].tolist() == [[0.0, 1.0, 0.0, 0.0, 1.0]]
    assert torch.equal(mb["rollout_logprobs"][0, 1:], torch.tensor([-0.1, -0.2, -0.3, -0.4]))
    assert batch.select([0]).loss_mask == [[1, 0, 0, 1]]
    with pytest.raises(ValueError, match="loss_mask has 2 entries for 4"):
        collate(TrainBatch([[1]], [[3, 4, 5, 6]], [1.0], [[]], 1, 4, loss_mask=[[1, 0]]), pad_id=0, device="cpu")


def test_python_tool_runs_the_block_in_the_sandbox():
    env = get_environment("python")(max_calls=1)
    env.reset({})
    out = env.step("Let me compute.\n```python\nprint(sum(range(10)))\n```")
    assert out == EnvStep("\nOutput:\n45\n", done=False)
    assert env.step("```python\nprint(1)\n```").done  # past max_calls
    env.reset({})
    assert "ZeroDivisionError" in env.step("```python\n1/0\n```").observation
    assert env.step("The answer is 45.").done
