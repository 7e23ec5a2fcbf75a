"""Adapter math against hand-computed values and direct (looped) computations: merging, sparse
selection, Arrow routing. Pure tensors, no files."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from adapters.arrow import arrow_lora_forward, arrow_route, expert_prototypes
from adapters.merge import lora_delta, merge_lora_uniform, merge_lora_weighted, merge_sparse, refactor_to_lora
from adapters.sparse import SparseAdapter, apply_sparse_delta, connection_sensitivity_mask, read_sparse_dir

T = torch.tensor


# ---- LoRA merging ----------------------------------------------------------------------------
def test_lora_delta_is_scaled_B_at_A():
    A = T([[1.0, 0.0], [0.0, 1.0]])
    B = T([[1.0, 2.0], [3.0, 4.0]])
    assert torch.equal(lora_delta(A, B, alpha=4, rank=2), T([[2.0, 4.0], [6.0, 8.0]]))


# Two rank-1 experts on a 2x2 weight: B1 A1 = [[1, 0], [2, 0]], B2 A2 = [[0, 3], [0, 1]].
E1 = {"m": (T([[1.0, 0.0]]), T([[1.0], [2.0]]))}
E2 = {"m": (T([[0.0, 1.0]]), T([[3.0], [1.0]]))}


def test_merge_uniform_averages_deltas_not_factors():
    merged = merge_lora_uniform([E1, E2])["m"]
    assert torch.equal(merged, T([[0.5, 1.5], [1.0, 0.5]]))
    # averaging the factors separately gives a different matrix: mean(B) @ mean(A) = [[1, 1], [0.75, 0.75]]
    factor_avg = (E1["m"][1] + E2["m"][1]) / 2 @ ((E1["m"][0] + E2["m"][0]) / 2)
    assert torch.equal(factor_avg, T([[1.0, 1.0], [0.75, 0.75]]))
    assert not torch.allclose(merged, factor_avg)


def test_merge_weighted_and_scalings():
    merged = merge_lora_weighted([E1, E2], [0.25, 0.75])["m"]
    assert torch.equal(merged, T([[0.25, 2.25], [0.5, 0.75]]))
    # per-expert alpha/rank scales each delta before weighting
    scaled = merge_lora_weighted([E1, E2], [0.5, 0.5], scalings=[2.0, 0.0])["m"]
    assert torch.equal(scaled, T([[1.0, 0.0], [2.0, 0.0]]))


def test_merge_rejects_different_modules():
    with pytest.raises(ValueError, match="other modules"):
        merge_lora_uniform([E1, {"n": E2["m"]}])


def test_refactor_to_lora_is_truncated_svd():
    torch.manual_seed(0)
    delta = torch.randn(6, 5)
    A, B = refactor_to_lora(delta, rank=5)  # full rank: exact
    assert A.shape == (5, 5) and B.shape == (6, 5)
    assert torch.allclose(B @ A, delta, atol=1e-5)
    A2, B2 = refactor_to_lora(delta, rank=2)  # Eckart-Young: error = the dropped singular values
    S = torch.linalg.svdvals(delta)
    assert math.isclose(float(torch.linalg.norm(delta - B2 @ A2)), float(S[2:].norm()), rel_tol=1e-4)
    A8, B8 = refactor_to_lora(delta, rank=8)  # padded with zeros beyond min(out, in)
    assert A8.shape == (8, 5) and B8.shape == (6, 8) and torch.allclose(B8 @ A8, delta, atol=1e-5)


# ---- sparse merging ---------------------------------------------------------------------------
def test_merge_sparse_divides_overlaps_by_count():
    d1 = {"w": T([[2.0, 0.0], [4.0, 0.0]])}
    m1 = {"w": T([[True, False], [True, False]])}
    d2 = {"w": T([[4.0, 6.0], [0.0, 0.0]]), "only2": T([[1.0]])}
    m2 = {"w": T([[True, True], [True, False]]), "only2": T([[True]])}  # [1, 0] touched with value 0
    out = merge_sparse([d1, d2], [m1, m2])
    # [0,0]: (2+4)/2; [0,1]: 6/1; [1,0]: (4+0)/2 (the mask counts, not the value); [1,1]: touched by none
    assert torch.equal(out["w"], T([[3.0, 6.0], [2.0, 0.0]]))
    assert torch.equal(out["only2"], T([[1.0]]))


# ---- connection sensitivity -------------------------------------------------------------------
W1, G1 = T([[1.0, -2.0], [3.0, 0.5]]), T([[0.5, 1.0], [-0.1, 3.0]])  # |W*G| = [[0.5, 2.0], [0.3, 1.5]]
W2, G2 = T([[1.0, 1.0, 1.0]]), T([[1.0, 0.1, -0.05]])  # |W*G| = [[1.0, 0.1, 0.05]]


def test_snip_mask_keeps_global_top_entries():
    masks = connection_sensitivity_mask({"a": W1, "b": W2}, {"a": G1, "b": G2}, keep_ratio=3 / 7)
    assert torch.equal(masks["a"], T([[False, True], [False, True]]))  # 2.0 and 1.5
    assert torch.equal(masks["b"], T([[True, False, False]]))  # 1.0
    masks = connection_sensitivity_mask({"a": W1, "b": W2}, {"a": G1, "b": G2}, keep_ratio=0.3)  # round(2.1) = 2
    assert torch.equal(masks["a"], T([[False, True], [False, True]]))
    assert not masks["b"].any()  # a weight may keep nothing: the budget is global


def test_snip_mask_block_mode():
    score = T([[9.0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 3, 0]])
    W, G = torch.ones(4, 4), score
    block = connection_sensitivity_mask({"w": W}, {"w": G}, keep_ratio=0.5, block_size=2)["w"]
    # tile sums: (0,0)=9, (0,1)=4, (1,0)=0, (1,1)=3 -> keep the two top tiles: the upper half
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[:2] = True
    assert torch.equal(block, expected)
    # unstructured at 2/16 keeps the two largest entries instead (9 and 3)
    flat = connection_sensitivity_mask({"w": W}, {"w": G}, keep_ratio=2 / 16)["w"]
    assert flat.nonzero().tolist() == [[0, 0], [3, 2]]
    # partial edge tiles: a 3x3 weight in 2x2 tiles has 4 tiles of 4, 2, 2, 1 entries
    edge = connection_sensitivity_mask({"w": torch.ones(3, 3)}, {"w": T([[0.0, 0, 0], [0, 0, 0], [0, 0, 5]])}, 0.25, 2)["w"]
    assert edge.nonzero().tolist() == [[2, 2]]


def test_snip_mask_rejects_bad_input():
    with pytest.raises(ValueError, match="keep_ratio"):
        connection_sensitivity_mask({"a": W1}, {"a": G1}, keep_ratio=0.0)
    with pytest.raises(ValueError, match="no gradient"):
        connection_sensitivity_mask({"a": W1}, {}, keep_ratio=0.5)


def test_sparse_adapter_trains_only_masked_entries(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    nn.functional.mse_loss(model(x), y).backward()
    names = ["0.weight", "2.weight"]
    params = dict(model.named_parameters())
    masks = connection_sensitivity_mask({n: params[n].detach() for n in names}, {n: params[n].grad for n in names}, keep_ratio=0.2)
    model.zero_grad()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    adapter = SparseAdapter(masks)
    adapter.attach(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == adapter.num_trainable() == sum(int(m.sum()) for m in masks.values())
    opt = torch.optim.SGD(trainable, lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    out_attached = model(x).detach()

    deltas = adapter.dense_deltas()
    for n in names:
        assert (deltas[n][~masks[n]] == 0).all() and (deltas[n][masks[n]] != 0).any()
    adapter.save(tmp_path / "sp", keep_ratio=0.2)
    back_masks, back_deltas = read_sparse_dir(tmp_path / "sp")
    for n in names:
        assert torch.equal(back_masks[n], masks[n]) and torch.equal(back_deltas[n], deltas[n])

    adapter.detach(model)  # base weights are untouched by training
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n])
    apply_sparse_delta(model, back_deltas)  # merging the saved deltas reproduces the trained model
    assert torch.allclose(model(x), out_attached, atol=1e-6)


# ---- Arrow --------------------------------------------------------------------------------------
def _random_experts(E=4, r=3, d_in=16, d_out=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(E, r, d_in, generator=g), torch.randn(E, d_out, r, generator=g)


def test_prototypes_are_top_right_singular_vectors():
    A, B = _random_experts()
    protos = expert_prototypes(A, B)
    assert protos.shape == (4, 16)
    for e in range(4):
        v = torch.linalg.svd(B[e] @ A[e]).Vh[0]
        assert math.isclose(abs(float(v @ protos[e])), 1.0, rel_tol=1e-5)  # same line, sign-agnostic
    # lists of different ranks work too
    protos2 = expert_prototypes([A[0], A[1, :2]], [B[0], B[1, :, :2]])
    v = torch.linalg.svd(B[1, :, :2] @ A[1, :2]).Vh[0]
    assert math.isclose(abs(float(v @ protos2[1])), 1.0, rel_tol=1e-5)


@pytest.mark.parametrize("top_k,temperature", [(1, 1.0), (2, 0.5), (4, 2.0)])
def test_arrow_route_matches_looped_formula(top_k, temperature):
    A, B = _random_experts()
    h = torch.randn(10, 16, generator=torch.Generator().manual_seed(1))
    protos = torch.stack([torch.linalg.svd(B[e] @ A[e]).Vh[0] for e in range(4)])  # computed directly
    weights = arrow_route(h, protos, top_k=top_k, temperature=temperature)
    for t in range(10):
        scores = [abs(sum(float(h[t, i]) * float(protos[e, i]) for i in range(16))) for e in range(4)]
        kept = sorted(range(4), key=lambda e: -scores[e])[:top_k]
        z = sum(math.exp(scores[e] / temperature) for e in kept)
        for e in range(4):
            want = math.exp(scores[e] / temperature) / z if e in kept else 0.0
            assert math.isclose(float(weights[t, e]), want, rel_tol=1e-4, abs_tol=1e-6)
    # routing through expert_prototypes (other sign convention) gives the same weights
    assert torch.allclose(arrow_route(h, expert_prototypes(A, B), top_k, temperature), weights, atol=1e-5)


def test_arrow_lora_forward_matches_loops():
    A, B = _random_experts()
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(2))  # [batch, L, in]
    base = torch.randn(2, 5, 8)
    w = arrow_route(x.reshape(-1, 16), expert_prototypes(A, B), top_k=2)
    s = T([0.5, 1.0, 2.0, 4.0])
    out = arrow_lora_forward(x, base, A, B, w, s)
    tok = x.reshape(-1, 16)
    for t in range(10):
        want = base.reshape(-1, 8)[t].clone()
        for e in range(4):
            want += w[t, e] * s[e] * (B[e] @ (A[e] @ tok[t]))
        assert torch.allclose(out.reshape(-1, 8)[t], want, atol=1e-4)
