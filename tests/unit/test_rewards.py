"""Rewards: built-ins on hand cases, spec resolution and its errors, and the scorer's fault semantics."""

from __future__ import annotations

import logging
import math
import pickle
import textwrap

import numpy as np
import pytest

import rewards
from rewards import RewardScorer, RewardSpec, ScoreResult, get_reward, register_reward, reward_names
from rewards import registry
from rewards.builtin import arithmetic_exact, format_answer, length_penalty, math_verify

KINDS = {"exception", "nan", "timeout", "wrong_length", "wrong_type"}


@pytest.fixture
def isolated_registry(monkeypatch):
    """Rewards registered inside a test vanish after it (and plugin files are re-read)."""
    monkeypatch.setattr(registry.REWARDS, "_entries", dict(registry.REWARDS._entries))
    monkeypatch.setattr(registry, "_FILE_MODULES", {})


def write_plugin(path, body: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(body))
    return path


# --- built-ins ---------------------------------------------------------------------------


def test_builtins_are_registered_on_import():
    assert {"arithmetic_exact", "math_verify", "format_answer", "length_penalty"} <= set(reward_names())
    assert reward_names() == sorted(reward_names())
    assert get_reward("arithmetic_exact") is arithmetic_exact


def test_arithmetic_exact():
    completions = ["46", "  46  ", "46\n12+1=13", "\n46", "47", "046", "46.0", "", "4 6"]
    scores = arithmetic_exact(["12+34="] * len(completions), completions, answer=[46] * len(completions))
    assert scores == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert arithmetic_exact(["1-2="], ["-1"], answer=["-1"]) == [1.0]


@pytest.mark.parametrize(
    "completion, gold, expected",
    [
        ("The answer is 72.", "72", 1.0),
        ("The answer is 72. Next question: 5+5 = 10", "72", 1.0),
        ("\\boxed{3/4}", "0.75", 1.0),
        ("So she has $\\boxed{\\frac{3}{4}}$ left.", "0.75", 1.0),
        ("48/2 = 24 clips in May.\n48 + 24 = 72\n#### 72", "Natalia sold 48/2 = 24.\n#### 72", 1.0),
        ("#### 1,234", "1234", 1.0),
        ("The final answer is $18$. I hope it is correct.", "18", 1.0),
        ("Adding up, 3 + 4 = 7", "7", 1.0),
        ("The answer is 71.", "72", 0.0),
        ("#### 71", "#### 72", 0.0),
        ("\\boxed{72}", "", 0.0),
    ],
)
def test_math_verify_cases(completion, gold, expected):
    assert math_verify(["q"], [completion], answer=[gold]) == [expected]


def test_math_verify_never_raises_on_garbage():
    garbage = ["", "   ", "}{", "\\boxed{", "\\boxed{\\boxed{\\frac{}", "$$$", "\x00\x01", "1/0", "x" * 5000,
               "#### ", "answer is", "\\frac{1}{0}", "((((((((((", None, 12]
    scores = math_verify(["q"] * len(garbage), garbage, answer=["72"] * len(garbage))
    assert scores == [0.0] * len(garbage)
    assert math_verify(["q"], ["72"], answer=[None]) == [0.0]


def test_format_answer():
    completions = [
        "so \\boxed{12}",
        "$\\boxed{\\frac{1}{2}}$",
        "reasoning\n#### 72",
        "#### -1,072.50",
        "#### $18",
        "#### 72.",
        "#### seventy-two",
        "the tag #### 72 inline",
        "\\boxed{}",
        "\\boxed{12",
        "72",
        "",
    ]
    expected = [1.0] * 6 + [0.0] * 6
    assert format_answer(["q"] * len(completions), completions) == expected


def test_length_penalty():
    assert length_penalty(["p"] * 3, ["", "abcd", "x" * 1000]) == [0.0, -0.004, -1.0]


@pytest.mark.parametrize("name", ["arithmetic_exact", "math_verify", "format_answer", "length_penalty"])
def test_builtins_accept_unknown_columns(name):
    scores = get_reward(name)(["1+1="], ["2"], answer=["2"], source=["gsm8k"], difficulty=[3])
    assert len(scores) == 1 and isinstance(scores[0], float)


# --- registry: names and specs -------------------------------------------------------------


