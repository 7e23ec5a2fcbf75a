"""SFT and greedy evaluation of the tiny models, in plain PyTorch: used by the build
(:mod:`rl.tasks.tiny_model`) and by tests and prototypes.

Problems are ``{"prompt": ..., "answer": ...}`` rows of :mod:`rl.tasks.arithmetic`; a completion
is the answer's characters followed by ``<eos>`` (the tokenization contract of
:mod:`rl.tasks.tiny_model`).
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from rl.tasks import arithmetic


class SFTSchedule(Protocol):
    """What ``run_sft`` reads of a model spec (``rl.tasks.tiny_model.TinyModelSpec`` is one)."""

    seed: int
    sft_steps: int
    sft_batch_size: int
    sft_lr: float
    sft_weight_decay: float
    sft_warmup_steps: int

    def task_kwargs(self) -> dict: ...


def encode_sft_batch(tokenizer, problems: list[dict]) -> dict[str, torch.Tensor]:
    """Right-padded ``prompt + answer + <eos>`` rows; labels are -100 except answer and EOS.

    Returns ``input_ids``, ``attention_mask``, ``labels``, each ``[N, L]``.
    """
    prompts = tokenizer([p["prompt"] for p in problems], add_special_tokens=False)["input_ids"]
    answers = tokenizer([p["answer"] for p in problems], add_special_tokens=False)["input_ids"]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = [(pr, an + [eos]) for pr, an in zip(prompts, answers)]
    width = max(len(pr) + len(an) for pr, an in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (pr, an) in enumerate(rows):
        seq = pr + an
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, len(pr) : len(seq)] = torch.tensor(an)
        mask[i, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def sft_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the labelled (answer + EOS) tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # Position t predicts token t+1.
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)),  # [N*(L-1), V]
        batch["labels"][:, 1:].reshape(-1),  # [N*(L-1)]
        ignore_index=-100,
    )


def run_sft(
    model,
    tokenizer,
    spec: SFTSchedule,
    log: Callable[[str], None] = print,
    on_step: Callable[[int, object], bool] | None = None,
) -> list[float]:
    """Train ``model`` in place on the task's train split; returns the per-step losses.

    ``on_step(step, model)`` runs after each optimizer step (``step`` counts from 1); returning
    True stops the SFT there.
    """
    # Epochs over the train split, reshuffled each time (seed + 1: not the order of train.jsonl).
    stream = arithmetic.make_problems(
        spec.sft_steps * spec.sft_batch_size, spec.seed + 1, "train", **spec.task_kwargs()
    )
    torch.manual_seed(spec.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.sft_lr, weight_decay=spec.sft_weight_decay)
    warm = max(1, spec.sft_warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    model.train()
    losses = []
    for step in range(spec.sft_steps):
        chunk = stream[step * spec.sft_batch_size : (step + 1) * spec.sft_batch_size]
        loss = sft_loss(model, encode_sft_batch(tokenizer, chunk))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == spec.sft_steps:
            log(f"  sft step {step + 1}/{spec.sft_steps}  loss {sum(losses[-100:]) / len(losses[-100:]):.4f}")
        if on_step is not None and on_step(step + 1, model):
            break
    model.eval()
    return losses


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    batch_size: int = 1024,
) -> list[str]:
    """Decode completions (greedy at ``temperature == 0``), stopping at ``<eos>``.

    Prompts are batched by length, so no padding is involved; sequences are short, so each
    step reruns the whole prefix (no KV cache).
    """
    eos = tokenizer.eos_token_id
    ids_list = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    out: list[str] = [""] * len(prompts)
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(ids_list):
        by_len.setdefault(len(ids), []).append(i)
    was_training = model.training
    model.eval()
    for _, idx_all in sorted(by_len.items()):
        for start in range(0, len(idx_all), batch_size):
            idx = idx_all[start : start + batch_size]
            seq = torch.tensor([ids_list[i] for i in idx])  # [n, P]
            done = torch.zeros(len(idx), dtype=torch.bool)
            new = []
            for _ in range(max_new_tokens):
                logits = model(input_ids=seq).logits[:, -1].float()  # [n, V]
                if temperature > 0:
                    probs = torch.softmax(logits / temperature, dim=-1)
                    nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
                else:
                    nxt = logits.argmax(-1)
                nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
                new.append(nxt)
                done |= nxt == eos
                seq = torch.cat([seq, nxt[:, None]], dim=1)
                if done.all():
                    break
            gen = torch.stack(new, dim=1).tolist()  # [n, T]
            for row, i in zip(gen, idx):
                if eos in row:
                    row = row[: row.index(eos)]
                out[i] = tokenizer.decode(row, skip_special_tokens=True)
    model.train(was_training)
    return out


@torch.no_grad()
def teacher_forced_accuracy(model, tokenizer, problems: list[dict]) -> float:
    """Share of problems whose answer + EOS is the argmax at every position, in one forward.

    Equal to greedy exact-match accuracy (greedy decoding reproduces the answer exactly when
    every next token along the answer is the argmax), at the cost of one forward pass instead
    of one per generated token.
    """
    batch = encode_sft_batch(tokenizer, problems)
    was_training = model.training
    model.eval()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model.train(was_training)
    labels = batch["labels"][:, 1:]  # [N, L-1]
    hit = (logits[:, :-1].argmax(-1) == labels) | (labels == -100)
    return hit.all(dim=1).float().mean().item()


def greedy_accuracy(model, tokenizer, problems: list[dict], max_new_tokens: int) -> float:
    """Share of problems whose greedy completion exactly matches the answer."""
    comps = generate(model, tokenizer, [p["prompt"] for p in problems], max_new_tokens)
    return sum(arithmetic.is_correct(c, p["answer"]) for c, p in zip(comps, problems)) / len(problems)
