"""Preference pairs for offline DPO: loading, validation, held-out split, tokenization.

Two row formats (``data.preference_format``):

- ``prompt_chosen_rejected``: columns ``data.prompt_column``, ``data.chosen_column``,
  ``data.rejected_column``; the prompt and the two responses are separate strings.
- ``hh_dialogue`` (Anthropic HH-RLHF): ``chosen`` and ``rejected`` are whole dialogues
  ``"\\n\\nHuman: ... \\n\\nAssistant: ..."`` that share every turn but the last reply. The prompt
  is the text up to and including the last ``"\\n\\nAssistant:"`` inside their common prefix; the
  responses are the two remainders (each keeps its leading space, as in the dialogue).

Every row is checked before anything starts; the first few problems are reported together, each
naming the file, the row (0-based; line = row + 1 in a JSONL file) and the field:
a missing column, a value that is not a string, an empty prompt or response (zero characters;
a blank reply such as HH's ``"Assistant: "`` followed by nothing but a space is a real preference,
silence over a harmful answer, and is kept), chosen == rejected, and, for ``hh_dialogue``,
dialogues whose common prefix holds no ``"\\n\\nAssistant:"``.

Tokenization (``tokenize_pairs``): prompt ids with the tokenizer's own special tokens (``<bos>``
for Llama-like tokenizers; a chat template when ``data.chat_template`` asks for one, in the
``prompt_chosen_rejected`` format only); each response's ids without special tokens, then
``eos``. Prompt and responses are tokenized separately, so the ids of a prompt are the same in
both halves of a pair. The whole sequence (prompt + response) is cut to ``max_len`` tokens,
which the DPO driver takes from ``rollout.max_model_len``: the prompt keeps its last tokens
(and its ``<bos>``), at least half of ``max_len`` unless it is shorter, and the responses keep
their first tokens (a cut response loses its ``eos``). A pair whose two responses become equal
by the cut carries no signal and is dropped (counted in the report).

The reference model is the initial policy, loaded from the same directory, so the reference and
policy tokenizers are the same object by construction (the recipe has no separate reference path).

Axis: P preference pairs.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from rl.config import DataConfig, RecipeError
from rl.data import build_prompt_set, load_rows
from trainer.types import PreferencePairs

HH_ASSISTANT = "\n\nAssistant:"
MAX_REPORTED_ERRORS = 5
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst")


class PreferenceDataError(RecipeError):
    """Preference data that cannot be trained on; the message names file, row and field."""


@dataclass(frozen=True)
class PreferenceText:
    """One validated pair of texts and where it came from."""

    prompt: str
    chosen: str
    rejected: str
    source: str  # file (or directory) it was read from
    row: int  # 0-based row index in ``source``


@dataclass
class TokenizeReport:
    truncated: int = 0  # pairs cut to max_len
    dropped_identical: list[int] = field(default_factory=list)  # rows whose responses became equal when cut


# ------------------------------------------------------------------------------------------ loading


def load_preference_rows(source: str, skip_bad_lines: bool = False):
    """A ``datasets.Dataset`` of raw rows: ``rl.data.load_rows`` (JSONL, also ``.jsonl.gz``, with
    malformed lines named by file:line), plus other compressed JSON(L) (``x.json.gz``,
    ``x.jsonl.xz``, ...), which HF ``datasets``' json builder decompresses by itself."""
    path = Path(source)
    compressed = path.is_file() and path.suffix in _COMPRESSED and Path(path.stem).suffix in (".jsonl", ".json")
    if compressed and not path.name.endswith(".jsonl.gz"):
        import datasets

        return datasets.load_dataset("json", data_files=[str(path)], split="train")
    return load_rows(source, skip_bad_lines)


