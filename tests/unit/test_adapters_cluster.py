"""Model-based clustering (adapters/cluster.py): each step on hand-made vectors, the whole pipeline on
synthetic LoRA families, and the cluster -> union-of-data step through ``rl library cluster``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from adapters.cli import main as cli_main
from adapters.cluster import cluster_experts, expert_vectors, kmeans_labels, reduce_svd, sparsify_quantile, write_cluster_data
from adapters.library import AdapterLibrary

MODULES = ("layers.0.q_proj", "layers.1.v_proj")


# ---- the steps on hand-made vectors ----------------------------------------------------------
def test_sparsify_quantile_keeps_the_entries_at_or_above_each_rows_quantile():
    X = np.array([[1.0, -5.0, 2.0, 0.5, -3.0], [10.0, 20.0, 30.0, 40.0, 50.0]])
    # |row 0| sorted .5 1 2 3 5: the 0.6-quantile is 2.4; row 1's is 34 (linear interpolation)
    want = np.array([[0.0, -5.0, 0.0, 0.0, -3.0], [0.0, 0.0, 0.0, 40.0, 50.0]])
    assert np.array_equal(sparsify_quantile(X, 0.6), want)
    assert np.array_equal(sparsify_quantile(X, 0.0), X)  # q = 0 keeps everything
    assert X[0, 0] == 1.0  # the input is not modified
    R = np.random.default_rng(0).standard_normal((3, 1000)).astype(np.float32)
    S = sparsify_quantile(R)  # q = 0.8: the top 20% by magnitude of each row stay, as they are
    assert S.dtype == np.float32 and (S != 0).sum(axis=1).tolist() == [200, 200, 200]
    assert np.array_equal(S[S != 0], R[S != 0])
    assert np.abs(S).min(where=S != 0, initial=np.inf) >= np.quantile(np.abs(R), 0.8, axis=1).min()
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        sparsify_quantile(X, 1.0)


def test_reduce_svd_shapes_values_and_rotation():
    X = np.array([[3.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    Z = reduce_svd(X, dims=1)  # the top direction is e1 (σ² = 18 against 1)
    assert Z.shape == (3, 1) and np.allclose(np.abs(Z[:, 0]), [3.0, 0.0, 3.0])
    R = np.random.default_rng(1).standard_normal((3, 10))
    Z = reduce_svd(R, dims=64)  # d = min(64, n = 3, D = 10) = 3: a rotation, inner products kept
    assert Z.shape == (3, 3) and np.allclose(Z @ Z.T, R @ R.T)
    assert reduce_svd(np.random.default_rng(2).standard_normal((5, 3)), dims=2).shape == (5, 2)
    assert np.array_equal(reduce_svd(R, 2, seed=7), reduce_svd(R, 2, seed=7))
    with pytest.raises(ValueError, match="dims"):
        reduce_svd(R, dims=0)


@pytest.mark.parametrize("kmeans_input", ["unit", "similarity"])
def test_kmeans_labels_group_by_direction_not_norm(kmeans_input):
    # Euclidean k-means on the raw rows would split [10, .1] from the rest; under cosine it joins [1, 0].
    Z = np.array([[1.0, 0.0], [10.0, 0.1], [0.0, 1.0], [0.1, 5.0], [0.05, 0.9]])
    assert kmeans_labels(Z, 2, kmeans_input=kmeans_input).tolist() == [0, 0, 1, 1, 1]
    assert sorted(kmeans_labels(Z, 5, kmeans_input=kmeans_input).tolist()) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="k <= n"):
        kmeans_labels(Z, 6)
    with pytest.raises(ValueError, match="all zero"):
        kmeans_labels(np.vstack([Z, np.zeros(2)]), 2)
    with pytest.raises(ValueError, match="kmeans_input"):
        kmeans_labels(Z, 2, kmeans_input="euclid")


def test_expert_vectors_params_and_delta():
    g = torch.Generator().manual_seed(0)
    states = {n: _state(torch.randn(_numel(), generator=g)) for n in ("b", "a")}
    names, X = expert_vectors(states)
    assert names == ["a", "b"] and X.shape == (2, _numel()) and X.dtype == np.float32
    assert np.array_equal(X[0], torch.cat([states["a"][k].reshape(-1) for k in sorted(states["a"])]).numpy())
    names, X = expert_vectors(states, mode="delta", scales={"a": 2.0})
    pa = {m: (states["a"][f"{m}.lora_A.weight"], states["a"][f"{m}.lora_B.weight"]) for m in MODULES}
    want = torch.cat([2.0 * (B @ A).reshape(-1) for _, (A, B) in sorted(pa.items())])
    assert X.shape == (2, 2 * 12 * 16) and np.allclose(X[0], want.numpy(), atol=1e-6)
    del states["b"]["layers.0.q_proj.lora_A.weight"]
    with pytest.raises(ValueError, match="other tensors"):
        expert_vectors(states)
    with pytest.raises(ValueError, match="mode"):
        expert_vectors(states, mode="factors")


# ---- the whole pipeline on two families of LoRAs ---------------------------------------------------
def _numel():
    return len(MODULES) * (4 * 16 + 12 * 4)  # per module A [4, 16] + B [12, 4]


def _state(flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """A flat vector -> a PEFT LoRA state, rank 4, modules in MODULES."""
    out, i = {}, 0
    for m in MODULES:
        for key, shape in ((f"{m}.lora_A.weight", (4, 16)), (f"{m}.lora_B.weight", (12, 4))):
            n = shape[0] * shape[1]
            out[key] = flat[i : i + n].reshape(shape).clone()
            i += n
    return out


def _families(n_per=4, noise=0.1, seed=0):
    """Two families: each expert is c · (its family's random direction) + small noise, c in [0.5, 2]."""
    g = torch.Generator().manual_seed(seed)
    dirs = [torch.randn(_numel(), generator=g) for _ in range(2)]
    states = {}
    for f, d in enumerate(dirs):
        for i in range(n_per):
            c = 0.5 + 1.5 * torch.rand((), generator=g)
            states[f"f{f}-{i}"] = _state(c * d + noise * torch.randn(_numel(), generator=g))
    return states


@pytest.mark.parametrize("kmeans_input", ["unit", "similarity"])
@pytest.mark.parametrize("mode", ["params", "delta"])
def test_two_families_are_found_deterministically(mode, kmeans_input):
    states = _families()
    want = {0: [f"f0-{i}" for i in range(4)], 1: [f"f1-{i}" for i in range(4)]}
    got = cluster_experts(states, k=2, seed=0, mode=mode, kmeans_input=kmeans_input)
    assert got == want
    # the same partition, numbered the same, whatever the seed and whichever SVD size
    assert cluster_experts(states, k=2, seed=123, mode=mode, kmeans_input=kmeans_input) == want
    assert cluster_experts(states, k=2, svd_dims=2, quantile=0.5, mode=mode, kmeans_input=kmeans_input) == want


def test_cluster_experts_errors():
    states = _families(n_per=1)
    with pytest.raises(ValueError, match=r"-k 3: need 1 <= k <= the number of experts \(2\)"):
        cluster_experts(states, k=3)
    states["zero"] = {k: torch.zeros_like(v) for k, v in states["f0-0"].items()}
    with pytest.raises(ValueError, match=r"all-zero params .*\['zero'\]"):
        cluster_experts(states, k=2)


# ---- building the MBC library: each cluster's union of data ---------------------------------------
def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _library(tmp_path, data):
    """A library of the `_families` experts (PEFT LoRA files written by hand), meta 'data' from ``data``."""
    from safetensors.torch import save_file

    lib = AdapterLibrary(tmp_path / "lib", create=True)
    for name, state in _families(n_per=2).items():
        src = tmp_path / "src" / name
        src.mkdir(parents=True)
        save_file(state, str(src / "adapter_model.safetensors"))
        (src / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
        lib.add(name, src, {"base_model_hash": "sha256:" + "0" * 64, "data": data.get(name)})
    return lib


def test_write_cluster_data_unions_and_dedupes(tmp_path):
    a = _write_jsonl(tmp_path / "a.jsonl", [{"prompt": "a1"}, {"prompt": "a2"}])
    b = _write_jsonl(tmp_path / "b.jsonl", [{"prompt": "b1"}])
    d = tmp_path / "dir"
    d.mkdir()
    _write_jsonl(d / "x.jsonl", [{"prompt": "x1"}])
    manifest = write_cluster_data({"c0": ["e2", "e1"], "c1": ["e3"]}, {"e1": str(a), "e2": [a, b], "e3": d}, tmp_path / "out")
    assert manifest["c0"]["rows"] == 3 and manifest["c0"]["experts"] == ["e1", "e2"]  # a.jsonl read once
    lines = (tmp_path / "out" / "c0.jsonl").read_text().splitlines()
    assert [json.loads(x)["prompt"] for x in lines] == ["a1", "a2", "b1"]
    assert (tmp_path / "out" / "c1.jsonl").read_text() == '{"prompt": "x1"}\n'
    assert json.loads((tmp_path / "out" / "clusters.json").read_text()) == manifest
    _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}]).open("a").write("[1, 2]\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not a JSON object"):
        write_cluster_data({"c0": ["e1"]}, {"e1": tmp_path / "bad.jsonl"}, tmp_path / "out2")
    assert not list((tmp_path / "out2").glob("*.jsonl*"))  # nothing half-written
    with pytest.raises(ValueError, match="records no training data"):
        write_cluster_data({"c0": ["e1"]}, {"e1": None}, tmp_path / "out3")
    with pytest.raises(ValueError, match="builtin data"):
        write_cluster_data({"c0": ["e1"]}, {"e1": "builtin:arithmetic"}, tmp_path / "out3")


