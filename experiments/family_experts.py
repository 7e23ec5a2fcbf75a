"""Experts of the embedded arithmetic family (:mod:`experiments.arithmetic_family`): one per sub-task and
kind, trained by SFT from the embedded base and cached (safetensors + JSON) by every setting that changes
what it trains. Three kinds: ``full`` (every weight; stored as the delta from the base), ``lora`` (PEFT on
the seven projections) and ``sparse`` (a fixed SNIP mask of ``keep_ratio`` of the same projections'
entries, trained through :class:`adapters.sparse.SparseAdapter`), each with its merge.

Shared by ``scripts/experiment_merging.py`` (merging many experts) and ``scripts/experiment_arrow_mbc.py``
(Arrow and MBC libraries of the LoRA experts): the same settings reuse the same cached experts. A family says
what the tasks are (``problems``), how an expert's SFT loss is taken (``loss``) and how a model is scored
(``accuracy``): :data:`ARITHMETIC` on the embedded model, :class:`experiments.chat_family.ChatFamily` on SmolLM2.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from adapters.files import lora_pairs
from adapters.merge import merge_lora_uniform, merge_sparse
from adapters.sparse import (
    SparseAdapter,
    apply_sparse_delta,
    connection_sensitivity_mask,
    read_sparse_dir,
    sensitivity_inputs,
)
from experiments.arithmetic_family import MAX_ANSWER_CHARS, SUBTASKS, make_subtask_problems, split_sizes
from rl.tasks.cache import cached_build
from rl.tasks.tiny_sft import encode_sft_batch, greedy_accuracy, sft_loss

# Bump when a code change alters what given settings train: it is part of an expert's cache key.
EXPERT_FORMAT = 1
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."  # what PeftModel.save_pretrained puts before the base's module names
MAX_NEW_TOKENS = MAX_ANSWER_CHARS + 1  # answer + <eos>


class ArithmeticFamily:
    """The embedded model's arithmetic sub-tasks (:mod:`experiments.arithmetic_family`), scored by exact match."""

    name = "arithmetic"
    subtasks = {t.name: t.description for t in SUBTASKS.values()}
    loss = staticmethod(sft_loss)

    def problems(self, name: str, n: int, seed: int, split: str) -> list[dict]:
        return make_subtask_problems(name, n, seed, split)

    def split_size(self, name: str, split: str) -> int:
        return split_sizes(name)[split]

    def accuracy(self, model, tokenizer, rows: list[dict], task: str) -> float:
        return greedy_accuracy(model, tokenizer, rows, MAX_NEW_TOKENS)


ARITHMETIC = ArithmeticFamily()


@dataclass(frozen=True)
class Settings:
    """Every setting of the experiment; the training ones key the expert cache."""

    family: str = "arithmetic"  # the family's name (ARITHMETIC.name or experiments.chat_family.ChatFamily.name)
    subtasks: tuple[str, ...] = tuple(SUBTASKS)
    sft_steps: int = 800
    batch_size: int = 64
    warmup_steps: int = 20  # linear warm-up, then linear decay to 0 at sft_steps
    # Learning rates from a small sweep (seed 0, own-task greedy accuracy on 200 test prompts; the
    # hardest sub-tasks): mul, 800 steps: full 1e-3 40%, lora 5e-3 41.5%, sparse 5e-3 30.5% / 1e-2 30%;
    # mix, 600 steps: full 1e-3 92%, lora 2e-3 83.5% / 5e-3 95%, sparse 5e-3 83% / 2e-2 50.5%.
    # At 300 steps on mul: full 3e-3 was no better than 1e-3, lora 1.5e-2 diverged (0%).
    lr_full: float = 1e-3
    lr_lora: float = 5e-3
    lr_sparse: float = 5e-3
    lora_rank: int = 8
    lora_alpha: int = 16
    keep_ratio: float = 0.05
    calibration_rows: int = 256  # the SNIP batch (train split of the sub-task)
    calibration_chunk: int = 0  # rows per backward of the SNIP batch (0: all at once); their gradients add up to the batch's
    test_prompts: int = 500  # per sub-task (fewer where its test split is smaller)
    subsets: int = 5  # random subsets per size below the whole family
    subset_seed: int = 0

    def lr(self, kind: str) -> float:
        return getattr(self, f"lr_{kind}")

    def sizes(self) -> list[int]:
        """Subset sizes merged: 2 and 4 where below the family's size, then all of it."""
        n = len(self.subtasks)
        return [k for k in (2, 4) if k < n] + ([n] if n >= 2 else [])


# ------------------------------------------------------------------------------------------
# the three kinds: how an expert is trained, stored, and merged
# ------------------------------------------------------------------------------------------


