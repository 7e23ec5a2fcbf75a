"""Preference pairs for offline DPO: HH splitting, validation messages, tokenization (fast, CPU)."""

from __future__ import annotations

import gzip
import json

import pytest

from rl.config import DataConfig, RecipeError
from rl.preference_data import (
    PreferenceDataError,
    PreferenceText,
    load_preference_rows,
    load_preference_texts,
    split_hh_dialogue,
    tokenize_pairs,
    validate_rows,
)

HH = DataConfig(preference_format="hh_dialogue")
PCR = DataConfig(preference_format="prompt_chosen_rejected")


def _write(path, rows):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def _rows(records):
    """A tiny stand-in for a datasets.Dataset: column_names and row[column] -> list."""

    class Rows:
        column_names = sorted({k for r in records for k in r})

        def __len__(self):
            return len(records)

        def __getitem__(self, col):
            return [r.get(col) for r in records]

    return Rows()


# ------------------------------------------------------------------------------- hh dialogues


def test_hh_split_multi_turn_keeps_shared_turns_in_the_prompt():
    shared = "\n\nHuman: How do I pick a lock?\n\nAssistant: Why do you ask?\n\nHuman: I'm locked out.\n\nAssistant:"
    prompt, chosen, rejected = split_hh_dialogue(shared + " Call a locksmith.", shared + " Use a bobby pin.")
    assert prompt == shared
    assert (chosen, rejected) == (" Call a locksmith.", " Use a bobby pin.")


def test_hh_split_when_replies_share_their_first_words():
    # The common prefix runs into the last reply ("I"); the prompt still ends at "Assistant:".
    a = "\n\nHuman: hi\n\nAssistant: I can help."
    b = "\n\nHuman: hi\n\nAssistant: I won't."
    assert split_hh_dialogue(a, b) == ("\n\nHuman: hi\n\nAssistant:", " I can help.", " I won't.")


def test_hh_split_when_one_dialogue_has_an_extra_turn():
    a = "\n\nHuman: hi\n\nAssistant: hello"
    b = a + "\n\nHuman: and?\n\nAssistant: bye"
    prompt, chosen, rejected = split_hh_dialogue(a, b)
    assert prompt == "\n\nHuman: hi\n\nAssistant:"
    assert chosen == " hello" and rejected == " hello\n\nHuman: and?\n\nAssistant: bye"


def test_hh_split_without_assistant_turn_raises():
    with pytest.raises(ValueError, match="Assistant"):
        split_hh_dialogue("\n\nHuman: a", "\n\nHuman: b")


# ------------------------------------------------------------------------------- validation


GOOD_HH = {"chosen": "\n\nHuman: q\n\nAssistant: yes", "rejected": "\n\nHuman: q\n\nAssistant: no"}


