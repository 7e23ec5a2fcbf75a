"""Prompts: loading (HF ``datasets``), templating, held-out split, and a resumable sampler."""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from rl.config import DataConfig, RecipeError

log = logging.getLogger("rl.data")
_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _read_jsonl(path: Path, skip_bad_lines: bool) -> tuple[list[dict], int]:
    """Rows of a JSON-lines file (optionally gzipped). A malformed line names its file and line number."""
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    rows, skipped = [], 0
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"expected a JSON object, got {type(row).__name__}")
            except ValueError as e:
                if skip_bad_lines:
                    skipped += 1
                    continue
                raise RecipeError(f"{path}:{lineno}: malformed JSON line ({e}); fix it or set data.skip_bad_lines=true") from None
            rows.append(row)
    return rows, skipped


def load_rows(source: str, skip_bad_lines: bool = False):
    """A ``datasets.Dataset`` from a file, a directory of files, or a ``save_to_disk`` directory.

    JSON-lines files are parsed here, line by line, so a malformed line is reported with its
    file and line number (or skipped and counted with ``skip_bad_lines``).
    """
    import datasets

    path = Path(source)
    if path.is_file() and (path.name.endswith(".jsonl") or path.name.endswith(".jsonl.gz")):
        rows, skipped = _read_jsonl(path, skip_bad_lines)
        if skipped:
            log.warning("%s: skipped %d malformed line(s) (data.skip_bad_lines)", path, skipped)
        if not rows:
            raise RecipeError(f"{path}: no rows")
        return datasets.Dataset.from_list(rows)
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()):
        ds = datasets.load_from_disk(str(path))
        return ds["train"] if isinstance(ds, datasets.DatasetDict) else ds
    files = sorted(p for p in path.iterdir() if p.suffix in _FORMATS) if path.is_dir() else [path]
    if not files:
        raise RecipeError(f"no .jsonl/.json/.parquet/.csv files in {path}")
    kinds = {_FORMATS.get(f.suffix) for f in files}
    if None in kinds or len(kinds) != 1:
        raise RecipeError(f"data files must share one format of {sorted(_FORMATS)}: {[str(f) for f in files]}")
    return datasets.load_dataset(kinds.pop(), data_files=[str(f) for f in files], split="train")


@dataclass
class PromptSet:
    """Rows of a dataset with their rendered prompt and its token ids."""

    rows: list[dict[str, Any]]
    prompt_token_ids: list[list[int]]

    def __len__(self) -> int:
        return len(self.rows)

    def columns(self, indices: list[int]) -> dict[str, list]:
        """The other dataset columns, aligned with ``indices`` (passed to reward functions)."""
        keys = self.rows[0].keys() if self.rows else []
        return {k: [self.rows[i][k] for i in indices] for k in keys}

    def score(self, scorer, indices: list[int], completions: list[str]):
        """Score completions of the rows at ``indices``: rendered prompts plus the other columns."""
        cols = self.columns(indices)
        texts = cols.pop("_prompt_text")
        return scorer.score(texts, completions, cols)


def render_prompt(row: dict, cfg: DataConfig, tokenizer) -> str:
    try:
        user = cfg.template.format(**row)
    except KeyError as e:
        raise RecipeError(f"recipe field 'data.template' uses column {e} which the data does not have (columns: {sorted(row)})") from None
    use_chat = cfg.chat_template == "always" or (cfg.chat_template == "auto" and getattr(tokenizer, "chat_template", None))
    if not use_chat:
        return user
    messages = ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []) + [{"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def build_prompt_set(rows, cfg: DataConfig, tokenizer, max_prompt_tokens: int) -> PromptSet:
    rows = [dict(r) for r in rows]
    texts = [render_prompt(r, cfg, tokenizer) for r in rows]
    # A chat template already contains the special tokens it wants.
    add_special = not (cfg.chat_template == "always" or (cfg.chat_template == "auto" and getattr(tokenizer, "chat_template", None)))
    ids = tokenizer(texts, add_special_tokens=add_special)["input_ids"]
    keep = [i for i, x in enumerate(ids) if 0 < len(x) <= max_prompt_tokens]
    if not keep:
        raise RecipeError(f"no prompt fits in {max_prompt_tokens} tokens (rollout.max_model_len - rollout.max_new_tokens)")
    for r, t in zip(rows, texts):
        r["_prompt_text"] = t
    return PromptSet(rows=[rows[i] for i in keep], prompt_token_ids=[ids[i] for i in keep])


def load_prompt_sets(cfg: DataConfig, train_path: str, test_path: Optional[str], tokenizer, seed: int, max_prompt_tokens: int):
    """(train, held-out) prompt sets. Without a test file, ``test_fraction`` of train is held out."""
    train_rows = load_rows(train_path, cfg.skip_bad_lines)
    if cfg.prompt_column not in train_rows.column_names and "{" + cfg.prompt_column + "}" in cfg.template:
        raise RecipeError(f"recipe field 'data.prompt_column': column '{cfg.prompt_column}' not in {train_rows.column_names}")
    if test_path:
        test_rows = load_rows(test_path, cfg.skip_bad_lines)
    else:
        split = train_rows.train_test_split(test_size=cfg.test_fraction, seed=seed)
        train_rows, test_rows = split["train"], split["test"]
    test_rows = test_rows.select(range(min(len(test_rows), cfg.max_test_examples)))
    if cfg.max_train_examples:
        train_rows = train_rows.select(range(min(len(train_rows), cfg.max_train_examples)))
    return (
        build_prompt_set(train_rows, cfg, tokenizer, max_prompt_tokens),
        build_prompt_set(test_rows, cfg, tokenizer, max_prompt_tokens),
    )


class PromptSampler:
    """Draws ``batch_size`` prompt indices per step: a fresh seeded permutation each epoch.

    Its whole state is ``(epoch, position)``, so a resumed run draws exactly the prompts an
    uninterrupted one would have drawn.
    """

    def __init__(self, size: int, batch_size: int, seed: int, shuffle: bool = True):
        if size == 0:
            raise RecipeError("the training set is empty")
        self.size, self.batch_size, self.seed, self.shuffle = size, batch_size, seed, shuffle
        self.epoch, self.position = 0, 0

    def _order(self, epoch: int) -> list[int]:
        order = list(range(self.size))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_batch(self) -> list[int]:
        out: list[int] = []
        while len(out) < self.batch_size:
            order = self._order(self.epoch)
            take = order[self.position : self.position + self.batch_size - len(out)]
            out.extend(take)
            self.position += len(take)
            if self.position >= self.size:
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
