"""Arrow end to end, before any claim about it is tested: the PEFT Arrow model that
``scripts/experiment_arrow_mbc.py`` evaluates against the merged experts it is compared with.

1. A library of one expert reproduces that expert: logits of base + its merged delta, same greedy accuracy.
2. Experts whose inputs live in distinct subspaces get their own tokens, in every routed module.
3. Where Arrow and a merge are mathematically equal (equal deltas; all experts with equal weights), the
   logits agree; where they are not, they differ.

The embedded arithmetic model (the test build) and one LoRA expert trained on it for a few seconds, through
the experiment's own paths: ``experiments.family_experts`` (SFT, merge, evaluate) and ``greedy_accuracy``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil

import peft
import pytest
import torch
import transformers

from adapters.arrow import build_peft_arrow_model, peft_arrow_routing
from adapters.library import AdapterLibrary
from experiments import family_experts as fx
from experiments.arithmetic_family import make_subtask_problems
from rl.tasks.tiny_sft import encode_sft_batch, greedy_accuracy

TASK = "mul"  # the base scores 0% on it: a trained expert changes accuracy, so "equal accuracy" is not vacuous
SETTINGS = dataclasses.replace(fx.Settings(), sft_steps=100, batch_size=32, warmup_steps=5)  # ~5 s on one core


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The model is tiny: with the cores shared, a second intra-op thread mostly waits at barriers (the SFT
    below took minutes instead of seconds on 2 busy cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def embedded(tiny_model_root):
    """(model dir, tokenizer, base model, base state) of the embedded arithmetic model's test build."""
    model_dir = tiny_model_root / "model"
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model_dir, tok, base, {n: p.detach().clone() for n, p in base.state_dict().items()}


@pytest.fixture(scope="module")
def expert_dirs(embedded, tmp_path_factory):
    """PEFT directories: ``mul`` (a LoRA trained by the experiment's SFT), ``mul-refactored`` (the same delta
    with other factors and scaling: A -> -A, B -> -2B, alpha 16 -> 8) and ``noise`` (small random A and B)."""
    model_dir, tok, base, _ = embedded
    root = tmp_path_factory.mktemp("experts")
    kind = fx.LoraKind(tok, SETTINGS)
    torch.manual_seed(0)
    model, params = kind.prepare(copy.deepcopy(base), [])
    fx.sft(model, tok, params, make_subtask_problems(TASK, SETTINGS.sft_steps * SETTINGS.batch_size, 0, "train"),
           SETTINGS.lr_lora, SETTINGS)
    kind.save(model, None, root / TASK)

    _rewrite(root / TASK, root / "mul-refactored", lambda k, v: -v if ".lora_A." in k else -2 * v, alpha=SETTINGS.lora_alpha / 2)
    g = torch.Generator().manual_seed(1)
    _rewrite(root / TASK, root / "noise", lambda k, v: 0.05 * torch.randn(v.shape, generator=g))
    return {n: root / n for n in (TASK, "mul-refactored", "noise")}


def _rewrite(src, dest, fn, alpha=None):
    """Copy the PEFT directory ``src`` to ``dest`` with every weight ``v`` of key ``k`` replaced by ``fn(k, v)``."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dest)
    state = load_file(str(src / "adapter_model.safetensors"))
    save_file({k: fn(k, v).contiguous() for k, v in state.items()}, str(dest / "adapter_model.safetensors"))
    if alpha is not None:
        cfg = json.loads((src / "adapter_config.json").read_text())
        (dest / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": alpha}))


@pytest.fixture(scope="module")
def library(embedded, expert_dirs, tmp_path_factory):
    lib = AdapterLibrary(tmp_path_factory.mktemp("lib") / "lib", create=True)
    for name, d in expert_dirs.items():
        lib.add(name, d, {"base_model": str(embedded[0])})
    return lib


def _merged(embedded, dirs):
    """Base + the uniform mean of the experts' deltas, exactly as the experiment scores 'own expert' and 'merge'."""
    _, tok, base, base_state = embedded
    kind = fx.LoraKind(tok, SETTINGS)
    model = copy.deepcopy(base)
    fx.evaluate(model, base_state, kind.merge([kind.load(d) for d in dirs]), tok, [], {})
    return model


def _arrow(embedded, library, names, top_k, temperature=1.0):
    return build_peft_arrow_model(library, names, copy.deepcopy(embedded[2]), top_k=top_k, temperature=temperature,
                                  base_model_dir=embedded[0]).eval()


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.fixture(scope="module")
def test_rows():
    return make_subtask_problems(TASK, 64, 0, "test")


# ---- 1. a library of one expert is that expert -------------------------------------------------------------------


