"""Reward models as rewards: a classifier or a judge scores prompt + completion, batched.

A recipe entry ``{model: path/to/rm, kind: classifier | judge, ...}`` (see :mod:`rewards.config`)
becomes a :class:`ModelReward`: a callable with the reward contract
``(prompts, completions, **columns) -> list[float]``, so :class:`rewards.RewardScorer` weights it,
isolates its faults and times it exactly as it does a reward function. The call goes to whatever
serves the model: a :class:`RewardModel` in this process, or the actor group ``rl.workers``
starts around one (``RewardModelGroup``: anything with ``score(prompts, completions)``).

Two kinds (``RewardModelSpec.kind``):

- ``classifier``: an ``AutoModelForSequenceClassification`` with ``num_labels == 1`` (a
  Bradley-Terry reward model); the score is its logit on ``prompt + completion``, the text as
  the policy saw it (prompt rendered with the data template / chat template, completion
  decoded), tokenized by the reward model's own tokenizer.
- ``judge``: an ``AutoModelForCausalLM`` asked ``template.format(prompt=..., completion=...)``;
  the score is ``P(yes) / (P(yes) + P(no))`` of the next token, i.e.
  ``sigmoid(logit_yes - logit_no)``, in [0, 1]. ``yes_token`` / ``no_token`` must each be one
  token of the judge's tokenizer.

A text longer than ``max_length`` tokens keeps its end (where the completion is, and for a judge
the question) and its first special token (``<bos>``); the middle of the prompt is cut. Texts are
sorted by length and right-padded in batches of ``batch_size``; the score of a text does not
depend on the batch it was in (a causal model's last real position never attends to padding).
The classifier's score is read by the model's own pooling at the last token that is not
``pad_token_id`` (set from the tokenizer's pad or eos token when the config has none).

Bad input fails before anything starts (:func:`check_reward_model`, :class:`RewardModelError`
naming the path and what was found): not a model directory, no tokenizer, no
sequence-classification head or ``num_labels != 1`` for a classifier, not a causal LM for a
judge, yes/no answers that are not single tokens, no pad token.

This module imports no other layer and no Ray; torch and transformers load when a model does.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from rewards.config import DEFAULT_JUDGE_TEMPLATE, DEFAULT_MAX_LENGTH

__all__ = ["RewardModelError", "RewardModelSpec", "RewardModel", "ModelReward", "check_reward_model",
           "bradley_terry_loss", "encode_texts"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_DTYPES = ("float32", "bfloat16", "float16")


class RewardModelError(ValueError):
    """A reward-model directory that cannot serve as the reward asked for; names the path and what was found."""


@dataclass
class RewardModelSpec:
    """What loads one reward model and how it scores (crosses to its actor as is).

    Attributes:
        path: the model directory (HF format, its tokenizer beside it).
        kind: ``classifier`` or ``judge`` (see the module docstring).
        batch_size: texts per forward pass.
        max_length: tokens per scored text (longer texts keep their end).
        template, yes_token, no_token: the judge's question and answers.
        dtype: ``float32`` | ``bfloat16`` | ``float16``.
        torch_threads: ``torch.set_num_threads`` in the process that loads it; 0 leaves torch's.
        device: ``cpu``, or ``cuda`` (the GPU its actor reserved).
        trust_remote_code: passed to transformers.
        name: the reward's key, for messages.
    """

    path: str
    kind: str = "classifier"
    batch_size: int = 32
    max_length: int = DEFAULT_MAX_LENGTH
    template: str = DEFAULT_JUDGE_TEMPLATE
    yes_token: str = " Yes"
    no_token: str = " No"
    dtype: str = "float32"
    torch_threads: int = 0
    device: str = "cpu"
    trust_remote_code: bool = False
    name: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("classifier", "judge"):
            raise ValueError(f"RewardModelSpec.kind must be 'classifier' or 'judge', got {self.kind!r}")
        if self.batch_size < 1 or self.max_length < 2:
            raise ValueError(f"RewardModelSpec needs batch_size >= 1 and max_length >= 2 (got {self.batch_size}, {self.max_length})")
        if self.dtype not in _DTYPES:
            raise ValueError(f"RewardModelSpec.dtype must be one of {_DTYPES}, got {self.dtype!r}")

    @property
    def label(self) -> str:
        return f"reward model {self.name!r} ({self.path})" if self.name and self.name != self.path else f"reward model {self.path}"


# ------------------------------------------------------------------------------------------ checks


def check_reward_model(spec: RewardModelSpec) -> dict[str, Any]:
    """Check ``spec.path`` can serve ``spec.kind``, without loading the weights; returns what was
    found (``architectures``, ``num_labels``, token ids). Raises :class:`RewardModelError`."""
    _, info = _load_checked(spec)
    return info


def _load_checked(spec: RewardModelSpec):
    """(tokenizer, info) of a directory that passed every check."""
    where = spec.label
    path = Path(spec.path)
    if not path.is_dir():
        raise RewardModelError(f"{where}: not a directory")
    if not (path / "config.json").is_file():
        raise RewardModelError(f"{where}: no config.json (not an HF model directory)")
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise RewardModelError(f"{where}: cannot read config.json: {e}") from None
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise RewardModelError(f"{where}: no tokenizer (none of {', '.join(TOKENIZER_FILES)}); a reward model scores "
                               "text with its own tokenizer, saved beside its weights")
    archs = list(config.get("architectures") or [])
    info: dict[str, Any] = {"architectures": archs, "model_type": config.get("model_type")}
    if spec.kind == "classifier":
        if not any(a.endswith("ForSequenceClassification") for a in archs):
            raise RewardModelError(f"{where}: kind: classifier needs a sequence-classification head "
                                   f"(AutoModelForSequenceClassification, num_labels=1); config.json has "
                                   f"architectures {archs or 'none'}"
                                   + ("; a causal LM can serve as kind: judge" if any(a.endswith("ForCausalLM") for a in archs) else ""))
        num_labels = len(config["id2label"]) if config.get("id2label") else config.get("num_labels", 2)
        if num_labels != 1:
            raise RewardModelError(f"{where}: kind: classifier needs num_labels=1 (one score per text); config.json has "
                                   f"num_labels={num_labels} (id2label {config.get('id2label')})")
        info["num_labels"] = num_labels
    elif not any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs):
        raise RewardModelError(f"{where}: kind: judge needs a causal LM (AutoModelForCausalLM); config.json has "
                               f"architectures {archs or 'none'}")
    tokenizer = _load_tokenizer(spec)
    if spec.kind == "judge":
        ids = {}
        for field, token in (("yes_token", spec.yes_token), ("no_token", spec.no_token)):
            got = tokenizer.encode(token, add_special_tokens=False)
            if len(got) != 1:
                pieces = tokenizer.convert_ids_to_tokens(got)
                raise RewardModelError(f"{where}: {field} {token!r} is {len(got)} tokens in its tokenizer ({pieces}), not "
                                       f"one: the judge's score is the next token's probability; pick answers that are "
                                       f"single tokens")
            ids[field] = got[0]
        if ids["yes_token"] == ids["no_token"]:
            raise RewardModelError(f"{where}: yes_token {spec.yes_token!r} and no_token {spec.no_token!r} are the same token")
        info.update(yes_id=ids["yes_token"], no_id=ids["no_token"])
    else:
        pad = config.get("pad_token_id")
        pad = pad if pad is not None else tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise RewardModelError(f"{where}: no pad token (config.json pad_token_id, the tokenizer's pad or eos token): "
                                   "batched scoring reads each text's last token by where the padding starts")
        info["pad_id"] = int(pad)
    return tokenizer, info


def _load_tokenizer(spec: RewardModelSpec):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec.path, trust_remote_code=spec.trust_remote_code)
    except Exception as e:  # noqa: BLE001 -- tokenizers, sentencepiece, json each raise their own
        raise RewardModelError(f"{spec.label}: the tokenizer does not load: {type(e).__name__}: {e}") from None


# ------------------------------------------------------------------------------------------ tokens


def encode_texts(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of each text with the tokenizer's special tokens, cut to ``max_length``: a longer
    text keeps its last tokens and its first special token (``<bos>``), if it has one.

    The tiny reward model trains on exactly these ids (``rl/tasks/tiny_reward_model.py``).
    """
    ids = tokenizer(list(texts), add_special_tokens=True, verbose=False)["input_ids"]
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    out = []
    for row in ids:
        row = list(row)
        if len(row) > max_length:
            row = [row[0]] + row[len(row) - max_length + 1:] if row[0] in special else row[len(row) - max_length:]
        out.append(row)
    return out