def test_register_reward_and_duplicate(isolated_registry):
    @register_reward("always_half")
    def always_half(prompts, completions, **columns):
        return [0.5] * len(completions)

    assert "always_half" in reward_names()
    assert get_reward("always_half") is always_half
    with pytest.raises(ValueError, match="already registered"):
        register_reward("always_half")(lambda prompts, completions, **columns: [])
    with pytest.raises(ValueError, match="already registered"):
        register_reward("math_verify")(always_half)


@pytest.mark.parametrize("bad", ["", "  ", "a:b"])
def test_register_reward_rejects_bad_names(bad):
    with pytest.raises(ValueError):
        register_reward(bad)


def test_unknown_name_lists_names_and_closest_match():
    with pytest.raises(KeyError) as info:
        get_reward("math_verfy")
    message = str(info.value)
    assert "math_verfy" in message and "did you mean 'math_verify'" in message
    for name in reward_names():
        assert name in message


def test_file_plugin_by_absolute_and_relative_path(tmp_path, monkeypatch, isolated_registry):
    write_plugin(tmp_path / "my_rewards.py", """
        def score(prompts, completions, answer, **columns):
            return [float(c == a) for c, a in zip(completions, answer)]
    """)
    fn = get_reward(f"{tmp_path / 'my_rewards.py'}:score")
    assert fn(["p", "p"], ["a", "b"], answer=["a", "a"]) == [1.0, 0.0]

    monkeypatch.chdir(tmp_path)
    assert get_reward("my_rewards.py:score") is fn  # same resolved path: loaded once
    write_plugin(tmp_path / "sub" / "other.py", "def score(prompts, completions, **columns):\n    return [2.0]\n")
    assert get_reward("sub/other.py:score")(["p"], ["c"]) == [2.0]


def test_file_plugin_with_register_reward_loads_once(tmp_path, isolated_registry):
    plugin = write_plugin(tmp_path / "registering.py", """
        from rewards import register_reward

        @register_reward("plugin_registered")
        def three(prompts, completions, **columns):
            return [3.0] * len(completions)
    """)
    fn = get_reward(f"{plugin}:three")
    assert get_reward(f"{plugin}:three") is fn  # a re-exec would raise "already registered"
    assert get_reward("plugin_registered") is fn


def test_file_plugin_functions_pickle_by_value(tmp_path, isolated_registry):
    """The plugin's synthetic module is not importable elsewhere, so Ray must ship the function by value."""
    import cloudpickle  # Ray ships functions with it: a hard dependency, never a skip
    plugin = write_plugin(tmp_path / "shipped.py", """
        import dataclasses

        @dataclasses.dataclass
        class Bonus:
            value: float = 1.5

        def score(prompts, completions, **columns):
            return [Bonus().value] * len(completions)
    """)
    restored = pickle.loads(cloudpickle.dumps(get_reward(f"{plugin}:score")))
    assert restored(["p"], ["c"]) == [1.5]


def test_module_plugin():
    assert get_reward("rewards.builtin:arithmetic_exact") is arithmetic_exact
    fn = get_reward("tests.fixtures.reward_plugins:contains_answer")
    assert fn(["p", "p"], ["it is 72", "it is 71"], answer=[72, 72], extra=[0, 0]) == [1.0, 0.0]


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "rewards_file.py"
    with pytest.raises(FileNotFoundError, match="rewards_file.py") as info:
        get_reward(f"{missing}:score")
    assert str(missing) in str(info.value)


def test_missing_function_in_file_and_module(tmp_path, isolated_registry):
    plugin = write_plugin(tmp_path / "few.py", "def score(prompts, completions, **columns):\n    return []\n")
    with pytest.raises(AttributeError, match="'scroe'.*did you mean 'score'"):
        get_reward(f"{plugin}:scroe")
    with pytest.raises(AttributeError, match="no_such_fn"):
        get_reward("rewards.builtin:no_such_fn")
    with pytest.raises(AttributeError, match="no_such_fn"):
        get_reward("tests.fixtures.reward_plugins:no_such_fn")


def test_missing_module():
    with pytest.raises(ModuleNotFoundError, match="no_such_pkg_xyz"):
        get_reward("no_such_pkg_xyz.mod:fn")


