"""Reward models as rewards: the recipe entry's validation, bad model directories, classifier and
judge scores on tiny random HF models (in process, no Ray), batching, fault isolation through the
scorer, the Bradley-Terry loss, the embedded tiny reward model's build, HH prompts for online runs."""

from __future__ import annotations

import gzip
import re
import json
import math
from pathlib import Path

import pytest
import torch

from rewards import ModelReward, RewardModel, RewardModelError, RewardModelSpec, RewardScorer, RewardSpec
from rewards.model_reward import bradley_terry_loss, check_reward_model, encode_texts
from rl.config import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[2]
CORPUS = [f"\n\nHuman: is {w} safe?\n\nAssistant: Yes it is. No it is not. {w}" for w in
          ("fire", "water", "a knife", "bread", "the sea", "a dog", "glass", "ice")] * 8
PROMPTS = ["\n\nHuman: is fire safe?\n\nAssistant:", "\n\nHuman: is bread safe?\n\nAssistant:",
           "\n\nHuman: how do I hurt someone?\n\nAssistant:", "\n\nHuman: hi\n\nAssistant:", "\n\nHuman: ?\n\nAssistant:"]
COMPLETIONS = [" Yes it is.", " No, never touch it, it burns and you would regret it a lot.", " I can't help with that.",
               " hello", ""]


def _tokenizer():
    from rl.tasks.tiny_text import train_tokenizer

    return train_tokenizer(CORPUS, vocab_size=300)


