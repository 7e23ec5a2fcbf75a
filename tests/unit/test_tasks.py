"""The embedded default: synthetic arithmetic task and the cached tiny-model build (CPU, fast)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from rl.tasks import arithmetic
from rl.tasks.cache import default_cache_dir
from rl.tasks.tiny_model import (
    TinyModelSpec,
    build_model,
    build_tiny_model,
    build_tokenizer,
    encode_sft_batch,
    load_build_info,
    run_sft,
)

# A spec small enough to build in a second or two.
TINY = TinyModelSpec(
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    intermediate_size=64,
    sft_steps=20,
    sft_target_accuracy=0.0,  # fixed step count (the default stops on accuracy)
    sft_batch_size=16,
    n_train_rows=200,
    n_test_rows=50,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    logs: list[str] = []
    path = build_tiny_model(TINY, cache_dir=cache, log=logs.append)
    return cache, path, logs


# -- task --------------------------------------------------------------------------------------


def test_problem_format_and_answers():
    for p in arithmetic.make_problems(200, seed=0, split="train"):
        a, b = p["prompt"].removesuffix("=").split("+")
        assert p["prompt"].endswith("=")
        assert int(p["answer"]) == int(a) + int(b)
        assert 0 <= int(a) < 100 and 0 <= int(b) < 100


def test_problems_deterministic_by_seed():
    a = arithmetic.make_problems(100, seed=3, split="train")
    assert a == arithmetic.make_problems(100, seed=3, split="train")
    assert a != arithmetic.make_problems(100, seed=4, split="train")


def test_train_test_disjoint_by_identity():
    sizes = arithmetic.split_size(digits=2, test_fraction=0.1)
    assert sizes["train"] + sizes["test"] == 100 * 100
    assert 0.05 < sizes["test"] / 10_000 < 0.15
    test = {p["prompt"] for p in arithmetic.make_problems(sizes["test"], seed=0, split="test")}
    assert len(test) == sizes["test"]  # distinct while the split has enough problems
    for seed in (0, 1):  # whatever seed each side was drawn with
        train = {p["prompt"] for p in arithmetic.make_problems(5000, seed=seed, split="train")}
        assert not train & test


def test_make_problems_past_split_size_and_large_digits():
    sizes = arithmetic.split_size(digits=1, test_fraction=0.2)
    rows = arithmetic.make_problems(sizes["test"] * 2 + 1, seed=0, split="test", digits=1, test_fraction=0.2)
    assert len(rows) == sizes["test"] * 2 + 1
    big = arithmetic.make_problems(50, seed=0, split="test", digits=6)  # rejection-sampled
    assert len({p["prompt"] for p in big}) == 50
    assert all(arithmetic.in_test_split(p["prompt"], 0.1) for p in big)
    with pytest.raises(ValueError):
        arithmetic.make_problems(1, seed=0, split="valid")


def test_is_correct():
    assert arithmetic.is_correct("46", "46")
    assert arithmetic.is_correct(" 46 ", "46")
    assert not arithmetic.is_correct("4 6", "46")
    assert not arithmetic.is_correct("", "46")


# -- tokenizer ---------------------------------------------------------------------------------


def test_tokenizer_one_token_per_char_and_no_specials_added():
    tok = build_tokenizer()
    for prompt in ["12+34=", "0+0=", "99+99="]:
        ids = tok(prompt)["input_ids"]
        assert ids == tok(prompt, add_special_tokens=False)["input_ids"]
        assert tok.convert_ids_to_tokens(ids) == list(prompt)
    assert tok.bos_token == "<bos>" and tok.eos_token == "<eos>" and tok.pad_token == "<pad>"


def test_tokenizer_round_trip():
    tok = build_tokenizer()
    for text in ["46", "198", "0", "12+34=46", "1 2"]:
        ids = tok(text)["input_ids"]
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text


def test_sft_batch_labels_cover_answer_and_eos_only():
    tok = build_tokenizer()
    batch = encode_sft_batch(tok, [{"prompt": "1+2=", "answer": "3"}, {"prompt": "12+34=", "answer": "46"}])
    labels = batch["labels"]
    assert labels[0].tolist() == [-100] * 4 + [tok.convert_tokens_to_ids("3"), tok.eos_token_id] + [-100] * 3
    assert (labels[1] != -100).sum() == 3  # "4", "6", <eos>
    assert batch["attention_mask"][0].tolist() == [1] * 6 + [0] * 3


# -- the cached build --------------------------------------------------------------------------


def test_build_layout(built):
    _, path, _ = built
    assert path.name == f"{TINY.name}-{TINY.hash12}"
    for rel in ["model/config.json", "model/tokenizer.json", "data/train.jsonl", "data/test.jsonl", "build_info.json"]:
        assert (path / rel).is_file(), rel
    info = load_build_info(path)
    assert info["spec"] == dataclasses.asdict(TINY)
    assert 0.0 <= info["sft_test_accuracy"] <= 1.0
    assert info["build_seconds"] >= 0
    train = [json.loads(line) for line in open(path / "data/train.jsonl")]
    test = [json.loads(line) for line in open(path / "data/test.jsonl")]
    assert len(train) == TINY.n_train_rows and len(test) == TINY.n_test_rows
    assert set(train[0]) == {"prompt", "answer"}
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    # No temp dirs are left behind.
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_build_is_reused(built):
    cache, path, logs = built
    assert any("building" in line for line in logs)
    stamp = os.stat(path / "build_info.json").st_mtime_ns
    logs2: list[str] = []
    again = build_tiny_model(TINY, cache_dir=cache, log=logs2.append)
    assert again == path
    assert any("reusing" in line for line in logs2) and not any("sft step" in line for line in logs2)
    assert os.stat(path / "build_info.json").st_mtime_ns == stamp


def test_build_key_changes_with_spec():
    other = TinyModelSpec(**{**TINY.__dict__, "sft_lr": 2e-3})
    assert other.hash12 != TINY.hash12
    assert TinyModelSpec().hash12 == TinyModelSpec().hash12


def test_model_dir_loads_with_auto_classes(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, path, _ = built
    tok = AutoTokenizer.from_pretrained(path / "model")
    model = AutoModelForCausalLM.from_pretrained(path / "model")
    assert next(model.parameters()).dtype == torch.float32
    assert model.config.eos_token_id == tok.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.config.bos_token_id == tok.bos_token_id
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert tok("12+34=")["input_ids"] == build_tokenizer()("12+34=")["input_ids"]
    ids = torch.tensor([tok("12+34=")["input_ids"]])
    out = model.generate(ids, max_new_tokens=TINY.max_new_tokens, do_sample=False)
    text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert " " not in text  # characters join with no separator


def test_stale_temp_dir_is_cleaned_and_half_build_is_not_reused(tmp_path):
    parent = tmp_path / "tiny"
    parent.mkdir()
    dirname = f"{TINY.name}-{TINY.hash12}"
    stale = parent / f".tmp-{dirname}-999999999-abc"  # a pid that cannot be running
    stale.mkdir()
    (parent / dirname).mkdir()  # a directory with no build_info.json is not a build
    path = build_tiny_model(TINY, cache_dir=tmp_path, log=lambda s: None)
    assert (path / "build_info.json").is_file()
    assert not stale.exists()


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("RL_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("RL_CACHE_DIR")
    assert default_cache_dir().name == "rl-post-train"


def test_sft_loss_falls_and_on_step_can_stop_it():
    tok = build_tokenizer()
    spec = TinyModelSpec(**{**dataclasses.asdict(TINY), "sft_steps": 30, "sft_lr": 3e-3})
    model = build_model(spec, tok)
    seen: list[int] = []
    losses = run_sft(model, tok, spec, log=lambda s: None, on_step=lambda step, m: seen.append(step) or step == 25)
    assert len(losses) == 25 and seen == list(range(1, 26))
    assert sum(losses[-5:]) < sum(losses[:5])


def test_sft_target_accuracy_stops_early(tmp_path, monkeypatch):
    import rl.tasks.tiny_model as tm

    calls: list[int] = []

    def fake_accuracy(model, tokenizer, problems):
        calls.append(len(problems))
        return 0.5 if len(calls) >= 2 else 0.0

    monkeypatch.setattr(tm, "teacher_forced_accuracy", fake_accuracy)
    spec = TinyModelSpec(
        **{**dataclasses.asdict(TINY), "sft_target_accuracy": 0.3, "sft_eval_every": 5, "sft_eval_rows": 16}
    )
    assert spec.name.endswith("-acc30")
    info = load_build_info(build_tiny_model(spec, cache_dir=tmp_path, log=lambda s: None))
    assert info["sft_steps_run"] == 10  # evaluated at 5 (0.0) and 10 (0.5 >= 0.3)
    assert info["sft_train_split_accuracy"] == 0.5
    assert calls == [16, 16]


def test_teacher_forced_accuracy_equals_greedy_accuracy():
    from rl.tasks.tiny_model import greedy_accuracy, teacher_forced_accuracy

    kw = {"digits": 1, "test_fraction": 0.3}
    spec = TinyModelSpec(
        **{**dataclasses.asdict(TINY), **kw, "sft_steps": 60, "sft_lr": 3e-3, "sft_batch_size": 32}
    )
    tok = build_tokenizer()
    model = build_model(spec, tok)
    run_sft(model, tok, spec, log=lambda s: None)
    rows = arithmetic.make_problems(100, seed=0, split="train", **kw)
    acc = teacher_forced_accuracy(model, tok, rows)
    assert acc > 0
    assert acc == pytest.approx(greedy_accuracy(model, tok, rows, spec.max_new_tokens))


def test_build_race_loser_discards_its_copy(tmp_path, monkeypatch):
    """Two processes building the same spec: the second rename fails and uses the winner's."""
    import rl.tasks.tiny_model as tm

    real_build_into = tm._build_into
    final = tmp_path / "tiny" / f"{TINY.name}-{TINY.hash12}"

    def build_then_lose_race(spec, out, log):
        info = real_build_into(spec, out, log)
        final.mkdir()  # the other process finishes first
        (final / "winner").write_text("")
        (final / "build_info.json").write_text(json.dumps(info))
        return info

    monkeypatch.setattr(tm, "_build_into", build_then_lose_race)
    logs: list[str] = []
    path = build_tiny_model(TINY, cache_dir=tmp_path, log=logs.append)
    assert path == final and (path / "winner").exists()
    assert any("another process" in line for line in logs)
    assert [p.name for p in final.parent.iterdir()] == [final.name]  # the loser's copy is gone


