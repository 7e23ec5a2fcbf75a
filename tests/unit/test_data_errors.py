"""Data a user gets wrong is an error before Ray starts, naming the file (and the field or line)."""

from __future__ import annotations

import gzip
import json

import pytest

from rl.config import DataConfig, RecipeError
from rl.data import load_prompt_sets, load_rows


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_an_empty_jsonl_file_in_a_directory_is_named(tmp_path):
    _jsonl(tmp_path / "a.jsonl", [{"prompt": "1+1=", "answer": "2"}])
    (tmp_path / "b.jsonl").write_text("")
    with pytest.raises(RecipeError, match=r"b\.jsonl: no rows \(the file is empty"):
        load_rows(str(tmp_path))


def test_a_directory_with_no_data_files_says_what_it_found(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(RecipeError, match=r"no \.jsonl/\.json/\.parquet/\.csv files in .*found: \['notes.txt'\]"):
        load_rows(str(tmp_path))


def test_mixed_formats_are_refused(tmp_path):
    _jsonl(tmp_path / "a.jsonl", [{"prompt": "x"}])
    (tmp_path / "b.csv").write_text("prompt\ny\n")
    with pytest.raises(RecipeError, match="must share one format"):
        load_rows(str(tmp_path))


def test_a_jsonl_directory_is_read_line_by_line_with_line_numbers(tmp_path):
    _jsonl(tmp_path / "a.jsonl", [{"prompt": "x"}])
    (tmp_path / "b.jsonl").write_text('{"prompt": "y"}\n{oops\n')
    with pytest.raises(RecipeError, match=r"b\.jsonl:2: malformed JSON line"):
        load_rows(str(tmp_path))
    assert load_rows(str(tmp_path), skip_bad_lines=True).num_rows == 2


def test_a_truncated_gzip_file_is_named(tmp_path):
    data = gzip.compress("".join(json.dumps({"prompt": f"{i}+1="}) + "\n" for i in range(2000)).encode())
    path = tmp_path / "train.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(RecipeError, match=r"train\.jsonl\.gz: truncated or corrupt compressed file"):
        load_rows(str(path))


def test_a_csv_with_a_bad_row_is_named(tmp_path):
    (tmp_path / "good.csv").write_text("prompt,answer\n1+1=,2\n")
    (tmp_path / "bad.csv").write_text('prompt,answer\n1+1=,2\n"2+2=,4,5,6\n3+3=,6\n')
    with pytest.raises(RecipeError, match=r"bad\.csv: cannot be read as csv"):
        load_rows(str(tmp_path))


def test_a_parquet_file_without_the_prompt_column_names_field_and_file(tmp_path):
    import datasets
    from transformers import AutoTokenizer  # noqa: F401 - load_prompt_sets stops before the tokenizer is used

    path = tmp_path / "train.parquet"
    datasets.Dataset.from_list([{"question": "1+1=", "answer": "2"}]).to_parquet(str(path))
    with pytest.raises(RecipeError, match=r"recipe field 'data.prompt_column': .*train\.parquet has no column\(s\) \['prompt'\]"):
        load_prompt_sets(DataConfig(), str(path), None, tokenizer=None, seed=0, max_prompt_tokens=32)


def test_a_template_naming_a_missing_column_names_the_template_field(tmp_path):
    path = _jsonl(tmp_path / "t.jsonl", [{"prompt": "1+1="}])
    cfg = DataConfig(template="{prompt} ({hint})")
    with pytest.raises(RecipeError, match=r"recipe field 'data.template': .*t\.jsonl has no column\(s\) \['hint'\]"):
        load_prompt_sets(cfg, str(path), None, tokenizer=None, seed=0, max_prompt_tokens=32)


def test_an_empty_parquet_file_is_named(tmp_path):
    import datasets

    path = tmp_path / "empty.parquet"
    datasets.Dataset.from_dict({"prompt": []}).to_parquet(str(path))
    with pytest.raises(RecipeError, match=r"empty\.parquet: no rows"):
        load_rows(str(path))