def pad_right(rows: Sequence[Sequence[int]], pad_id: int):
    """(input_ids [b, L], attention_mask [b, L], lengths [b]) of right-padded rows."""
    import torch
    from torch.nn.utils.rnn import pad_sequence

    input_ids = pad_sequence([torch.tensor(r, dtype=torch.long) for r in rows], batch_first=True, padding_value=pad_id)
    lengths = torch.tensor([len(r) for r in rows])
    return input_ids, (torch.arange(input_ids.shape[1]) < lengths[:, None]).long(), lengths


# ------------------------------------------------------------------------------------------ the model


class RewardModel:
    """One reward model, loaded and scoring (pure of Ray: ``rl.workers`` wraps it in an actor):
    ``RewardModel(RewardModelSpec(path="rm")).score(prompts, completions)`` -> one float each.
    Loading runs every check of :func:`check_reward_model` first."""

    def __init__(self, spec: RewardModelSpec):
        import torch

        self.spec = spec
        if spec.device != "cpu" and not torch.cuda.is_available():  # before any loading
            raise RewardModelError(f"{spec.label}: asked to run on {spec.device} (its num_gpus), but CUDA is not usable here")
        self.tokenizer, self.info = _load_checked(spec)
        if spec.torch_threads > 0:
            torch.set_num_threads(spec.torch_threads)
        dtype = getattr(torch, spec.dtype)
        if spec.kind == "classifier":
            from transformers import AutoModelForSequenceClassification as Auto
        else:
            from transformers import AutoModelForCausalLM as Auto
        try:
            self.model = Auto.from_pretrained(spec.path, dtype=dtype, trust_remote_code=spec.trust_remote_code)
        except Exception as e:  # noqa: BLE001 -- missing weights, shape mismatch, ...
            raise RewardModelError(f"{spec.label}: the weights do not load as {Auto.__name__}: {type(e).__name__}: {e}") from None
        self.model.to(spec.device).eval()
        if spec.kind == "classifier":
            self.model.config.pad_token_id = self.info["pad_id"]  # what the model's pooling looks for
            self.pad_id = self.info["pad_id"]
        else:
            tok = self.tokenizer
            self.pad_id = next((t for t in (tok.pad_token_id, tok.eos_token_id) if t is not None), 0)

    def ready(self) -> bool:
        return True

    def texts(self, prompts: Sequence[str], completions: Sequence[str]) -> list[str]:
        """What the model reads: prompt + completion, or the judge's question about them."""
        if self.spec.kind == "classifier":
            return [p + c for p, c in zip(prompts, completions, strict=True)]
        return [self.spec.template.format(prompt=p, completion=c) for p, c in zip(prompts, completions, strict=True)]

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """One score per completion, in order (N texts in batches of ``batch_size``, longest first)."""
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts for {len(completions)} completions")
        if not completions:
            return []
        ids = encode_texts(self.tokenizer, self.texts(prompts, completions), self.spec.max_length)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        scores = [math.nan] * len(ids)
        bs = self.spec.batch_size
        for start in range(0, len(order), bs):
            chunk = order[start : start + bs]
            for i, s in zip(chunk, self._forward([ids[i] for i in chunk])):
                scores[i] = s
        return scores

    def _forward(self, rows: list[list[int]]) -> list[float]:
        import torch

        input_ids, mask, lengths = (t.to(self.spec.device) for t in pad_right(rows, self.pad_id))
        with torch.no_grad():
            if self.spec.kind == "classifier":
                logits = self.model(input_ids=input_ids, attention_mask=mask).logits  # [b, 1]
                return logits[:, 0].float().tolist()
            logits = self.model(input_ids=input_ids, attention_mask=mask).logits  # [b, L, V]
            last = logits[torch.arange(len(rows), device=logits.device), lengths - 1].float()  # [b, V]: the next token after each text
            margin = last[:, self.info["yes_id"]] - last[:, self.info["no_id"]]
            return torch.sigmoid(margin).tolist()  # P(yes) / (P(yes) + P(no))