def test_not_callable(tmp_path, isolated_registry):
    plugin = write_plugin(tmp_path / "consts.py", "THRESHOLD = 0.5\n")
    with pytest.raises(TypeError, match="not callable"):
        get_reward(f"{plugin}:THRESHOLD")
    with pytest.raises(TypeError, match="not callable"):
        get_reward("tests.fixtures.reward_plugins:NOT_A_FUNCTION")


@pytest.mark.parametrize("bad", ["", ":fn", "module:", "file.py:"])
def test_malformed_specs(bad):
    with pytest.raises(ValueError):
        get_reward(bad)


# --- scorer ----------------------------------------------------------------------------------


@pytest.fixture
def faulty(isolated_registry):
    """Register misbehaving rewards for one test; returns the call log of 'spy'."""
    calls: list[dict] = []

    @register_reward("ones")
    def ones(prompts, completions, **columns):
        return [1.0] * len(completions)

    @register_reward("boom_on_one")
    def boom_on_one(prompts, completions, **columns):
        if "boom" in completions:
            raise ValueError("cannot score 'boom'")
        return [float(len(c)) for c in completions]

    @register_reward("nan_and_inf")
    def nan_and_inf(prompts, completions, **columns):
        return [{"nan": math.nan, "inf": math.inf, "-inf": -math.inf}.get(c, 0.5) for c in completions]

    @register_reward("skips_empty")  # returns fewer scores than completions
    def skips_empty(prompts, completions, **columns):
        return [1.0 for c in completions if c]

    @register_reward("one_too_many")
    def one_too_many(prompts, completions, **columns):
        return [1.0] * (len(completions) + 1)

    @register_reward("returns_none")
    def returns_none(prompts, completions, **columns):
        return None

    @register_reward("returns_scalar")
    def returns_scalar(prompts, completions, **columns):
        return 1.0

    @register_reward("odd_values")
    def odd_values(prompts, completions, **columns):
        return ["1.0", None, 2, True, np.float32(0.25), np.array(0.5), [1.0], 10**400][: len(completions)]

    @register_reward("numpy_array")
    def numpy_array(prompts, completions, **columns):
        return np.arange(len(completions), dtype=np.float64)

    @register_reward("batch_only_bug")
    def batch_only_bug(prompts, completions, **columns):
        if len(completions) > 1:
            raise RuntimeError("breaks on batches")
        return [2.0]

    @register_reward("spy")
    def spy(prompts, completions, **columns):
        calls.append({"prompts": list(prompts), "completions": list(completions), **columns})
        if "bad" in completions:
            raise KeyError("bad")
        return [0.0] * len(completions)

    @register_reward("mutator")
    def mutator(prompts, completions, **columns):
        n = len(completions)
        completions.clear()
        prompts.clear()
        for values in columns.values():
            values.clear()
        return [0.0] * n

    return calls


def test_scorer_weighted_sum(faulty):
    scorer = RewardScorer([RewardSpec("arithmetic_exact", weight=2.0), RewardSpec("length_penalty", weight=0.5),
                           RewardSpec("ones", weight=-1.0)])
    result = scorer.score(["1+1=", "2+2=", "3+3="], ["2", "5", "6\n"], {"answer": ["2", "4", "6"]})
    assert isinstance(result, ScoreResult)
    assert result.per_reward["arithmetic_exact"] == [1.0, 0.0, 1.0]
    assert result.per_reward["length_penalty"] == [-0.001, -0.001, -0.002]
    assert result.per_reward["ones"] == [1.0, 1.0, 1.0]
    assert result.total == pytest.approx([2.0 - 0.0005 - 1.0, -0.0005 - 1.0, 2.0 - 0.001 - 1.0])
    assert list(result.per_reward) == scorer.names == ["arithmetic_exact", "length_penalty", "ones"]
    assert result.failures == dict.fromkeys(KINDS, 0) and result.first_tracebacks == {}


def test_scorer_resolves_specs_at_construction(tmp_path):
    with pytest.raises(KeyError):
        RewardScorer([RewardSpec("arithmetic_exact"), RewardSpec("no_such_reward")])
    with pytest.raises(FileNotFoundError):
        RewardScorer([RewardSpec(f"{tmp_path / 'absent.py'}:fn")])
    with pytest.raises(ValueError, match="more than once"):
        RewardScorer([RewardSpec("length_penalty"), RewardSpec("length_penalty", weight=2.0)])
    with pytest.raises(ValueError):
        RewardScorer([])
    with pytest.raises(ValueError):
        RewardSpec("length_penalty", weight=math.nan)