def test_one_expert_arrow_reproduces_the_merged_expert(embedded, expert_dirs, library, test_rows):
    _, tok, base, _ = embedded
    merged = _merged(embedded, [expert_dirs[TASK]])
    arrow = _arrow(embedded, library, [TASK], top_k=1)
    batch = encode_sft_batch(tok, test_rows)
    assert torch.allclose(_logits(arrow, batch), _logits(merged, batch), atol=1e-4)

    acc = {m: greedy_accuracy(model, tok, test_rows, fx.MAX_NEW_TOKENS) for m, model in
           (("base", base), ("merged", merged), ("arrow", arrow))}
    assert acc["arrow"] == acc["merged"], acc
    assert acc["merged"] >= acc["base"] + 0.05, acc  # the expert matters, so the equality above means something

    routing = peft_arrow_routing(arrow, batch["input_ids"], batch["attention_mask"])
    assert len(routing) == 2 * len(fx.PROJECTIONS)  # every projection of both layers is routed
    assert all(torch.equal(w, torch.ones(1)) for w in routing.values())


# ---- 2. routing sends each expert its own tokens -----------------------------------------------------------------


def _block_diagonal_llama():
    """A random 2-layer Llama in which every weight is block-diagonal over the two halves of its axes, and
    tokens 0-31 embed in the first half of the hidden dims, 32-63 in the second (4 heads: 0-1 read the first
    half). A sequence of one half's tokens keeps its residual stream, and so every projection's input, in that
    half of the features: the inputs of the two "tasks" span disjoint subspaces, in every layer."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:  # projections, embedding, head: [out, in]
                o, i = p.shape
                p[: o // 2, i // 2 :] = 0
                p[o // 2 :, : i // 2] = 0
    return model


def _subspace_expert(base, half: int, seed: int, d):
    """A LoRA on every projection whose A reads only ``half`` of the input features (its prototype lies there).
    B is dense, so the left singular vectors (output side) span both halves: a prototype taken from the wrong
    side would not separate the tasks; it is tiny, so the experts' leak into the other half stays negligible."""
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(fx.PROJECTIONS), init_lora_weights=False)
    model = peft.get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_A." in n:
                cut = p.shape[1] // 2
                p[:, cut:] = 0 if half == 0 else p[:, cut:]
                p[:, :cut] = 0 if half == 1 else p[:, :cut]
            elif ".lora_B." in n:
                p.mul_(1e-4)
    model.save_pretrained(d, safe_serialization=True)
    return d


def test_experts_with_distinct_input_subspaces_get_their_own_tokens(tmp_path):
    base = _block_diagonal_llama()
    base.save_pretrained(tmp_path / "base")
    lib = AdapterLibrary(tmp_path / "lib", create=True)
    for e in (0, 1):
        lib.add(f"half{e}", _subspace_expert(base, e, seed=10 + e, d=tmp_path / f"src{e}"), {"base_model": str(tmp_path / "base")})
    # Library order differs from the halves' order: routing is reported in library order.
    arrow = build_peft_arrow_model(lib, ["half1", "half0"], copy.deepcopy(base), top_k=1).eval()
    g = torch.Generator().manual_seed(0)
    for half, expert in ((0, 1), (1, 0)):
        ids = torch.randint(32 * half, 32 * half + 32, (8, 12), generator=g)
        routing = peft_arrow_routing(arrow, ids)
        assert len(routing) == 2 * len(fx.PROJECTIONS)
        own = {m: w[expert].item() for m, w in routing.items()}
        # Chance is 0.5. Not exactly 1: B's leak gives the other expert a tiny score, which wins on the odd token
        # that is nearly orthogonal to its own expert's prototype.
        assert min(own.values()) > 0.95 and sum(own.values()) / len(own) > 0.99, own


# ---- 3. Arrow equals a merge exactly where the mathematics says so ------------------------------------------------


def test_arrow_over_equal_deltas_is_that_delta(embedded, expert_dirs, library, test_rows):
    """Two experts with the same delta s·B·A but other factors and alpha: whatever the routing weights, their
    weighted sum is that delta (checks each expert's own alpha/r scaling and the prototypes' sign)."""
    batch = encode_sft_batch(embedded[1], test_rows[:16])
    want = _logits(_merged(embedded, [expert_dirs[TASK]]), batch)
    assert torch.allclose(_logits(_merged(embedded, [expert_dirs["mul-refactored"]]), batch), want, atol=1e-4)
    for top_k in (1, 2):
        got = _logits(_arrow(embedded, library, [TASK, "mul-refactored"], top_k=top_k), batch)
        assert torch.allclose(got, want, atol=1e-4), top_k


def test_arrow_over_all_experts_with_equal_weights_is_the_uniform_merge(embedded, expert_dirs, library, test_rows):
    """top_k = E and an infinite temperature give every expert weight 1/E in every token and layer: the uniform
    merge. At temperature 1 the routed weights are not uniform, and the logits differ: the check is sensitive."""
    names = [TASK, "noise"]
    batch = encode_sft_batch(embedded[1], test_rows[:16])
    want = _logits(_merged(embedded, [expert_dirs[n] for n in names]), batch)
    assert torch.allclose(_logits(_arrow(embedded, library, names, top_k=2, temperature=1e9), batch), want, atol=1e-4)
    routed = _logits(_arrow(embedded, library, names, top_k=2, temperature=1.0), batch)
    assert (routed - want).abs().max() > 1e-2