class ModelReward:
    """A reward model as a reward function: ``(prompts, completions, **columns) -> list[float]``.

    ``server`` is what scores: a :class:`RewardModel`, or an actor group with the same ``score``
    (``rl.workers.RewardModelGroup``), given when the run starts it (:meth:`serve`). Called before
    then it raises, and the scorer counts the samples as failures. ``num_cpus`` and ``num_gpus`` are what the
    actor serving it reserves. Columns are ignored: the model reads only the prompt and completion.

    >>> class Lengths:  # anything with score(prompts, completions)
    ...     def score(self, prompts, completions): return [float(len(c)) for c in completions]
    >>> reward = ModelReward(RewardModelSpec(path="unused"), server=Lengths())
    >>> reward(["Q:", "Q:"], ["yes", "no"], answer=["x", "y"])
    [3.0, 2.0]
    """

    def __init__(self, spec: RewardModelSpec, server: Optional[Any] = None, num_cpus: float = 1.0, num_gpus: float = 0.0):
        self.spec, self.server, self.num_cpus, self.num_gpus = spec, server, num_cpus, num_gpus

    def serve(self, server: Optional[Any]) -> None:
        self.server = server

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        if self.server is None:
            raise RuntimeError(f"{self.spec.label} is not being served (the run starts its actor with the other workers)")
        return self.server.score(list(prompts), list(completions))

    def __repr__(self) -> str:
        return f"ModelReward({self.spec.kind} {self.spec.path})"


# ------------------------------------------------------------------------------------------ training


def bradley_terry_loss(r_chosen, r_rejected):
    """Bradley-Terry pairwise loss of a reward model, mean over P pairs: ``-log sigmoid(r_c - r_r)``.

    ``r_chosen``, ``r_rejected``: [P] scores of the preferred and the dispreferred text of each pair.
    The reward-model loss of Stiennon et al. 2020 (https://arxiv.org/abs/2009.01325) and Ouyang et
    al. 2022 (https://arxiv.org/abs/2203.02155, eq. 1), one comparison per pair (no K-way batching,
    no margin term); the Bradley-Terry model (1952) makes P(c > r) = sigmoid(r_c - r_r).

    >>> import torch
    >>> round(bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])).item(), 6)  # (log(1+e^-1) + log 2) / 2
    0.503204
    """
    import torch.nn.functional as F

    return -F.logsigmoid(r_chosen - r_rejected).mean()