def test_two_builds_in_fresh_caches_are_identical(tmp_path):
    """The embedded model's build (SFT on one thread, stopped by an accuracy check at fixed steps)
    gives the same weights in two fresh caches, so every user starts RL from the same model."""
    import hashlib

    from rl.tasks.tiny_model import TinyModelSpec, build_tiny_model

    spec = TinyModelSpec(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, sft_steps=60,
                         n_train_rows=256, n_test_rows=32, sft_target_accuracy=0.0)
    digests, infos = [], []
    for cache in ("a", "b"):
        root = build_tiny_model(spec, cache_dir=tmp_path / cache, log=lambda s: None)
        digests.append(hashlib.sha256(next((root / "model").glob("*.safetensors")).read_bytes()).hexdigest())
        infos.append(json.loads((root / "build_info.json").read_text()))
    assert digests[0] == digests[1]
    assert infos[0]["sft_test_accuracy"] == infos[1]["sft_test_accuracy"]
    assert infos[0]["sft_final_loss"] == infos[1]["sft_final_loss"]


def test_default_model_is_the_shipped_one_on_every_machine(tmp_path, monkeypatch):
    """The default spec is not trained here: its shipped build (weights and task data, checksum-checked), the same
    on every CPU, cached under a name of its own; the data are what the spec generates; a damaged copy is refused,
    never used."""
    import hashlib

    from rl.tasks import shipped_model
    from rl.tasks.tiny_model import _write_task_data

    spec = TinyModelSpec()
    shipped = shipped_model.shipped_build("tiny", f"{spec.name}-{spec.hash12}")
    assert shipped is not None
    path = build_tiny_model(spec, cache_dir=tmp_path, log=lambda s: None)
    info = load_build_info(path)
    assert info["shipped"] and info["spec_hash"] == spec.hash12 and path.name == f"{shipped.name}-shipped"
    weights = (path / "model" / "model.safetensors").read_bytes()
    assert hashlib.sha256(weights).hexdigest() == hashlib.sha256((shipped / "model" / "model.safetensors").read_bytes()).hexdigest()
    (tmp_path / "generated").mkdir()
    _write_task_data(spec, tmp_path / "generated")
    for name in ("train.jsonl", "test.jsonl"):
        assert (path / "data" / name).read_bytes() == (tmp_path / "generated" / "data" / name).read_bytes()
    rows = [json.loads(line) for line in (path / "data" / "test.jsonl").read_text().splitlines()]
    assert len(rows) == info["sft_test_problems"]
    damaged_root = tmp_path / "damaged"
    shutil.copytree(shipped, damaged_root / "tiny" / shipped.name)
    (damaged_root / "tiny" / shipped.name / "model" / "model.safetensors").write_bytes(weights[:-1] + bytes([weights[-1] ^ 1]))
    monkeypatch.setattr(shipped_model, "SHIPPED_ROOT", damaged_root)
    with pytest.raises(RuntimeError, match="sha256"):
        build_tiny_model(spec, cache_dir=tmp_path / "other", log=lambda s: None)


