"""A trainer rank on a GPU saves its CUDA generator's state with its checkpoint and restores it on resume (dropout
and any sampling on the GPU draw from that generator, not the CPU's). Without a GPU here, torch.cuda's two RNG
calls are stood in for; the file written and read is the real one."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from trainer import rank_state


def _rank(device: torch.device):
    model = torch.nn.Linear(3, 2)
    return SimpleNamespace(cfg=SimpleNamespace(zero_stage=0), engine=SimpleNamespace(module=model),
                           optimizer=torch.optim.AdamW(model.parameters()), scheduler=None, device=device,
                           setup=SimpleNamespace(rank=0, world_size=1), version=7)


def test_a_gpu_rank_saves_and_restores_its_cuda_generator(monkeypatch, tmp_path):
    gpu = torch.device("cuda", 0)
    generator_state = torch.arange(16, dtype=torch.uint8)  # what the GPU's generator holds at the checkpoint
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: generator_state.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state, device)))

    rank_state.save_rank_state(_rank(gpu), str(tmp_path))
    resumed = _rank(gpu)
    resumed.version = 0
    assert rank_state.load_rank_state(resumed, str(tmp_path)) == 7
    assert len(restored) == 1 and torch.equal(restored[0][0], generator_state) and restored[0][1] == gpu


def test_a_cpu_rank_writes_no_cuda_generator(monkeypatch, tmp_path):
    from safetensors.torch import load_file

    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda *a: (_ for _ in ()).throw(AssertionError("no GPU here")))
    rank_state.save_rank_state(_rank(torch.device("cpu")), str(tmp_path))
    assert "rng/cuda" not in load_file(str(tmp_path / "trainer-rank0.safetensors"))
    assert rank_state.load_rank_state(_rank(torch.device("cpu")), str(tmp_path)) == 7