@pytest.mark.parametrize(
    "bad, field, what",
    [
        ({"chosen": "\n\nHuman: q\n\nAssistant: same", "rejected": "\n\nHuman: q\n\nAssistant: same"}, "fields 'chosen'/'rejected'",
         "chosen == rejected"),
        ({"chosen": "\n\nHuman: q\n\nAssistant:", "rejected": "\n\nHuman: q\n\nAssistant: no"}, "field 'chosen'", "empty response"),
        ({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant:"}, "field 'rejected'", "empty response"),
        ({"chosen": "\n\nHuman: a", "rejected": "\n\nHuman: b"}, "fields 'chosen'/'rejected'", "no prompt can be split"),
        ({"chosen": None, "rejected": "\n\nHuman: q\n\nAssistant: no"}, "field 'chosen'", "expected a string"),
        ({"chosen": "", "rejected": "\n\nHuman: q\n\nAssistant: no"}, "field 'chosen'", "empty"),
    ],
)
def test_hh_errors_name_file_row_and_field(bad, field, what):
    with pytest.raises(PreferenceDataError) as e:
        validate_rows(_rows([GOOD_HH, GOOD_HH, bad]), HH, "hh.jsonl")
    msg = str(e.value)
    assert "hh.jsonl" in msg and f"row 2, {field}" in msg and what in msg, msg


def test_prompt_chosen_rejected_errors_name_row_and_field():
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    with pytest.raises(PreferenceDataError) as e:
        validate_rows(_rows([good, {"prompt": "", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": ""}]),
                      PCR, "f.jsonl")
    msg = str(e.value)
    assert "2 problem(s)" in msg
    assert "row 1, field 'prompt': empty" in msg and "row 2, field 'rejected': empty" in msg


def test_missing_column_names_the_recipe_field():
    with pytest.raises(PreferenceDataError) as e:
        validate_rows(_rows([{"question": "p", "chosen": "a", "rejected": "b"}]), PCR, "f.jsonl")
    msg = str(e.value)
    assert "f.jsonl" in msg and "column 'prompt'" in msg and "data.prompt_column" in msg and "question" in msg
    assert isinstance(e.value, RecipeError)  # the CLI reports it like any recipe error, before Ray starts


def test_many_errors_are_summarised():
    bad = {"chosen": "x", "rejected": "x"}
    with pytest.raises(PreferenceDataError) as e:
        validate_rows(_rows([bad] * 9), HH, "f")
    assert "9 problem(s)" in str(e.value) and "and 4 more" in str(e.value)


def test_blank_reply_is_kept():
    # HH has replies that are only a space: a real preference (silence over a harmful answer).
    texts = validate_rows(_rows([{"chosen": "\n\nHuman: q\n\nAssistant: ", "rejected": "\n\nHuman: q\n\nAssistant: no"}]), HH, "f")
    assert texts[0].chosen == " " and texts[0].rejected == " no"


# ------------------------------------------------------------------------------- files and split


def test_loads_jsonl_gz_and_holds_out_a_seeded_split(tmp_path):
    rows = [{"chosen": f"\n\nHuman: q{i}\n\nAssistant: yes", "rejected": f"\n\nHuman: q{i}\n\nAssistant: no"} for i in range(20)]
    path = _write(tmp_path / "hh.jsonl.gz", rows)
    assert len(load_preference_rows(path)) == 20
    cfg = DataConfig(preference_format="hh_dialogue", test_fraction=0.25, max_test_examples=3)
    train, test = load_preference_texts(cfg, path, None, seed=0)
    assert len(train) == 15 and len(test) == 3  # 5 held out, capped at 3
    assert not {t.row for t in train} & {t.row for t in test}
    assert load_preference_texts(cfg, path, None, seed=0) == (train, test)  # seeded
    capped = DataConfig(preference_format="hh_dialogue", test_fraction=0.25, max_test_examples=3, max_train_examples=4)
    assert load_preference_texts(capped, path, None, seed=0) == (train[:4], test)  # the same split, then the cap


def test_test_file_is_used_when_given(tmp_path):
    train = _write(tmp_path / "train.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 4)
    test = _write(tmp_path / "test.jsonl", [{"prompt": "q", "chosen": "c", "rejected": "d"}] * 2)
    tr, te = load_preference_texts(PCR, train, test, seed=0)
    assert len(tr) == 4 and [t.prompt for t in te] == ["q", "q"]


# ------------------------------------------------------------------------------- tokens


@pytest.fixture(scope="module")
def tokenizer():
    from rl.tasks.tiny_text import train_tokenizer

    corpus = ["\n\nHuman: how are you?\n\nAssistant: fine, thanks.", "hello world", "the quick brown fox"] * 20
    return train_tokenizer(corpus, vocab_size=300)


def test_tokenization_prepends_bos_and_appends_eos(tokenizer):
    text = PreferenceText("\n\nHuman: how are you?\n\nAssistant:", " fine", " bad", "f", 0)
    pairs, report = tokenize_pairs([text], tokenizer, max_len=256)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert pairs.prompt_ids[0][0] == bos and eos not in pairs.prompt_ids[0]
    assert pairs.chosen_ids[0] == tokenizer(" fine", add_special_tokens=False)["input_ids"] + [eos]
    assert pairs.rejected_ids[0] == tokenizer(" bad", add_special_tokens=False)["input_ids"] + [eos]
    assert pairs.rows == [0] and report.truncated == 0
    assert tokenizer.decode(pairs.prompt_ids[0] + pairs.chosen_ids[0], skip_special_tokens=True) == text.prompt + text.chosen


def test_truncation_keeps_prompt_end_and_bos_and_response_start(tokenizer):
    prompt = "\n\nHuman: " + "hello world " * 40 + "\n\nAssistant:"
    text = PreferenceText(prompt, " the quick brown fox", " hello hello hello", "f", 0)
    pairs, report = tokenize_pairs([text], tokenizer, max_len=24)
    p, c, r = pairs.prompt_ids[0], pairs.chosen_ids[0], pairs.rejected_ids[0]
    assert report.truncated == 1
    assert len(p) + len(c) <= 24 and len(p) + len(r) <= 24
    assert p[0] == tokenizer.bos_token_id  # the <bos> survives a left cut
    full = tokenizer(prompt)["input_ids"]
    assert p[1:] == full[len(full) - len(p) + 1 :]  # the prompt keeps its end (the last turn)
    assert c[-1] == tokenizer.eos_token_id  # short enough: not cut


def test_pairs_equal_after_truncation_are_dropped(tokenizer):
    same_start = " hello world hello world hello world"
    texts = [
        PreferenceText("\n\nHuman: hi\n\nAssistant:", same_start + " fox", same_start + " quick", "f", 0),
        PreferenceText("\n\nHuman: hi\n\nAssistant:", " fine", " bad", "f", 1),
    ]
    pairs, report = tokenize_pairs(texts, tokenizer, max_len=10)
    assert report.dropped_identical == [0] and pairs.rows == [1]


# ------------------------------------------------------------------------------- the DPO recipe


def test_dpo_recipe_validates_and_reaches_dpo():
    from pathlib import Path

    from rl.config import load_recipe
    from rl.dpo import check_dpo_recipe

    root = Path(__file__).resolve().parents[2]
    recipe = load_recipe(root / "recipes" / "dpo-hh-tiny.yaml", check_paths=False)
    assert recipe.algorithm.name == "dpo" and recipe.data.preference_format == "hh_dialogue"
    check_dpo_recipe(recipe)


@pytest.mark.parametrize(
    "override, field",
    [
        ("trainer.mini_batches=2", "trainer.mini_batches"),
        ("algorithm.kl_coef=0.1", "algorithm.kl_coef"),
        ("algorithm.dpo_loss=sigmoidd", "algorithm.dpo_loss"),
        ("model.path=builtin:tiny-arithmetic", "model.path"),
        ("data.train=builtin:arithmetic", "data.train"),
    ],
)
def test_settings_that_dpo_would_ignore_fail_naming_the_field(override, field):
    from pathlib import Path

    from rl.config import load_recipe
    from rl.dpo import check_dpo_recipe

    root = Path(__file__).resolve().parents[2]
    recipe = load_recipe(root / "recipes" / "dpo-hh-tiny.yaml", [override], check_paths=False)
    with pytest.raises(RecipeError, match=f"'{field}'"):
        check_dpo_recipe(recipe)


def test_bad_pair_stops_the_run_before_any_worker(tmp_path):
    from rl.config import load_recipe
    from rl.dpo import OfflineDPORun

    path = _write(tmp_path / "hh.jsonl", [GOOD_HH, GOOD_HH, {"chosen": GOOD_HH["chosen"], "rejected": GOOD_HH["chosen"]}])
    recipe = load_recipe(None, ["algorithm.name=dpo", "data.preference_format=hh_dialogue", f"data.train={path}",
                                "model.path=builtin:tiny-text"])
    with pytest.raises(PreferenceDataError, match="row 2, fields 'chosen'/'rejected': chosen == rejected"):
        OfflineDPORun(recipe)


# ------------------------------------------------------------------------------- builtin:tiny-text


def test_tiny_text_build_is_cached_by_spec_and_texts(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rl.tasks.tiny_text import TinyTextSpec, build_tiny_text

    texts = [f"\n\nHuman: question {i}?\n\nAssistant: answer number {i}." for i in range(40)]
    spec = TinyTextSpec(vocab_size=300, pretrain_steps=3, pretrain_batch_size=2, pretrain_seq_len=32)
    logs: list[str] = []
    first = build_tiny_text(texts, spec, cache_dir=tmp_path, log=logs.append)
    assert build_tiny_text(texts, spec, cache_dir=tmp_path, log=logs.append) == first and "reusing" in logs[-1]
    assert build_tiny_text(texts[:-1], spec, cache_dir=tmp_path, log=logs.append) != first  # the texts key the cache
    assert not list((tmp_path / "tiny-text").glob(".tmp-*"))  # written to a temp dir, then renamed
    tok = AutoTokenizer.from_pretrained(first / "model")
    model = AutoModelForCausalLM.from_pretrained(first / "model")
    assert model.config.hidden_size // model.config.num_attention_heads == 32  # vLLM CPU's smallest head size
    assert len(tok) <= 300 and tok.decode(tok(texts[0])["input_ids"], skip_special_tokens=True) == texts[0]
    assert tok("é😀")["input_ids"][0] == tok.bos_token_id and tok.unk_token_id is None  # byte-level: nothing unknown
    with pytest.raises(ValueError, match="head_dim"):
        TinyTextSpec(hidden_size=64, num_heads=4)