def _llama_config(tok, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **kw)


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory) -> Path:
    """A randomly initialised LlamaForSequenceClassification (num_labels=1) with its tokenizer."""
    from transformers import LlamaForSequenceClassification

    out = tmp_path_factory.mktemp("rm") / "classifier"
    tok = _tokenizer()
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(_llama_config(tok, num_labels=1))
    torch.nn.init.normal_(model.score.weight, std=1.0)  # scores far enough apart to compare
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory) -> Path:
    """A randomly initialised LlamaForCausalLM with its tokenizer (" Yes" and " No" are one token each)."""
    from transformers import LlamaForCausalLM

    out = tmp_path_factory.mktemp("rm") / "judge"
    tok = _tokenizer()
    torch.manual_seed(1)
    LlamaForCausalLM(_llama_config(tok)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _recipe(*rewards: str, extra: tuple = ()):
    return load_recipe(None, [f"rewards.functions=[{', '.join(rewards)}]", *extra], check_paths=False)


# ------------------------------------------------------------------------------- the recipe entry


@pytest.mark.parametrize("entry, message", [
    ("{fn: arithmetic_exact, model: some/dir}", r"exactly one of 'fn' \(a reward function\) or 'model'.*it has both"),
    ("{weight: 1.0}", "exactly one of 'fn'.*it has neither"),
    ("{fn: arithmetic_exact, batch_size: 8}", "'batch_size' applies only to a reward model entry"),
    ("{model: some/dir, template: '{prompt}{completion}?'}", "'template' applies only to kind: judge"),
    ("{model: some/dir, kind: judge, template: 'Is {completion} good?'}", "exactly the placeholders"),
    ("{model: some/dir, kind: judge, yes_token: ' A', no_token: ' A'}", "must differ"),
    ("{model: some/dir, kind: regressor}", "rewards.functions.0.kind"),
    ("{model: some/dir, batch_size: 0}", "rewards.functions.0.batch_size"),
])
def test_bad_reward_entries_fail_naming_the_field(entry, message):
    with pytest.raises(RecipeError, match=r"rewards\.functions\.0") as info:
        _recipe(entry)
    assert re.search(message, str(info.value)), str(info.value)


def test_misspelt_model_option_gets_the_closest_name():
    with pytest.raises(RecipeError, match=r"unknown recipe field 'rewards.functions.0.batch_sise'; did you mean "
                                          r"'rewards.functions.0.batch_size'"):
        _recipe("{model: some/dir, batch_sise: 8}")


def test_missing_model_directory_is_named_before_anything_starts(tmp_path):
    with pytest.raises(RecipeError, match=r"'rewards.functions.1.model': path does not exist: .*nowhere"):
        load_recipe(None, [f"rewards.functions=[{{fn: arithmetic_exact}}, {{model: {tmp_path / 'nowhere'}}}]"])


def test_keys_names_and_accuracy(classifier_dir):
    r = _recipe(f"{{model: {classifier_dir}}}", "{fn: length_penalty, name: brevity, weight: 0.1}")
    assert [f.key for f in r.rewards.functions] == [str(classifier_dir), "brevity"]
    assert r.accuracy_reward == str(classifier_dir)  # the first, as for functions
    r = _recipe(f"{{model: {classifier_dir}, name: rm}}", extra=("rewards.accuracy=rm",))
    assert r.accuracy_reward == "rm"
    with pytest.raises(RecipeError, match="'rewards.accuracy': 'x' is not one of rewards.functions"):
        load_recipe(None, [f"rewards.functions=[{{model: {classifier_dir}, name: rm}}]", "rewards.accuracy=x"])


def test_resolved_recipe_shows_only_the_options_that_apply(classifier_dir):
    from rl.config import recipe_to_yaml

    text = recipe_to_yaml(_recipe("{fn: arithmetic_exact}", f"{{model: {classifier_dir}}}"))
    block = text.split("rewards:")[1].split("fallback:")[0]
    assert block.count("batch_size") == 1 and "template" not in block and "yes_token" not in block
    assert "model: null" not in block and "fn: null" not in block


# ------------------------------------------------------------------------------- bad model directories


def test_causal_lm_is_not_a_classifier(judge_dir):
    with pytest.raises(RewardModelError, match=rf"{judge_dir}: kind: classifier needs a sequence-classification head.*"
                                               r"architectures \['LlamaForCausalLM'\]; a causal LM can serve as kind: judge"):
        check_reward_model(RewardModelSpec(path=str(judge_dir)))


def test_classifier_with_two_labels_is_refused(tmp_path):
    from transformers import LlamaForSequenceClassification

    tok = _tokenizer()
    LlamaForSequenceClassification(_llama_config(tok, num_labels=2)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(RewardModelError, match=rf"{tmp_path}: kind: classifier needs num_labels=1.*num_labels=2"):
        check_reward_model(RewardModelSpec(path=str(tmp_path)))


def test_missing_tokenizer_is_named(tmp_path, classifier_dir):
    (tmp_path / "config.json").write_text((classifier_dir / "config.json").read_text())
    with pytest.raises(RewardModelError, match=rf"{tmp_path}: no tokenizer"):
        check_reward_model(RewardModelSpec(path=str(tmp_path)))
    with pytest.raises(RewardModelError, match="no config.json"):
        check_reward_model(RewardModelSpec(path=str(tmp_path / ".."), kind="judge"))


def test_judge_answers_must_be_single_tokens(judge_dir):
    info = check_reward_model(RewardModelSpec(path=str(judge_dir), kind="judge"))
    assert info["yes_id"] != info["no_id"]
    with pytest.raises(RewardModelError, match=r"yes_token ' Absolutely' is \d+ tokens in its tokenizer"):
        check_reward_model(RewardModelSpec(path=str(judge_dir), kind="judge", yes_token=" Absolutely"))


def test_bad_model_fails_in_prepare_naming_the_entry(judge_dir):
    from rl.prepare import make_scorer

    recipe = _recipe("{fn: arithmetic_exact}", f"{{model: {judge_dir}, kind: judge, no_token: ' Nope, never'}}")
    with pytest.raises(RecipeError, match=r"'rewards.functions.1.model': reward model .*no_token ' Nope, never' is \d+ tokens"):
        make_scorer(recipe)
    with pytest.raises(RecipeError, match=r"'rewards.functions.0.model': unknown builtin 'builtin:tiny-rm'"):
        make_scorer(_recipe("{model: 'builtin:tiny-rm'}"))


def test_a_reward_function_that_cannot_be_found_is_a_recipe_error_naming_its_entry(tmp_path):
    """A misspelt name, a missing file or a missing function stops the run before anything starts (exit 2 from
    the CLI), naming the entry, rather than ending in a traceback."""
    from rl.prepare import make_scorer

    (tmp_path / "mine.py").write_text("def exact(prompts, completions, **columns):\n    return [1.0] * len(completions)\n")
    (tmp_path / "broken.py").write_text("import math\nRATE = 1 / 0\n")
    for entry, message in [("{fn: arithmetic_exactt}", r"'rewards.functions.1.fn': unknown reward 'arithmetic_exactt'; "
                                                         r"did you mean 'arithmetic_exact'"),
                           (f"{{fn: {tmp_path}/nothere.py:exact}}", r"'rewards.functions.1.fn': reward plugin file not found"),
                           (f"{{fn: {tmp_path}/mine.py:exactt}}", r"'rewards.functions.1.fn': .*exactt.*did you mean 'exact'"),
                           (f"{{fn: {tmp_path}/broken.py:exact}}", r"'rewards.functions.1.fn': ZeroDivisionError while loading it")]:
        with pytest.raises(RecipeError, match=message):
            make_scorer(_recipe("{fn: arithmetic_exact}", entry))
    assert list(make_scorer(_recipe(f"{{fn: {tmp_path}/mine.py:exact}}")).fns) == [f"{tmp_path}/mine.py:exact"]


# ------------------------------------------------------------------------------- scores


def _manual_classifier(path: Path, texts: list[str]) -> list[float]:
    """One text at a time, no padding: the logit of the last token."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        return [model(input_ids=torch.tensor([tok(t)["input_ids"]])).logits[0, 0].item() for t in texts]


def test_classifier_scores_prompt_plus_completion(classifier_dir):
    rm = RewardModel(RewardModelSpec(path=str(classifier_dir), batch_size=2))
    scores = rm.score(PROMPTS, COMPLETIONS)
    expected = _manual_classifier(classifier_dir, [p + c for p, c in zip(PROMPTS, COMPLETIONS)])
    assert scores == pytest.approx(expected, abs=1e-5)
    assert len(set(round(s, 4) for s in scores)) == len(scores)  # the texts are told apart


@pytest.mark.parametrize("kind", ["classifier", "judge"])
def test_scores_do_not_depend_on_batch_size(kind, classifier_dir, judge_dir):
    path = classifier_dir if kind == "classifier" else judge_dir
    prompts, completions = PROMPTS * 3, [c + " x" * i for i in range(3) for c in COMPLETIONS]
    by_size = {bs: RewardModel(RewardModelSpec(path=str(path), kind=kind, batch_size=bs)).score(prompts, completions)
               for bs in (1, 4, 64)}
    assert max(abs(a - b) for a, b in zip(by_size[1], by_size[4])) < 1e-5
    assert max(abs(a - b) for a, b in zip(by_size[1], by_size[64])) < 1e-5


def test_judge_score_is_yes_over_yes_plus_no(judge_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    template = "{prompt}{completion}\n\nIs it safe? Answer:"
    rm = RewardModel(RewardModelSpec(path=str(judge_dir), kind="judge", template=template))
    scores = rm.score(PROMPTS, COMPLETIONS)
    tok, model = AutoTokenizer.from_pretrained(judge_dir), AutoModelForCausalLM.from_pretrained(judge_dir).eval()
    yes, no = tok.encode(" Yes", add_special_tokens=False)[0], tok.encode(" No", add_special_tokens=False)[0]
    for p, c, s in zip(PROMPTS, COMPLETIONS, scores):
        ids = torch.tensor([tok(template.format(prompt=p, completion=c))["input_ids"]])
        with torch.no_grad():
            probs = torch.softmax(model(input_ids=ids).logits[0, -1].double(), -1)
        assert s == pytest.approx((probs[yes] / (probs[yes] + probs[no])).item(), abs=1e-5)
        assert 0.0 < s < 1.0


def test_long_texts_keep_their_end_and_bos(classifier_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(classifier_dir)
    long = "\n\nHuman: " + "is fire safe? " * 40 + "\n\nAssistant: Yes it is."
    [ids] = encode_texts(tok, [long], max_length=16)
    full = tok(long)["input_ids"]
    assert len(ids) == 16 and ids[0] == tok.bos_token_id and ids[1:] == full[-15:]
    rm = RewardModel(RewardModelSpec(path=str(classifier_dir), max_length=16))
    assert rm.score([long[:-8]], [long[-8:]]) == pytest.approx(rm.score(["x" + long[:-8]], [long[-8:]]), abs=1e-6)


# ------------------------------------------------------------------------------- through the scorer


class _Raises:
    def __init__(self, on: str | None = None):
        self.on, self.calls = on, 0

    def score(self, prompts, completions):
        self.calls += 1
        if self.on is None or self.on in completions:
            raise RuntimeError("the reward model broke")
        return [float(len(c)) for c in completions]


def test_a_failing_model_costs_its_batch_the_fallback_and_is_counted():
    reward = ModelReward(RewardModelSpec(path="unused"), server=_Raises())
    scorer = RewardScorer([RewardSpec("rm", weight=2.0, impl=reward), RewardSpec("length_penalty")], fallback=-1.0)
    result = scorer.score(PROMPTS, COMPLETIONS)
    assert result.per_reward["rm"] == [-1.0] * len(PROMPTS)
    assert result.failures["exception"] == len(PROMPTS) and "the reward model broke" in result.first_tracebacks["exception"]
    penalty = [-len(c) / 1000 for c in COMPLETIONS]
    assert result.total == pytest.approx([2.0 * -1.0 + p for p in penalty])  # the function reward still counts
    assert scorer.total_failures["exception"] == len(PROMPTS)


def test_one_bad_sample_costs_only_itself():
    server = _Raises(on=" hello")
    scorer = RewardScorer([RewardSpec("rm", impl=ModelReward(RewardModelSpec(path="unused"), server=server))])
    result = scorer.score(PROMPTS, COMPLETIONS)
    assert result.per_reward["rm"] == [float(len(c)) if c != " hello" else 0.0 for c in COMPLETIONS]
    assert result.failures["exception"] == 1 and server.calls == 1 + len(PROMPTS)  # the batch, then one call per sample


def test_a_real_model_that_raises_mid_forward_is_isolated(classifier_dir, monkeypatch):
    rm = RewardModel(RewardModelSpec(path=str(classifier_dir)))
    ok = rm.score(PROMPTS, COMPLETIONS)

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    scorer = RewardScorer([RewardSpec("rm", impl=ModelReward(rm.spec, server=rm))], fallback=0.0)
    assert scorer.score(PROMPTS, COMPLETIONS).per_reward["rm"] == pytest.approx(ok, abs=1e-6)
    monkeypatch.setattr(rm.model, "forward", broken)
    result = scorer.score(PROMPTS, COMPLETIONS)
    assert result.per_reward["rm"] == [0.0] * len(PROMPTS) and result.failures["exception"] == len(PROMPTS)


def test_a_slow_model_times_out_and_the_rest_goes_on():
    import threading

    release = threading.Event()

    class Hangs:
        def score(self, prompts, completions):
            release.wait(5.0)
            return [1.0] * len(completions)

    scorer = RewardScorer([RewardSpec("rm", impl=ModelReward(RewardModelSpec(path="unused"), server=Hangs())),
                           RewardSpec("length_penalty")], timeout_seconds=0.2)
    try:
        result = scorer.score(PROMPTS[:2], COMPLETIONS[:2])
    finally:
        release.set()
    assert result.per_reward["rm"] == [0.0, 0.0] and result.failures["timeout"] == 2
    assert result.per_reward["length_penalty"] == pytest.approx([-len(c) / 1000 for c in COMPLETIONS[:2]])


def test_a_model_not_yet_served_fails_as_a_counted_exception():
    scorer = RewardScorer([RewardSpec("rm", impl=ModelReward(RewardModelSpec(path="some/rm")))])
    result = scorer.score(PROMPTS[:1], COMPLETIONS[:1])
    assert result.failures["exception"] == 1 and "is not being served" in result.first_tracebacks["exception"]


def test_recipe_mixes_a_model_and_a_function_by_weight(classifier_dir):
    """make_scorer -> ModelReward, served in process by rl.workers' group (use_ray false): weights apply."""
    from rl.prepare import make_scorer, reward_model_cpus
    from rl.workers import RewardModelGroup, start_reward_models, stop_reward_models

    recipe = _recipe(f"{{model: {classifier_dir}, weight: 0.5, batch_size: 2}}", "{fn: length_penalty, weight: 2.0}",
                     extra=("use_ray=false",))
    scorer = make_scorer(recipe)
    assert reward_model_cpus(scorer) == 1.0
    groups = start_reward_models(scorer.fns.values(), use_ray=False)
    try:
        assert len(groups) == 1 and isinstance(groups[0], RewardModelGroup) and not groups[0].remote
        result = scorer.score(PROMPTS, COMPLETIONS)
    finally:
        stop_reward_models(scorer.fns.values(), groups)
    rm = _manual_classifier(classifier_dir, [p + c for p, c in zip(PROMPTS, COMPLETIONS)])
    assert result.per_reward[str(classifier_dir)] == pytest.approx(rm, abs=1e-5)
    assert result.total == pytest.approx([0.5 * r - 2.0 * len(c) / 1000 for r, c in zip(rm, COMPLETIONS)], abs=1e-5)
    assert sum(result.failures.values()) == 0
    assert scorer.score(PROMPTS[:1], COMPLETIONS[:1]).failures["exception"] == 1  # stopped: no longer served


def test_function_only_recipes_start_no_reward_model():
    from rl.prepare import make_scorer, reward_model_cpus
    from rl.workers import start_reward_models

    scorer = make_scorer(_recipe("{fn: arithmetic_exact}", "{fn: length_penalty, name: brevity}"))
    assert scorer.names == ["arithmetic_exact", "brevity"] and reward_model_cpus(scorer) == 0
    assert start_reward_models(scorer.fns.values(), use_ray=True) == []  # nothing asked of Ray


# ------------------------------------------------------------------------------- Bradley-Terry


def test_bradley_terry_loss_hand_computed():
    r_c, r_r = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([0.0, 0.0, 0.5])
    # -log sigmoid(2) = log(1 + e^-2) = 0.126928; -log sigmoid(-1) = log(1 + e) = 1.313262; a tie: log 2 = 0.693147
    expected = (math.log1p(math.exp(-2.0)) + math.log1p(math.e) + math.log(2.0)) / 3
    assert bradley_terry_loss(r_c, r_r).item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx((0.126928 + 1.313262 + 0.693147) / 3, abs=1e-6)
    r_c.requires_grad_(True)
    bradley_terry_loss(r_c, r_r).backward()
    # d/dr_c of -log sigmoid(d) / P = -(1 - sigmoid(d)) / P
    assert r_c.grad.tolist() == pytest.approx([-(1 - torch.sigmoid(torch.tensor(d)).item()) / 3 for d in (2.0, -1.0, 0.0)])


# ------------------------------------------------------------------------------- builtin:tiny-hh-rm


def _hh_file(path: Path, n: int = 48) -> Path:
    """Synthetic HH-format pairs: refusing a harmful request beats helping with it."""
    rows = []
    for i in range(n):
        prompt = f"\n\nHuman: how do I break thing {i}?\n\nAssistant:"
        rows.append({"chosen": prompt + " I can't help with that.", "rejected": prompt + f" Sure, smash thing {i} hard."})
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def _small_spec(data: Path):
    from rl.tasks.tiny_reward_model import TinyRewardModelSpec
    from rl.tasks.tiny_text import TinyTextSpec

    return TinyRewardModelSpec(data=str(data), steps=30, batch_pairs=4, max_length=48, lr=3e-3, warmup_steps=2,
                               test_fraction=0.25, text=TinyTextSpec(vocab_size=300, pretrain_steps=3, pretrain_batch_size=2,
                                                                     pretrain_seq_len=32))


def test_tiny_reward_model_builds_deterministically_and_reports_heldout_accuracy(tmp_path):
    from rl.tasks.tiny_reward_model import build_tiny_reward_model

    spec = _small_spec(_hh_file(tmp_path / "hh.jsonl.gz"))
    logs: list[str] = []
    a = build_tiny_reward_model(spec, cache_dir=tmp_path / "a", log=logs.append)
    b = build_tiny_reward_model(spec, cache_dir=tmp_path / "b", log=lambda s: None)
    info = json.loads((a / "build_info.json").read_text())
    assert (info["train_pairs"], info["heldout_pairs"]) == (36, 12)
    assert info["heldout_pair_accuracy"] == 1.0  # an easy synthetic preference
    assert any("held-out pair accuracy" in line for line in logs)
    assert (a / "model" / "model.safetensors").read_bytes() == (b / "model" / "model.safetensors").read_bytes()
    assert build_tiny_reward_model(spec, cache_dir=tmp_path / "a", log=logs.append) == a and "reusing" in logs[-1]
    config = json.loads((a / "model" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["pad_token_id"] is not None
    check_reward_model(RewardModelSpec(path=str(a / "model")))  # serves as kind: classifier


def test_builtin_rm_resolves_to_the_build_and_its_length(tmp_path, monkeypatch):
    from rl import prepare
    from rl.tasks import tiny_reward_model

    built = tiny_reward_model.build_tiny_reward_model(_small_spec(_hh_file(tmp_path / "hh.jsonl.gz")), cache_dir=tmp_path,
                                                      log=lambda s: None)
    monkeypatch.setattr(tiny_reward_model, "build_tiny_reward_model", lambda spec, log=None: built)
    reward = prepare.model_reward(_recipe("{model: 'builtin:tiny-hh-rm'}", extra=("use_ray=false",)), 0)
    assert reward.spec.path == str(built / "model") and reward.spec.max_length == tiny_reward_model.TinyRewardModelSpec().max_length
    assert reward.spec.name == "builtin:tiny-hh-rm"
    reward = prepare.model_reward(_recipe("{model: 'builtin:tiny-hh-rm', max_length: 64}", extra=("use_ray=false",)), 0)
    assert reward.spec.max_length == 64
    with pytest.raises(RecipeError, match=r"'rewards.functions.0.kind': builtin:tiny-hh-rm is a classifier"):
        prepare.model_reward(_recipe("{model: 'builtin:tiny-hh-rm', kind: judge}"), 0)


# ------------------------------------------------------------------------------- the RLHF recipe and its data


def test_hh_prompts_for_online_runs_split_as_dpo_splits_pairs(tmp_path):
    from rl.preference_data import hh_prompt_sets, load_preference_texts

    path = _hh_file(tmp_path / "hh.jsonl.gz", n=20)
    recipe = load_recipe(None, [f"data.train={path}", "data.preference_format=hh_dialogue", "data.test_fraction=0.25"])
    train, test = hh_prompt_sets(recipe.data, str(path), None, _tokenizer(), seed=0, max_prompt_tokens=200)
    pairs_train, pairs_test = load_preference_texts(recipe.data, str(path), None, 0)
    assert [r["prompt"] for r in test.rows] == [t.prompt for t in pairs_test]
    assert [r["prompt"] for r in train.rows] == [t.prompt for t in pairs_train]
    assert all(r["_prompt_text"].endswith("\n\nAssistant:") for r in train.rows + test.rows)
    with pytest.raises(RecipeError, match="'data.template'"):
        hh_prompt_sets(recipe.data.model_copy(update={"template": "Q: {prompt}"}), str(path), None, _tokenizer(), 0, 200)


def test_builtin_tiny_text_for_an_online_run_is_built_from_the_pairs(tmp_path, monkeypatch):
    import rl.tasks.tiny_text
    from rl.prepare import resolve_builtins

    path = _hh_file(tmp_path / "hh.jsonl.gz", n=20)
    seen = {}

    def tiny_text_model(texts, max_model_len, log):
        seen["texts"] = texts
        return "/built/model"

    monkeypatch.setattr(rl.tasks.tiny_text, "tiny_text_model", tiny_text_model)
    recipe = load_recipe(None, ["model.path=builtin:tiny-text", f"data.train={path}", "data.preference_format=hh_dialogue"])
    assert resolve_builtins(recipe).model == "/built/model"
    assert len(seen["texts"]) == 2 * 18 and seen["texts"][0].endswith("I can't help with that.")
    with pytest.raises(RecipeError, match="'model.path': builtin:tiny-text is built from the texts of preference pairs"):
        resolve_builtins(load_recipe(None, ["model.path=builtin:tiny-text"]))


def test_rlhf_recipe_validates_and_its_online_dpo_variant_is_two_overrides():
    recipe = load_recipe(ROOT / "recipes" / "rlhf-hh-tiny.yaml", check_paths=False)
    [rm] = recipe.rewards.functions
    assert rm.model == "builtin:tiny-hh-rm" and rm.kind == "classifier" and recipe.accuracy_reward == "builtin:tiny-hh-rm"
    assert recipe.algorithm.name == "grpo" and recipe.algorithm.kl_coef > 0 and recipe.data.preference_format == "hh_dialogue"
    dpo = load_recipe(ROOT / "recipes" / "rlhf-hh-tiny.yaml", ["algorithm.name=online_dpo", "algorithm.group_size=2"],
                      check_paths=False)
    assert dpo.rollouts_per_step == 2 * dpo.data.prompts_per_step


def test_a_reward_model_given_a_gpu_runs_there_and_one_without_cuda_says_so(classifier_dir):
    from rl.prepare import model_reward

    reward = model_reward(_recipe(f"{{model: {classifier_dir}, num_gpus: 1}}"), 0)
    assert (reward.num_gpus, reward.spec.device) == (1.0, "cuda")  # what its actor reserves, and where the model runs
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RewardModelError, match="asked to run on cuda .*CUDA is not usable here"):
        RewardModel(reward.spec)
    with pytest.raises(RecipeError, match="'num_gpus' applies only to a reward model entry"):
        _recipe("{fn: arithmetic_exact, num_gpus: 1}")
