"""The adapter library on disk with real PEFT LoRAs on a tiny Llama: round trip, integrity checks,
names, base-model compatibility, atomicity, merging, sparse experts, the CLI and PEFT's Arrow."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from adapters.arrow import arrow_lora_forward, arrow_route, build_peft_arrow_model, expert_prototypes
from adapters.cli import main as cli_main
from adapters.library import AdapterLibrary, LibraryError, base_model_hash, lora_pairs
from adapters.merge import merge_lora_uniform
from adapters.sparse import SparseAdapter, connection_sensitivity_mask

import peft  # noqa: E402 -- hard dependencies: a broken install fails here, never shows as a skip
import transformers  # noqa: E402


def _tiny_llama(seed: int):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(model, its directory, another model's directory)."""
    root = tmp_path_factory.mktemp("base")
    model = _tiny_llama(0)
    model.save_pretrained(root / "base")
    _tiny_llama(1).save_pretrained(root / "other")
    return model, root / "base", root / "other"


def _lora(base_model, seed: int, r: int = 4, targets=("q_proj", "v_proj")):
    """A PEFT LoRA with random A and B (init_lora_weights=False), as if trained."""
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=False)
    return peft.get_peft_model(copy.deepcopy(base_model), cfg)


def _meta(base_dir, **kw):
    return {"base_model": str(base_dir), "task": "addition", "data": "arith-2digit", "steps": 10,
            "recipe": "recipes/quickstart.yaml", "metrics": {"accuracy": 0.5}, **kw}


def _entries(root):
    return sorted(os.listdir(root))


def test_round_trip_with_a_real_peft_lora(base, tmp_path):
    model, base_dir, _ = base
    lib = AdapterLibrary(tmp_path / "lib", create=True)
    pm = _lora(model, seed=1)
    expert = lib.add("add-v1", pm, _meta(base_dir))
    assert expert.adapter_type == "lora" and expert.rank == 4 and expert.alpha == 8
    assert expert.target_modules == ["q_proj", "v_proj"] and expert.scaling == 2.0
    assert expert.base_model_hash == base_model_hash(base_dir)
    assert sorted(os.listdir(expert.path)) == ["adapter_config.json", "adapter_model.safetensors", "meta.json"]
    meta = json.loads((expert.path / "meta.json").read_text())
    for key in ("base_model", "base_model_hash", "adapter_type", "rank", "alpha", "target_modules", "task", "data",
                "recipe", "metrics", "parents", "steps", "created", "weights_sha256"):
        assert key in meta, key

    state = lib.load_lora_state("add-v1")
    want = peft.get_peft_model_state_dict(pm)
    assert sorted(state) == sorted(want) and all(torch.equal(state[k], want[k]) for k in want)
    assert len(lora_pairs(state)) == 4  # 2 layers x (q_proj, v_proj)

    # export is a PEFT directory that reproduces the adapted model's outputs
    dest = lib.export("add-v1", tmp_path / "exported")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(dest)).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, pm.eval()(ids).logits, atol=1e-5)

    lib.add("add-v2", dest, _meta(base_dir, parents=["add-v1"]))  # from a directory
    assert [e.name for e in lib.list()] == ["add-v1", "add-v2"]
    assert lib.get("add-v2").meta["parents"] == ["add-v1"]
    lib.remove("add-v1")
    assert [e.name for e in lib.list()] == ["add-v2"]
    assert _entries(lib.root) == ["add-v2"]  # no temp or trash left


def test_missing_library_and_unknown_names(base, tmp_path):
    with pytest.raises(LibraryError, match="does not exist.*create=True"):
        AdapterLibrary(tmp_path / "nope")
    model, base_dir, _ = base
    lib = AdapterLibrary(tmp_path / "lib", create=True)
    lib.add("add-v1", _lora(model, 1), _meta(base_dir))
    with pytest.raises(LibraryError, match="no expert named 'add-v3'.*did you mean add-v1"):
        lib.get("add-v3")
    with pytest.raises(LibraryError, match="already exists"):
        lib.add("add-v1", _lora(model, 2), _meta(base_dir))
    with pytest.raises(LibraryError, match=r"unknown meta field.*'taks' \(did you mean 'task'"):
        lib.add("x", _lora(model, 2), {**_meta(base_dir), "taks": "typo"})


