"""Adapter policies on a tiny random Llama (no engines): Arrow layers against the formula, the
served LoRA against the routed model, sparse masks, reference = adapter disabled, save/load."""

from __future__ import annotations

import pytest
import torch

from trainer.config import AdapterConfig
from rollout.types import WeightHandle

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _base(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _experts(tmp_path, n=3, rank=4):
    """``n`` PEFT LoRA directories with random (non-zero) A and B."""
    from peft import LoraConfig, get_peft_model

    dirs = []
    for e in range(n):
        torch.manual_seed(100 + e)
        peft = get_peft_model(_base(), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False))
        d = tmp_path / f"expert{e}"
        peft.save_pretrained(d, safe_serialization=True)
        dirs.append(str(d))
    return dirs


def _transport(d):
    from rollout.weight_sync import SharedFileTransport

    return SharedFileTransport(d)


def _build(cfg, model, start_from=None, **kw):
    from trainer.policies import PolicySpec, build_policy

    pad_id = kw.pop("pad_id", 0)
    return build_policy(PolicySpec(kind=cfg.kind, adapter=cfg, start_from=start_from, **kw), model, pad_id=pad_id)


IDS = torch.tensor([[1, 5, 7, 9, 11, 3], [2, 4, 6, 8, 10, 12]])


def _arrow(tmp_path, **kw):
    cfg = AdapterConfig(kind="arrow", library="lib", experts=["e0", "e1", "e2"], target_modules=TARGETS, **kw)
    return _build(cfg, _base(), expert_dirs=_experts(tmp_path))


def test_arrow_layer_matches_the_formula(tmp_path):
    from adapters.arrow import arrow_route

    policy = _arrow(tmp_path, top_k=2, router_temperature=0.5, rank=4)
    layer = policy.layers["model.layers.0.self_attn.q_proj"]
    with torch.no_grad():
        layer.new_B.normal_()  # the new LoRA starts at zero; give it a value to check
        x = torch.randn(5, 32)
        got = layer(x)
        w = arrow_route(x, layer.prototypes, top_k=2, temperature=0.5)  # [5, E]
        want = layer.base(x)
        for e in range(3):
            delta = x @ layer.expert_A[e].T @ layer.expert_B[e].T * layer.expert_scaling[e]
            want = want + w[:, e : e + 1] * delta
        want = want + x @ layer.new_A.T @ layer.new_B.T * layer.new_scaling
    assert torch.allclose(got, want, atol=1e-5)
    assert ((w > 0).sum(1) == 2).all()  # top-2 of 3 experts per token


def test_served_lora_equals_the_routed_model_when_routing_is_uniform(tmp_path):
    """top_k = E and a huge temperature make every token's routing 1/E: one LoRA then is exact."""
    from peft import PeftModel

    policy = _arrow(tmp_path, top_k=3, router_temperature=1e9, rank=4)
    with torch.no_grad():
        for layer in policy.layers.values():
            layer.new_B.normal_()
        routing = policy.mean_routing(IDS.tolist(), pad_id=0)
        for w in routing.values():
            assert torch.allclose(w, torch.full((3,), 1 / 3), atol=1e-6)
        routed = policy.model(input_ids=IDS).logits
        handle = policy.publish(_transport(tmp_path / "pub"), version=1, prompts=IDS.tolist())
        assert handle.kind == "lora" and policy.served_rank() == 3 * 4 + 4
        served = PeftModel.from_pretrained(_base(), handle.location).eval()
        assert served.peft_config["default"].r == 16
        assert torch.allclose(served(input_ids=IDS).logits, routed, atol=1e-4)
        assert handle.num_bytes == sum(p.numel() * 4 for n, p in served.named_parameters() if "lora_" in n)


def test_mean_routing_counts_only_real_tokens(tmp_path):
    """Batched (right-padded) routing averages equal the token-weighted per-prompt averages."""
    policy = _arrow(tmp_path, top_k=1)
    p1, p2 = [1, 5, 7], [1, 5, 7, 9, 11]
    batched = policy.mean_routing([p1, p2], pad_id=2)
    one, two = policy.mean_routing([p1], pad_id=2), policy.mean_routing([p2], pad_id=2)
    for m in batched:
        assert torch.allclose(batched[m], (3 * one[m] + 5 * two[m]) / 8, atol=1e-6)
        assert abs(float(batched[m].sum()) - 1) < 1e-5