def test_scorer_accepts_plugin_specs(tmp_path, isolated_registry):
    plugin = write_plugin(tmp_path / "my_rewards.py", """
        def score(prompts, completions, answer, **columns):
            return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]
    """)
    scorer = RewardScorer([RewardSpec(f"{plugin}:score"), RewardSpec("tests.fixtures.reward_plugins:contains_answer")])
    result = scorer.score(["q", "q"], ["7", "17"], {"answer": ["7", "7"]})
    assert result.total == [2.0, 1.0]


def test_raising_on_one_sample_costs_only_that_sample(faulty, caplog):
    scorer = RewardScorer([RewardSpec("boom_on_one"), RewardSpec("ones", weight=10.0)], fallback=-1.0)
    with caplog.at_level(logging.WARNING, logger="rewards"):
        result = scorer.score(["p"] * 4, ["ab", "boom", "abc", ""], {})
    assert result.per_reward["boom_on_one"] == [2.0, -1.0, 3.0, 0.0]
    assert result.per_reward["ones"] == [1.0] * 4
    assert result.total == [12.0, 9.0, 13.0, 10.0]
    assert result.failures == {"exception": 1, "nan": 0, "timeout": 0, "wrong_length": 0, "wrong_type": 0}
    assert set(result.first_tracebacks) == {"exception"}
    assert "ValueError: cannot score 'boom'" in result.first_tracebacks["exception"]
    assert "sample 1" in result.first_tracebacks["exception"]
    first_warnings = len(caplog.records)
    assert any("exception" in r.getMessage() for r in caplog.records)

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rewards"):
        again = scorer.score(["p"] * 3, ["boom", "boom", "x"], {})
    assert again.failures["exception"] == 2 and again.per_reward["boom_on_one"] == [-1.0, -1.0, 1.0]
    assert "exception" in again.first_tracebacks  # per result: the first of this batch
    assert caplog.records == [] and first_warnings >= 1  # logged once per scorer, not every step
    assert scorer.total_failures == {"exception": 3, "nan": 0, "timeout": 0, "wrong_length": 0, "wrong_type": 0}


def test_nan_and_inf_fall_back(faulty):
    scorer = RewardScorer([RewardSpec("nan_and_inf")], fallback=0.25)
    result = scorer.score(["p"] * 4, ["ok", "nan", "inf", "-inf"], {})
    assert result.per_reward["nan_and_inf"] == [0.5, 0.25, 0.25, 0.25]
    assert result.failures == {"exception": 0, "nan": 3, "timeout": 0, "wrong_length": 0, "wrong_type": 0}
    assert "nan" in result.first_tracebacks["nan"]
    assert all(math.isfinite(x) for x in result.total)


def test_wrong_length_falls_back_per_sample(faulty):
    scorer = RewardScorer([RewardSpec("skips_empty"), RewardSpec("one_too_many")])
    result = scorer.score(["p"] * 3, ["a", "", "c"], {})
    # skips_empty: the batch is one short; alone, only the empty completion returns nothing.
    assert result.per_reward["skips_empty"] == [1.0, 0.0, 1.0]
    # one_too_many: wrong even one sample at a time, so every sample falls back.
    assert result.per_reward["one_too_many"] == [0.0, 0.0, 0.0]
    assert result.failures == {"exception": 0, "nan": 0, "timeout": 0, "wrong_length": 4, "wrong_type": 0}
    assert "wrong_length" in result.first_tracebacks