@pytest.mark.parametrize("damage", ["flip", "truncate", "config"])
def test_corrupt_files_are_detected(base, tmp_path, damage):
    model, base_dir, _ = base
    lib = AdapterLibrary(tmp_path / "lib", create=True)
    expert = lib.add("e", _lora(model, 1), _meta(base_dir))
    target = expert.config_path if damage == "config" else expert.weights_path
    data = bytearray(target.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) - 3] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(LibraryError, match=target.name):
        lib.get("e")
    with pytest.raises(LibraryError, match=target.name):
        lib.load_lora_state("e")
    assert lib.get("e", verify=False).name == "e"  # listing still works without verification


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "..", "a..b", "", "x" * 101, "a b", "é", "-lead"])
def test_bad_names_are_rejected(base, tmp_path, name):
    _, base_dir, _ = base
    lib = AdapterLibrary(tmp_path / "lib", create=True)
    with pytest.raises(LibraryError, match="invalid expert name"):  # checked before the source is read
        lib.add(name, tmp_path / "any-adapter-dir", _meta(base_dir))
    with pytest.raises(LibraryError, match="invalid expert name"):
        lib.get(name)
    assert _entries(lib.root) == [] and _entries(tmp_path) == ["lib"]


def test_base_model_mismatch_is_detected(base, tmp_path):
    model, base_dir, other_dir = base
    lib = AdapterLibrary(tmp_path / "lib", create=True)
    lib.add("e", _lora(model, 1), _meta(base_dir))
    assert lib.check_compatible("e", base_dir).name == "e"
    with pytest.raises(LibraryError, match="another base model"):
        lib.check_compatible("e", other_dir)
    lib.add("f", _lora(model, 2), _meta(other_dir))  # pretend f was trained on the other model
    with pytest.raises(LibraryError, match="different base models"):
        lib.merge(["e", "f"], "ef")
    with pytest.raises(LibraryError, match="cannot identify the base model"):
        lib.add("g", _lora(model, 3), {"task": "no base model given"})