def test_cli_cluster_writes_the_union_data_and_the_train_lines(tmp_path, capsys):
    files = {n: _write_jsonl(tmp_path / f"{n}.jsonl", [{"prompt": f"{n}/{i}"} for i in range(3)]) for n in ("f0-0", "f0-1", "f1-0")}
    lib = _library(tmp_path, {n: str(p) for n, p in files.items()})  # f1-1 records no data
    root, out = str(lib.root), tmp_path / "mbc"
    assert cli_main(["library", "cluster", "-k", "2", "--root", root]) == 0
    assert capsys.readouterr().out.splitlines() == ["cluster-0: f0-0, f0-1", "cluster-1: f1-0, f1-1"]

    assert cli_main(["library", "cluster", "-k", "2", "--root", root, "--write-data", str(out)]) == 2
    assert "'f1-1' records no training data" in capsys.readouterr().err
    f11 = _write_jsonl(tmp_path / "f1-1.jsonl", [{"prompt": "f1-1/0"}])
    (tmp_path / "map.json").write_text(json.dumps({"f1-1": str(f11)}))
    args = ["library", "cluster", "-k", "2", "--root", root, "--write-data", str(out), "--data-map", str(tmp_path / "map.json"),
            "--recipe", "recipes/lora-arithmetic.yaml"]
    assert cli_main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"cluster-0: f0-0, f0-1  (6 rows in {out}/cluster-0.jsonl)"
    assert lines[-1] == (f"rl train recipes/lora-arithmetic.yaml data.train={out}/cluster-1.jsonl adapter.kind=lora "
                         f"adapter.source=new adapter.library={root} adapter.save_as=cluster-1")
    assert [json.loads(x)["prompt"] for x in (out / "cluster-1.jsonl").read_text().splitlines()] == ["f1-0/0", "f1-0/1", "f1-0/2", "f1-1/0"]
    assert cli_main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["cluster-0"]["experts"] == ["f0-0", "f0-1"] and report["cluster-1"]["rows"] == 4

    assert cli_main(["library", "cluster", "-k", "5", "--root", root]) == 2
    assert "-k 5: need 1 <= k <= the number of experts (4" in capsys.readouterr().err
    (tmp_path / "typo.json").write_text(json.dumps({"f9-9": str(f11)}))
    assert cli_main(["library", "cluster", "-k", "2", "--root", root, "--write-data", str(out),
                     "--data-map", str(tmp_path / "typo.json")]) == 2
    assert "--data-map names experts not in" in capsys.readouterr().err
    assert cli_main(["library", "cluster", "-k", "2", "--root", root, "--prefix", "f0-", "--write-data", str(out)]) == 2
    assert "already exist" in capsys.readouterr().err