HH_PAIRS = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"


def test_the_rlhf_recipes_models_are_the_shipped_builds(tmp_path, monkeypatch):
    """builtin:tiny-hh-rm (and the builtin:tiny-text it starts from) for the HH harmless-base test file are copied
    from the package, not trained: their cache names (the hash of spec, pairs and format) are the shipped builds'
    names. A damaged shipped file is refused, never used."""
    if not HH_PAIRS.exists():
        pytest.skip(f"HH data not found at {HH_PAIRS}")
    import hashlib

    from rl.tasks import shipped_model
    from rl.tasks.tiny_reward_model import TinyRewardModelSpec, build_tiny_reward_model

    spec = TinyRewardModelSpec(data=str(HH_PAIRS))
    rm = build_tiny_reward_model(spec, cache_dir=tmp_path, log=lambda s: None)
    text = next((tmp_path / "tiny-text").iterdir())
    for built in (rm, text):
        assert built.name.endswith("-shipped")
        shipped = shipped_model.SHIPPED_ROOT / built.parent.name / built.name.removesuffix("-shipped")
        assert (shipped / shipped_model.CHECKSUMS).is_file(), f"{built.name} was trained here, not shipped"
        assert json.loads((built / "build_info.json").read_text())["shipped"] is True
        weights = built / "model" / "model.safetensors"
        assert hashlib.sha256(weights.read_bytes()).hexdigest() == hashlib.sha256(
            (shipped / "model" / "model.safetensors").read_bytes()).hexdigest()

    damaged_root = tmp_path / "damaged"
    shutil.copytree(shipped_model.SHIPPED_ROOT / "tiny-rm", damaged_root / "tiny-rm")
    shutil.copytree(shipped_model.SHIPPED_ROOT / "tiny-text", damaged_root / "tiny-text")
    weights = damaged_root / "tiny-rm" / rm.name.removesuffix("-shipped") / "model" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    monkeypatch.setattr(shipped_model, "SHIPPED_ROOT", damaged_root)
    with pytest.raises(RuntimeError, match="sha256"):
        build_tiny_reward_model(spec, cache_dir=tmp_path / "other", log=lambda s: None)
