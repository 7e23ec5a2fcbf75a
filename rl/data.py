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
    """Rows of a JSON-lines file (optionally gzipped). A malformed line names its file and line number;
    an empty file, a truncated or corrupt compressed file, or bytes that are not UTF-8 name the file."""
    import gzip
    import zlib

    opener = gzip.open if path.suffix == ".gz" else open
    rows, skipped, lineno = [], 0, 0
    try:
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
    except (EOFError, OSError, zlib.error) as e:  # gzip: "Compressed file ended before the end-of-stream marker"
        raise RecipeError(f"{path}: truncated or corrupt compressed file after line {lineno} ({e})") from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}:{lineno + 1}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not rows:
        raise RecipeError(f"{path}: no rows (the file is empty{' or every line was skipped' if skipped else ''})")
    return rows, skipped


def _is_jsonl(path: Path) -> bool:
    return path.name.endswith((".jsonl", ".jsonl.gz"))


def _load_files(files: list[Path], kind: str):
    """``datasets.load_dataset`` over files of one format; a file it cannot parse is named."""
    import datasets

    try:
        ds = datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train")
    except Exception as e:  # noqa: BLE001 - pandas/pyarrow/datasets each raise their own kinds
        for f in files if len(files) > 1 else []:  # which one: try each alone
            _load_files([f], kind)
        if "corresponds to no data" in str(e):  # datasets' words for a file without rows
            raise RecipeError(f"{files[0] if len(files) == 1 else [str(f) for f in files]}: no rows") from None
        raise RecipeError(f"{files[0] if len(files) == 1 else [str(f) for f in files]}: cannot be read as {kind} "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if ds.num_rows == 0:
        raise RecipeError(f"{files[0] if len(files) == 1 else [str(f) for f in files]}: no rows")
    return ds


def load_rows(source: str, skip_bad_lines: bool = False):
    """A ``datasets.Dataset`` from a file, a directory of files, or a ``save_to_disk`` directory.

    JSON-lines files (also inside a directory) are parsed here, line by line, so a malformed line
    is reported with its file and line number (or skipped and counted with ``skip_bad_lines``), and
    an empty or truncated file by name. Every other failure to read names the file too.
    """
    import datasets

    path = Path(source)
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()):
        ds = datasets.load_from_disk(str(path))
        return ds["train"] if isinstance(ds, datasets.DatasetDict) else ds
    files = sorted(p for p in path.iterdir() if p.suffix in _FORMATS or _is_jsonl(p)) if path.is_dir() else [path]
    if not files:
        found = sorted(p.name for p in path.iterdir())[:5]
        raise RecipeError(f"no .jsonl/.json/.parquet/.csv files in {path} (found: {found or 'nothing'})")
    kinds = {"json" if _is_jsonl(f) else _FORMATS.get(f.suffix) for f in files}
    if None in kinds or len(kinds) != 1:
        raise RecipeError(f"data files must share one format of {sorted(_FORMATS)}: {[str(f) for f in files]}")
    if all(_is_jsonl(f) for f in files):
        rows = []
        for f in files:
            part, skipped = _read_jsonl(f, skip_bad_lines)
            if skipped:
                log.warning("%s: skipped %d malformed line(s) (data.skip_bad_lines)", f, skipped)
            rows += part
        return datasets.Dataset.from_list(rows)
    return _load_files(files, kinds.pop())


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


def _check_columns(rows, cfg: DataConfig, source: str) -> None:
    """Every column the template names must be in the data (the prompt column above all)."""
    import string

    named = {f for _, f, _, _ in string.Formatter().parse(cfg.template) if f}
    missing = sorted(named - set(rows.column_names))
    if missing:
        field = "data.prompt_column" if cfg.prompt_column in missing else "data.template"
        raise RecipeError(f"recipe field '{field}': {source} has no column(s) {missing} (it has {rows.column_names})")


def load_prompt_sets(cfg: DataConfig, train_path: str, test_path: Optional[str], tokenizer, seed: int, max_prompt_tokens: int):
    """(train, held-out) prompt sets. Without a test file, ``test_fraction`` of train is held out.
    (HH dialogues: ``rl.preference_data.hh_prompt_sets``.)"""
    if cfg.preference_format == "hh_dialogue":
        raise ValueError("HH dialogues' prompt sets come from rl.preference_data.hh_prompt_sets")
    train_rows = load_rows(train_path, cfg.skip_bad_lines)
    _check_columns(train_rows, cfg, train_path)
    if test_path:
        test_rows = load_rows(test_path, cfg.skip_bad_lines)
        _check_columns(test_rows, cfg, test_path)
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

    def next_batch(self, size: Optional[int] = None) -> list[int]:
        """The next ``size`` prompts (``batch_size`` by default)."""
        size = self.batch_size if size is None else size
        out: list[int] = []
        while len(out) < size:
            order = self._order(self.epoch)
            take = order[self.position : self.position + size - len(out)]
            out.extend(take)
            self.position += len(take)
            if self.position >= self.size:
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