class Kind:
    """How one kind of expert is trained (``prepare`` says what trains), stored, loaded and merged."""

    def __init__(self, tokenizer, s: Settings, loss=sft_loss):
        self.tokenizer, self.s, self.loss = tokenizer, s, loss

    def key_fields(self) -> dict:
        """The kind's own settings that change what it trains (part of the cache key)."""
        return {}

    def diagnostics(self, experts) -> dict:
        """Numbers about a set of loaded experts worth reporting beside the accuracies."""
        return {}


class FullKind(Kind):
    """Every weight trains; stored as the delta from the base; merged by uniform weight averaging."""

    FILE = "delta.safetensors"

    def prepare(self, model, calibration: list[dict]):
        for p in model.parameters():
            p.requires_grad_(True)
        return model, list(model.parameters())

    def save(self, model, base_state, out: Path) -> int:
        from safetensors.torch import save_file

        delta = {n: (p.detach() - base_state[n]).contiguous() for n, p in model.named_parameters()}
        save_file(delta, str(out / self.FILE), metadata={"format": "pt"})
        return sum(t.numel() for t in delta.values())

    def load(self, d: Path):
        from safetensors.torch import load_file

        return load_file(str(d / self.FILE))

    def merge(self, experts) -> dict[str, torch.Tensor]:
        """base + mean_e(W_e - base) == mean_e W_e."""
        return {n: torch.stack([e[n] for e in experts]).mean(0) for n in experts[0]}


class LoraKind(Kind):
    """PEFT LoRA on the projections; merged by averaging the dense deltas (``merge_lora_uniform``)."""

    def prepare(self, model, calibration: list[dict]):
        from peft import LoraConfig, get_peft_model

        s = self.s
        cfg = LoraConfig(r=s.lora_rank, lora_alpha=s.lora_alpha, lora_dropout=0.0, target_modules=list(PROJECTIONS),
                         task_type="CAUSAL_LM")
        model = get_peft_model(model, cfg)
        return model, [p for p in model.parameters() if p.requires_grad]

    def key_fields(self) -> dict:
        return {"lora_rank": self.s.lora_rank, "lora_alpha": self.s.lora_alpha}

    def save(self, model, base_state, out: Path) -> int:
        model.save_pretrained(out, safe_serialization=True)
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    def load(self, d: Path):
        from safetensors.torch import load_file

        cfg = json.loads((d / "adapter_config.json").read_text())
        state = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(d / "adapter_model.safetensors")).items()}
        return lora_pairs(state), cfg["lora_alpha"] / cfg["r"]

    def merge(self, experts) -> dict[str, torch.Tensor]:
        deltas = merge_lora_uniform([pairs for pairs, _ in experts], scalings=[scale for _, scale in experts])
        return {f"{module}.weight": d for module, d in deltas.items()}


class SparseKind(Kind):
    """A fixed SNIP mask of ``keep_ratio`` of the projections' entries; merged with ``merge_sparse``."""

    def prepare(self, model, calibration: list[dict]):
        """The mask: SNIP scores |W * dL/dW| of the sub-task's SFT loss on ``calibration``, at the base weights."""
        names = [f"{n}.weight" for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in PROJECTIONS]
        for n, p in model.named_parameters():
            p.requires_grad_(n in names)
        model.zero_grad(set_to_none=True)
        self._batch_gradient(model, calibration)
        masks = connection_sensitivity_mask(*sensitivity_inputs(model, names), keep_ratio=self.s.keep_ratio)
        model.zero_grad(set_to_none=True)
        self.adapter = SparseAdapter(masks)
        self.adapter.attach(model)
        return model, list(self.adapter.parameters())

    def _batch_gradient(self, model, rows: list[dict]) -> None:
        """Accumulate d(mean SFT loss over ``rows``' labelled tokens)/dW, ``s.calibration_chunk`` rows per backward
        (SmolLM2 keeps ~2 MB of activations per position: 256 rows at once would need ~28 GB)."""
        chunk = self.s.calibration_chunk or len(rows)
        batches = [encode_sft_batch(self.tokenizer, rows[i : i + chunk]) for i in range(0, len(rows), chunk)]
        total = sum(int((b["labels"] != -100).sum()) for b in batches)
        for b in batches:  # each chunk's mean loss, weighted by its share of the labelled tokens
            weight = int((b["labels"] != -100).sum()) / total
            (self.loss(model, b) * weight).backward()  # one batch: weight is exactly 1.0

    def key_fields(self) -> dict:
        chunk = {"calibration_chunk": self.s.calibration_chunk} if self.s.calibration_chunk else {}  # 0 keeps older keys
        return {"keep_ratio": self.s.keep_ratio, "calibration_rows": self.s.calibration_rows, **chunk}

    def save(self, model, base_state, out: Path) -> int:
        self.adapter.save(out, selection="snip", keep_ratio=self.s.keep_ratio, block_size=None)
        return self.adapter.num_trainable()

    def load(self, d: Path):
        return read_sparse_dir(d)  # (masks, dense deltas)

    def merge(self, experts) -> dict[str, torch.Tensor]:
        return merge_sparse([deltas for _, deltas in experts], [masks for masks, _ in experts])

    def diagnostics(self, experts) -> dict:
        """``mask_overlap``: mean over ordered pairs (i, j) of the share of i's entries that j also trains.
        Sparse merging keeps an expert's values intact only outside such overlaps."""
        shares = []
        for (mi, _), (mj, _) in itertools.permutations(experts, 2):
            both = sum((mi[n] & mj[n]).sum().item() for n in mi if n in mj)
            shares.append(both / max(1, sum(m.sum().item() for m in mi.values())))
        return {"mask_overlap": statistics.mean(shares)} if shares else {}