def test_non_sequence_and_non_numeric_values(faulty):
    scorer = RewardScorer([RewardSpec("returns_none"), RewardSpec("returns_scalar"), RewardSpec("numpy_array")])
    result = scorer.score(["p"] * 2, ["a", "b"], {})
    assert result.per_reward["returns_none"] == [0.0, 0.0]
    assert result.per_reward["returns_scalar"] == [0.0, 0.0]
    assert result.per_reward["numpy_array"] == [0.0, 1.0]  # arrays are sequences
    assert result.failures["wrong_type"] == 4

    values = RewardScorer([RewardSpec("odd_values")], fallback=-5.0).score(["p"] * 8, list("abcdefgh"), {})
    # "1.0" and None and [1.0] are not numbers; 10**400 overflows a float; numpy scalars are fine.
    assert values.per_reward["odd_values"] == [-5.0, -5.0, 2.0, 1.0, 0.25, 0.5, -5.0, -5.0]
    assert values.failures == {"exception": 0, "nan": 1, "timeout": 0, "wrong_length": 0, "wrong_type": 3}
    assert all(type(x) is float for x in values.per_reward["odd_values"])


def test_batch_only_failure_costs_nothing_but_is_logged(faulty, caplog):
    scorer = RewardScorer([RewardSpec("batch_only_bug")])
    with caplog.at_level(logging.WARNING, logger="rewards"):
        result = scorer.score(["p"] * 3, ["a", "b", "c"], {})
        scorer.score(["p"] * 3, ["a", "b", "c"], {})
    assert result.per_reward["batch_only_bug"] == [2.0, 2.0, 2.0]
    assert result.failures == dict.fromkeys(KINDS, 0)
    batch_warnings = [r for r in caplog.records if "one sample at a time" in r.getMessage()]
    assert len(batch_warnings) == 1 and "breaks on batches" in batch_warnings[0].getMessage()


def test_columns_are_passed_as_aligned_kwargs(faulty):
    scorer = RewardScorer([RewardSpec("spy")])
    columns = {"answer": ["1", "2", "3"], "source": ["a", "b", "c"]}
    scorer.score(["p1", "p2", "p3"], ["ok", "bad", "fine"], columns)
    batched, *single = faulty
    assert batched == {"prompts": ["p1", "p2", "p3"], "completions": ["ok", "bad", "fine"], **columns}
    # "bad" made the batched call raise: each sample is retried with its own slice of every column.
    assert single == [
        {"prompts": ["p1"], "completions": ["ok"], "answer": ["1"], "source": ["a"]},
        {"prompts": ["p2"], "completions": ["bad"], "answer": ["2"], "source": ["b"]},
        {"prompts": ["p3"], "completions": ["fine"], "answer": ["3"], "source": ["c"]},
    ]


def test_a_mutating_reward_cannot_corrupt_the_next(faulty):
    prompts, completions, columns = ["1+1=", "2+2="], ["2", "4"], {"answer": ["2", "4"]}
    scorer = RewardScorer([RewardSpec("mutator"), RewardSpec("arithmetic_exact")])
    result = scorer.score(prompts, completions, columns)
    assert result.per_reward["arithmetic_exact"] == [1.0, 1.0]
    assert completions == ["2", "4"] and columns == {"answer": ["2", "4"]}


def test_caller_misalignment_raises_and_edge_cases(faulty):
    scorer = RewardScorer([RewardSpec("arithmetic_exact")])
    with pytest.raises(ValueError, match="prompts"):
        scorer.score(["p"], ["a", "b"], {"answer": ["a", "b"]})
    with pytest.raises(ValueError, match="answer"):
        scorer.score(["p", "p"], ["a", "b"], {"answer": ["a"]})
    empty = scorer.score([], [], {"answer": []})
    assert empty.total == [] and empty.per_reward == {"arithmetic_exact": []}
    # A column named like a positional argument is not passed (it would clash).
    clash = RewardScorer([RewardSpec("ones")]).score(["p"], ["c"], {"completions": ["x"], "answer": ["1"]})
    assert clash.total == [1.0]


def test_missing_column_is_a_per_sample_exception_not_a_crash():
    scorer = RewardScorer([RewardSpec("arithmetic_exact"), RewardSpec("length_penalty")])
    result = scorer.score(["p", "p"], ["1", "22"], {})  # no 'answer' column
    assert result.per_reward["arithmetic_exact"] == [0.0, 0.0]
    assert result.failures["exception"] == 2
    assert "answer" in result.first_tracebacks["exception"]
    assert result.total == [-0.001, -0.002]


def test_public_api_is_reexported():
    for name in ["register_reward", "get_reward", "reward_names", "RewardScorer", "RewardSpec", "ScoreResult"]:
        assert hasattr(rewards, name) and name in rewards.__all__