def test_failed_add_leaves_nothing_behind(base, tmp_path):
    model, base_dir, _ = base
    lib = AdapterLibrary(tmp_path / "lib", create=True)
    with pytest.raises(LibraryError, match="JSON"):  # fails after the weights were written
        lib.add("e", _lora(model, 1), _meta(base_dir, metrics={"bad": object()}))
    assert _entries(lib.root) == []
    src = tmp_path / "src"
    _lora(model, 1).save_pretrained(str(src))
    (src / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(LibraryError, match="adapter_model.safetensors"):
        lib.add("e", src, _meta(base_dir))
    assert _entries(lib.root) == []


def test_merge_lora_experts(base, tmp_path):
    model, base_dir, _ = base
    lib = AdapterLibrary(tmp_path / "lib", create=True)
    for i in range(2):
        lib.add(f"e{i}", _lora(model, i), _meta(base_dir))
    merged = lib.merge(["e0", "e1"], "avg", rank=8)  # two rank-4 deltas: rank <= 8, so exact
    assert merged.meta["parents"] == ["e0", "e1"] and merged.rank == 8 and merged.scaling == 1.0
    assert merged.meta["metrics"]["refactor_rel_error"] < 1e-5
    want = merge_lora_uniform([lib.lora_pairs("e0"), lib.lora_pairs("e1")], scalings=[2.0, 2.0])
    got = lib.lora_pairs("avg")
    for m in want:
        A, B = got[m]
        assert torch.allclose(B @ A, want[m], atol=1e-5)
    lossy = lib.merge(["e0", "e1"], "avg4")  # default rank 4: truncation loses something
    assert lossy.rank == 4 and lossy.meta["metrics"]["refactor_rel_error"] > 0.01

    lib.add("rank2", _lora(model, 5, r=2), _meta(base_dir))
    with pytest.raises(LibraryError, match="rank mismatch"):
        lib.merge(["e0", "rank2"], "bad")
    lib.add("qk", _lora(model, 6, targets=("q_proj", "k_proj")), _meta(base_dir))
    with pytest.raises(LibraryError, match="target-module mismatch"):
        lib.merge(["e0", "qk"], "bad")
    assert "bad" not in lib


def test_sparse_experts(base, tmp_path):
    model, base_dir, _ = base
    lib = AdapterLibrary(tmp_path / "lib", create=True)
    params = dict(model.named_parameters())
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    adapters = []
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        grads = {n: torch.randn(params[n].shape, generator=g) for n in names}
        masks = connection_sensitivity_mask({n: params[n].detach() for n in names}, grads, keep_ratio=0.05)
        values = {n: torch.randn(params[n].shape, generator=g) * masks[n] for n in names}
        adapters.append(SparseAdapter(masks, values))
        lib.add(f"sp{seed}", adapters[-1], _meta(base_dir, keep_ratio=0.05))
    e = lib.get("sp0")
    assert e.adapter_type == "sparse" and e.rank is None and e.target_modules == ["down_proj", "q_proj"]
    assert sorted(os.listdir(e.path)) == ["meta.json", "sparse_adapter.safetensors", "sparse_config.json"]
    masks0, deltas0 = lib.load_sparse("sp0")
    for n in names:
        assert torch.equal(masks0[n], adapters[0].masks()[n]) and torch.equal(deltas0[n], adapters[0].dense_deltas()[n])

    merged = lib.merge(["sp0", "sp1"], "sp-avg")
    mm, md = lib.load_sparse("sp-avg")
    masks1, deltas1 = lib.load_sparse("sp1")
    for n in names:
        count = masks0[n].float() + masks1[n].float()
        assert torch.equal(mm[n], masks0[n] | masks1[n])
        assert torch.allclose(md[n], (deltas0[n] + deltas1[n]) / count.clamp(min=1))
    assert merged.meta["recipe"] == {"method": "sparse_overlap_average"}
    with pytest.raises(LibraryError, match="not a LoRA"):
        lib.load_lora_state("sp0")
    lib.add("lora", _lora(model, 1), _meta(base_dir))
    with pytest.raises(LibraryError, match="cannot combine"):
        lib.merge(["sp0", "lora"], "mixed")


def test_cli(base, tmp_path, capsys):
    model, base_dir, _ = base
    root = str(tmp_path / "lib")
    for i in range(3):
        _lora(model, i).save_pretrained(str(tmp_path / f"src{i}"))
    assert cli_main(["library", "list", "--root", root]) == 2
    assert "does not exist" in capsys.readouterr().err
    for i in range(3):
        rc = cli_main(["library", "add", f"e{i}", str(tmp_path / f"src{i}"), "--root", root, "--create",
                       "--base-model", str(base_dir), "--task", f"t{i}", "--steps", "5", "--metrics", '{"acc": 0.5}'])
        assert rc == 0
    assert cli_main(["library", "list", "--root", root]) == 0
    out = capsys.readouterr().out
    assert all(f"e{i}" in out for i in range(3)) and "q_proj,v_proj" in out
    assert cli_main(["library", "show", "e1", "--root", root, "--base-model", str(base_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["task"] == "t1"
    assert cli_main(["library", "merge", "m", "e0", "e1", "--root", root, "--weights", "0.5,0.5"]) == 0
    assert cli_main(["library", "cluster", "-k", "2", "--root", root, "--json"]) == 0
    capsys.readouterr()
    assert cli_main(["library", "cluster", "e0", "e1", "e2", "-k", "2", "--root", root, "--json"]) == 0
    clusters = json.loads(capsys.readouterr().out)
    assert sorted(clusters) == ["cluster-0", "cluster-1"]
    assert sorted(n for c in clusters.values() for n in c["experts"]) == ["e0", "e1", "e2"]
    assert cli_main(["library", "export", "m", str(tmp_path / "out"), "--root", root]) == 0
    assert (tmp_path / "out" / "adapter_config.json").is_file()
    assert cli_main(["library", "remove", "e2", "--root", root]) == 0
    assert cli_main(["library", "show", "e2", "--root", root]) == 2
    assert "no expert named 'e2'" in capsys.readouterr().err


def _gapped_lora_state(state, seed):
    """Replace each (A, B) by factors with singular values (3, 1, 0.5, 0.25): a clear top direction,
    so PEFT's 15-step power iteration converges to the exact prototype."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m, (A, B) in lora_pairs(state).items():
        r, d_in, d_out = A.shape[0], A.shape[1], B.shape[0]
        qa = torch.linalg.qr(torch.randn(d_in, r, generator=g)).Q.T  # [r, in], orthonormal rows
        qb = torch.linalg.qr(torch.randn(d_out, r, generator=g)).Q  # [out, r], orthonormal columns
        out[f"{m}.lora_A.weight"] = (torch.tensor([3.0, 1.0, 0.5, 0.25])[:, None] * qa).contiguous()
        out[f"{m}.lora_B.weight"] = qb.contiguous()
    return out


def test_peft_arrow_routing_agrees_with_arrow_route(base, tmp_path):
    from safetensors.torch import save_file

    model, base_dir, _ = base
    lib = AdapterLibrary(tmp_path / "lib", create=True)
    names = ["a", "b", "c"]
    for i, n in enumerate(names):
        src = tmp_path / f"src-{n}"
        pm = _lora(model, i)
        pm.save_pretrained(str(src))
        save_file(_gapped_lora_state(peft.get_peft_model_state_dict(pm), seed=10 + i), str(src / "adapter_model.safetensors"))
        lib.add(n, src, _meta(base_dir))

    top_k, temperature = 2, 0.7
    arrow = build_peft_arrow_model(lib, names, copy.deepcopy(model), top_k=top_k, temperature=temperature,
                                   rng_seed=0, base_model_dir=base_dir).eval()
    layer = arrow.base_model.model.model.layers[1].self_attn.q_proj
    seen = {}
    layer.register_forward_hook(lambda mod, inp, out: seen.update(x=inp[0].detach(), y=out.detach()))
    with torch.no_grad():
        arrow(torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]]))

    module = "base_model.model.model.layers.1.self_attn.q_proj"
    pairs = [lib.lora_pairs(n)[module] for n in names]
    A = torch.stack([p[0] for p in pairs])  # [E, r, in]
    B = torch.stack([p[1] for p in pairs])  # [E, out, r]
    protos = expert_prototypes(A, B)
    peft_protos = layer.lora_arrow["arrow_router"].prototypes
    assert torch.allclose((peft_protos * protos).sum(1).abs(), torch.ones(3), atol=1e-4)  # same lines

    x = seen["x"]
    weights = arrow_route(x.reshape(-1, x.shape[-1]), protos, top_k=top_k, temperature=temperature)
    assert (weights > 0).sum(1).eq(top_k).all()
    with torch.no_grad():
        want = arrow_lora_forward(x, layer.base_layer(x), A, B, weights, scaling=lib.get("a").scaling)
    assert torch.allclose(seen["y"], want, atol=1e-5)


def test_replace_writes_a_newer_version_in_place(base, tmp_path):
    model, base_dir, _ = base
    lib = AdapterLibrary(tmp_path / "lib", create=True)
    lib.add("run-x", _lora(model, seed=1), _meta(base_dir, steps=2))
    with pytest.raises(LibraryError, match="already exists"):
        lib.add("run-x", _lora(model, seed=2), _meta(base_dir, steps=4))
    newer = lib.add("run-x", _lora(model, seed=2), _meta(base_dir, steps=4), replace=True)
    assert lib.get("run-x").meta["steps"] == 4 and newer.meta["weights_sha256"] != ""
    assert _entries(tmp_path / "lib") == ["run-x"]  # nothing left aside


def test_arrow_refuses_experts_of_different_ranks(base, tmp_path):
    model, base_dir, _ = base
    lib = AdapterLibrary(tmp_path / "lib", create=True)
    lib.add("r4", _lora(model, seed=1, r=4), _meta(base_dir))
    lib.add("r8", _lora(model, seed=2, r=8), _meta(base_dir))
    with pytest.raises(LibraryError, match="rank"):
        lib.check_mergeable(["r4", "r8"])


def test_sparse_adapter_on_a_tied_lm_head_moves_embedding_and_head_together():
    """On a tied model the LM head's weight is the embedding: the adapter names it once (by the
    embedding's name, as the checkpoint and vLLM do), and both uses of the matrix see W + delta."""
    from trainer.policies.sparse import target_weight_names

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    assert sorted(target_weight_names(model, ["lm_head", "q_proj"])) == ["model.embed_tokens.weight",
                                                                         "model.layers.0.self_attn.q_proj.weight"]
    name = "model.embed_tokens.weight"
    w = model.get_input_embeddings().weight
    mask = torch.rand(w.shape) < 0.1
    adapter = SparseAdapter({name: mask}, {name: torch.randn(w.shape) * mask})
    expected = copy.deepcopy(model)
    with torch.no_grad():
        expected.get_input_embeddings().weight.add_(adapter.dense_deltas()[name])  # tied: the head moves too
    ids = torch.tensor([[1, 5, 9, 3]])
    adapter.attach(model)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, expected(ids).logits, atol=1e-5)
    adapter.detach(model, merge=True)
    assert model.lm_head.weight is model.get_input_embeddings().weight  # still tied after the merge
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, expected(ids).logits, atol=1e-5)