KINDS: dict[str, type[Kind]] = {"full": FullKind, "lora": LoraKind, "sparse": SparseKind}


# ------------------------------------------------------------------------------------------
# training and evaluation
# ------------------------------------------------------------------------------------------


def sft(model, tokenizer, params, rows: list[dict], lr: float, s: Settings, loss_fn=sft_loss) -> list[float]:
    """AdamW over ``params`` on ``rows`` in batches of ``s.batch_size`` (``loss_fn(model, batch)``); returns the
    per-step losses."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm, total = max(1, s.warmup_steps), s.sft_steps

    def schedule(step: int) -> float:  # step counts from 0
        return min(1.0, (step + 1) / warm, max(0.0, (total - step) / max(1, total - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    losses = []
    for step in range(s.sft_steps):
        batch = encode_sft_batch(tokenizer, rows[step * s.batch_size : (step + 1) * s.batch_size])
        loss = loss_fn(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return losses


def expert_key(kind: str, task: str, seed: int, s: Settings, base_name: str) -> str:
    """``<kind>-<task>-seed<seed>-<hash of every setting that changes the expert>``."""
    fields = {"format": EXPERT_FORMAT, "base": base_name, "kind": kind, "task": task, "seed": seed, "lr": s.lr(kind),
              "sft_steps": s.sft_steps, "batch_size": s.batch_size, "warmup_steps": s.warmup_steps,
              **KINDS[kind](None, s).key_fields()}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]
    return f"{kind}-{task}-seed{seed}-{digest}"


def train_expert(kind: str, task: str, seed: int, s: Settings, base, tokenizer, runs: Path, base_name: str,
                 log: Callable[[str], None], family=ARITHMETIC) -> tuple[object, dict]:
    """Train (or reuse from ``runs``) one expert; returns (what ``merge`` takes, its build info)."""
    k = KINDS[kind](tokenizer, s, family.loss)

    def build(out: Path) -> dict:
        t0 = time.time()
        model = copy.deepcopy(base)
        base_state = {n: p.detach().clone() for n, p in base.named_parameters()}
        # The same data and init seed for every kind: only the trained parameters and the lr differ.
        stream = family.problems(task, s.sft_steps * s.batch_size, seed, "train")
        calib = family.problems(task, s.calibration_rows, seed + 1000, "train")
        torch.manual_seed(seed)
        model, params = k.prepare(model, calib)
        losses = sft(model, tokenizer, params, stream, s.lr(kind), s, family.loss)
        n_trainable = k.save(model, base_state, out)
        return {"kind": kind, "task": task, "seed": seed, "lr": s.lr(kind), "trainable_parameters": n_trainable,
                "final_loss": round(statistics.mean(losses[-20:]), 5), "train_seconds": round(time.time() - t0, 1)}

    d, _ = cached_build(runs / "experts", expert_key(kind, task, seed, s, base_name), build, f"{kind} expert {task}", log)
    return k.load(d), json.loads((d / "build_info.json").read_text())


def evaluate(model, base_state, deltas, tokenizer, tasks: list[str], test_rows: dict[str, list[dict]],
             family=ARITHMETIC) -> dict[str, float]:
    """Greedy accuracy of base + ``deltas`` on each of ``tasks`` (``model`` is reset to the base first)."""
    model.load_state_dict(base_state)
    apply_sparse_delta(model, deltas)
    return {t: family.accuracy(model, tokenizer, test_rows[t], t) for t in tasks}