def split_hh_dialogue(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen_response, rejected_response) of two HH dialogues sharing a prefix.

    The prompt ends with the last ``"\\n\\nAssistant:"`` of the common prefix. Raises ValueError
    (the caller adds file, row and field) when that prefix holds no such marker.

    >>> split_hh_dialogue("\\n\\nHuman: hi\\n\\nAssistant: hello", "\\n\\nHuman: hi\\n\\nAssistant: go away")
    ('\\n\\nHuman: hi\\n\\nAssistant:', ' hello', ' go away')
    """
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(HH_ASSISTANT)
    if cut < 0:
        raise ValueError(f"the two dialogues share no '{HH_ASSISTANT.strip()}' turn, so no prompt can be split off")
    end = cut + len(HH_ASSISTANT)
    return chosen[:end], chosen[end:], rejected[end:]


def validate_rows(rows, cfg: DataConfig, source: str) -> list[PreferenceText]:
    """Check every row and split it into (prompt, chosen, rejected); raises PreferenceDataError.

    ``rows`` is a ``datasets.Dataset`` (or anything with ``column_names`` and ``[column]``).
    """
    hh = cfg.preference_format == "hh_dialogue"
    fields = {"data.chosen_column": cfg.chosen_column, "data.rejected_column": cfg.rejected_column}
    if not hh:
        fields = {"data.prompt_column": cfg.prompt_column, **fields}
    columns = list(rows.column_names)
    for setting, name in fields.items():
        if name not in columns:
            raise PreferenceDataError(
                f"{source}: column '{name}' (recipe field '{setting}') not found; columns: {columns} "
                f"(data.preference_format: {cfg.preference_format})"
            )
    values = {name: rows[name] for name in fields.values()}  # column -> list
    out: list[PreferenceText] = []
    errors: list[str] = []
    for i in range(len(rows)):
        row_errors = []
        for name, col in values.items():
            v = col[i]
            if not isinstance(v, str):
                row_errors.append(f"row {i}, field '{name}': expected a string, got {type(v).__name__} {v!r:.40}")
            elif v == "":
                row_errors.append(f"row {i}, field '{name}': empty")
        if row_errors:
            errors.extend(row_errors)
            continue
        chosen, rejected = values[cfg.chosen_column][i], values[cfg.rejected_column][i]
        if chosen == rejected:
            errors.append(f"row {i}, fields '{cfg.chosen_column}'/'{cfg.rejected_column}': chosen == rejected (no preference)")
            continue
        if hh:
            try:
                prompt, chosen, rejected = split_hh_dialogue(chosen, rejected)
            except ValueError as e:
                errors.append(f"row {i}, fields '{cfg.chosen_column}'/'{cfg.rejected_column}': {e}")
                continue
            empty = [
                f"row {i}, field '{name}': empty response (the dialogue ends at '{HH_ASSISTANT.strip()}')"
                for name, resp in ((cfg.chosen_column, chosen), (cfg.rejected_column, rejected))
                if resp == ""
            ]
            if empty:
                errors.extend(empty)
                continue
        else:
            prompt = values[cfg.prompt_column][i]
        out.append(PreferenceText(prompt=prompt, chosen=chosen, rejected=rejected, source=source, row=i))
    if errors:
        shown = "\n  ".join(errors[:MAX_REPORTED_ERRORS])
        more = f"\n  ... and {len(errors) - MAX_REPORTED_ERRORS} more" if len(errors) > MAX_REPORTED_ERRORS else ""
        raise PreferenceDataError(
            f"{source}: {len(errors)} problem(s) in the preference data (rows are 0-based; JSONL line = row + 1):\n  {shown}{more}"
        )
    if not out:
        raise PreferenceDataError(f"{source}: no preference pairs")
    return out


def load_preference_texts(
    cfg: DataConfig, train_path: str, test_path: Optional[str], seed: int
) -> tuple[list[PreferenceText], list[PreferenceText]]:
    """(train, held-out) validated pairs. Without ``test_path``, a seeded ``test_fraction`` of
    train is held out (at least one pair each side). Held-out is capped at ``max_test_examples``,
    train (after the split, as for GRPO prompts) at ``max_train_examples``."""
    train = validate_rows(load_preference_rows(train_path, cfg.skip_bad_lines), cfg, train_path)
    if test_path:
        test = validate_rows(load_preference_rows(test_path, cfg.skip_bad_lines), cfg, test_path)
    else:
        if len(train) < 2:
            raise PreferenceDataError(f"{train_path}: {len(train)} pair(s); holding out a test split needs at least 2 (or set data.test)")
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        n_test = min(len(train) - 1, max(1, round(cfg.test_fraction * len(train))))
        test = [train[i] for i in sorted(order[:n_test])]
        train = [train[i] for i in sorted(order[n_test:])]
    if cfg.max_train_examples:
        train = train[: cfg.max_train_examples]
    return train, test[: cfg.max_test_examples]


def training_texts(texts: Sequence[PreferenceText]) -> list[str]:
    """prompt + chosen and prompt + rejected of every pair: what ``builtin:tiny-text`` learns from."""
    return [t.prompt + resp for t in texts for resp in (t.chosen, t.rejected)]


# ------------------------------------------------------------------------------------------ tokens


def uses_chat_template(cfg: DataConfig, tokenizer) -> bool:
    """A chat template wraps the prompt only in the prompt_chosen_rejected format (HH dialogues
    carry their own turn markers)."""
    if cfg.preference_format == "hh_dialogue":
        return False
    return cfg.chat_template == "always" or (cfg.chat_template == "auto" and bool(getattr(tokenizer, "chat_template", None)))


def _truncate(p: list[int], c: list[int], r: list[int], max_len: int, bos_id: Optional[int]):
    longest = max(len(c), len(r))
    if len(p) + longest <= max_len:
        return p, c, r, False
    keep = max(max_len - longest, min(len(p), max_len // 2))  # prompt tokens kept (its end)
    if keep < len(p):
        if bos_id is not None and p and p[0] == bos_id and keep >= 2:
            p = [p[0]] + p[len(p) - keep + 1 :]
        else:
            p = p[len(p) - keep :]
    budget = max_len - len(p)
    return p, c[:budget], r[:budget], True


def tokenize_pairs(
    texts: Sequence[PreferenceText], tokenizer, max_len: int, cfg: Optional[DataConfig] = None
) -> tuple[PreferencePairs, TokenizeReport]:
    """Token ids of every pair, each sequence cut to ``max_len`` (see the module docstring)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise PreferenceDataError("the tokenizer has no eos token; DPO responses end with one")
    chat = cfg is not None and uses_chat_template(cfg, tokenizer)
    prompts = [t.prompt for t in texts]
    if chat:
        system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
        prompts = [
            tokenizer.apply_chat_template(system + [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
    # A chat template already holds the special tokens it wants.
    # verbose=False: no "longer than model_max_length" warning; sequences are cut to max_len below.
    prompt_ids = tokenizer(prompts, add_special_tokens=not chat, verbose=False)["input_ids"]
    chosen_ids = tokenizer([t.chosen for t in texts], add_special_tokens=False, verbose=False)["input_ids"]
    rejected_ids = tokenizer([t.rejected for t in texts], add_special_tokens=False, verbose=False)["input_ids"]
    pairs = PreferencePairs([], [], [], [])
    report = TokenizeReport()
    for t, p, c, r in zip(texts, prompt_ids, chosen_ids, rejected_ids):
        if not p:
            raise PreferenceDataError(f"{t.source}: row {t.row}, prompt: no tokens (the tokenizer adds no <bos>, the prompt is empty)")
        p, c, r, cut = _truncate(list(p), list(c) + [eos], list(r) + [eos], max_len, tokenizer.bos_token_id)
        report.truncated += cut
        if c == r:
            report.dropped_identical.append(t.row)
            continue
        pairs.prompt_ids.append(p)
        pairs.chosen_ids.append(c)
        pairs.rejected_ids.append(r)
        pairs.rows.append(t.row)
    if not len(pairs):
        raise PreferenceDataError(
            f"{texts[0].source if texts else 'data'}: every pair's responses are equal within {max_len} tokens "
            "(raise rollout.max_model_len)"
        )
    return pairs, report


def hh_prompt_sets(cfg: DataConfig, train_path: str, test_path: Optional[str], tokenizer, seed: int, max_prompt_tokens: int):
    """(train, held-out) prompt sets of HH dialogues (``data.preference_format: hh_dialogue``): the prompts are
    the dialogues' shared turns up to the last ``Assistant:``, split and held out exactly as offline DPO splits
    the pairs (``load_preference_texts``); each row keeps ``chosen`` / ``rejected`` replies as columns."""
    if cfg.template != "{prompt}":
        raise RecipeError("recipe field 'data.template': HH dialogues carry their own turns; the prompt is the dialogue "
                          "up to the last 'Assistant:' (leave data.template at '{prompt}')")
    train, test = load_preference_texts(cfg, train_path, test_path, seed)
    rows = lambda texts: [{"prompt": t.prompt, "chosen": t.chosen, "rejected": t.rejected} for t in texts]  # noqa: E731
    raw = cfg.model_copy(update={"chat_template": "never"})  # as offline DPO: the dialogue is the whole prompt
    return (build_prompt_set(rows(train), raw, tokenizer, max_prompt_tokens),
            build_prompt_set(rows(test), raw, tokenizer, max_prompt_tokens))