def test_arrow_reference_is_the_base_and_save_load_round_trips(tmp_path):
    policy = _arrow(tmp_path, top_k=2)
    base_logits = _base()(input_ids=IDS).logits
    with torch.no_grad():
        for layer in policy.layers.values():
            layer.new_B.normal_()
        with policy.reference():
            assert torch.allclose(policy.model(input_ids=IDS).logits, base_logits, atol=1e-6)
        routed = policy.model(input_ids=IDS).logits
        assert not torch.allclose(routed, base_logits, atol=1e-3)
    policy.save(tmp_path / "ck", base_model="base")
    assert (tmp_path / "ck" / "new_lora" / "adapter_config.json").is_file()
    cfg = AdapterConfig(kind="arrow", library="lib", experts=["e0", "e1", "e2"])
    again = _build(cfg, _base(), str(tmp_path / "ck"))
    with torch.no_grad():
        assert torch.allclose(again.model(input_ids=IDS).logits, routed, atol=1e-6)
    trainable = [n for n, p in again.model.named_parameters() if p.requires_grad]
    assert trainable and all(".new_" in n for n in trainable)  # arrow_train=new: experts stay frozen


def test_arrow_can_train_the_experts(tmp_path):
    policy = _arrow(tmp_path, arrow_train="experts")
    trainable = {n.rsplit(".", 1)[-1] for n, p in policy.model.named_parameters() if p.requires_grad}
    assert trainable == {"expert_A", "expert_B"}
    policy.save(tmp_path / "ck", base_model="base")
    assert set(policy.library_sources(tmp_path / "ck")) == {"-e0", "-e1", "-e2"}
    assert (tmp_path / "ck" / "experts" / "e1" / "adapter_model.safetensors").is_file()


def test_sparse_policy_mask_reference_and_round_trip(tmp_path):
    cfg = AdapterConfig(kind="sparse", keep_ratio=0.1, target_modules=TARGETS)
    policy = _build(cfg, _base(), calibration_token_ids=IDS.tolist())
    entries = 2 * (32 * 32 + 32 * 32 + 32 * 48)  # q, v, down per layer
    assert policy.adapter.num_trainable() == round(0.1 * entries)
    assert [n for n, p in policy.model.named_parameters() if p.requires_grad] == [
        n for n in dict(policy.model.named_parameters()) if n.endswith(".values")]
    base_logits = _base()(input_ids=IDS).logits
    with torch.no_grad():
        for d in policy.adapter.deltas:
            d.values.normal_()
        moved = policy.model(input_ids=IDS).logits
        with policy.reference():
            assert torch.allclose(policy.model(input_ids=IDS).logits, base_logits, atol=1e-6)
    assert not torch.allclose(moved, base_logits, atol=1e-3)
    policy.save(tmp_path / "sp", base_model="base")
    again = _build(cfg, _base(), str(tmp_path / "sp"))
    with torch.no_grad():
        assert torch.allclose(again.model(input_ids=IDS).logits, moved, atol=1e-6)


def test_sparse_publish_sends_indices_and_values_only(tmp_path):
    cfg = AdapterConfig(kind="sparse", keep_ratio=0.05, target_modules=TARGETS)
    policy = _build(cfg, _base(), calibration_token_ids=IDS.tolist())
    transport = _transport(tmp_path / "w")
    handle = policy.publish(transport, version=2)
    assert isinstance(handle, WeightHandle) and handle.kind == "sparse_delta"
    nnz = policy.adapter.num_trainable()
    assert handle.num_bytes == nnz * 12
    names = dict(transport.receive(handle))
    assert all(n.endswith((".indices", ".values")) for n in names)


def test_arrow_needs_prompts_to_publish(tmp_path):
    policy = _arrow(tmp_path)
    with pytest.raises(ValueError, match="prompts"):
        policy.publish(_transport(tmp_path / "pub"), version=0)


def test_per_prompt_serving_writes_one_lora_per_distinct_prompt(tmp_path):
    from safetensors.torch import load_file

    from rollout.types import prompt_key

    policy = _arrow(tmp_path, top_k=1, arrow_serving="prompt")
    prompts = [[1, 5, 7], [1, 5, 7, 9, 11], [1, 5, 7]]  # a repeated prompt is served once
    handle = policy.publish(_transport(tmp_path / "pub"), version=3, prompts=prompts)
    assert handle.kind == "lora_per_prompt" and handle.names == [prompt_key(prompts[0]), prompt_key(prompts[1])]
    one = load_file(f"{handle.location}/{handle.names[1]}/adapter_model.safetensors")
    want = policy.served_lora(policy.mean_routing([prompts[1]], pad_id=0))
    for m, (A, B) in want.items():
        assert torch.allclose(one[f"base_model.model.{m}.lora_A.weight"], A)
        assert torch.allclose(one[f"base_model.model.{m}.lora_B.weight"], B, atol=1e-6)
    single = sum(t.numel() * 4 for t in one.values())
    assert handle.num_bytes == 2 * single
    # Frozen experts are held as buffers: counted beside the parameters.
    frozen = sum(l.expert_A.numel() + l.expert_B.numel() for l in policy.layers.values())
    assert policy.numel_in_memory() == frozen + sum(p.numel() for p in policy.model.parameters())
