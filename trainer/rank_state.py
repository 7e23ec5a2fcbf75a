"""Exact resume of one trainer rank: its optimizer moments, fp32 master partition (ZeRO-1/2),
scheduler, RNG state and policy version, in safetensors + JSON (no pickle)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def _optimizer_params(trainer) -> tuple[dict, list[tuple[str, torch.Tensor]]]:
    """The torch optimizer and its parameters under stable names.

    ZeRO-0: the model's own parameters, by name. ZeRO-1/2: DeepSpeed's fp32 partition of each
    parameter group on this rank (``zero/<group>``), which only the same number of ranks can load.
    """
    if trainer.cfg.zero_stage == 0:
        return trainer.optimizer, list(trainer.engine.module.named_parameters())
    if trainer.cfg.zero_stage in (1, 2):
        partitions = trainer.optimizer.single_partition_of_fp32_groups
        return trainer.optimizer.optimizer, [(f"zero/{i}", p) for i, p in enumerate(partitions)]
    raise NotImplementedError("exact resume needs trainer.zero_stage 0, 1 or 2 (ZeRO-3 partitions the parameters too)")


def save_rank_state(trainer, path: str, stem: str = "trainer") -> None:
    """Optimizer state, RNG state and policy version of this rank: safetensors + JSON, no pickle.

    ``trainer`` is anything with a DeepSpeed engine and its optimizer, scheduler, ``cfg``, ``setup``, ``device``
    and ``version`` (the policy's trainer; PPO's critic under ``stem="critic"``)."""
    from safetensors.torch import save_file

    optimizer, named = _optimizer_params(trainer)
    names = {id(p): n for n, p in named}
    tensors: dict[str, torch.Tensor] = {"rng/torch": torch.get_rng_state()}
    if trainer.device.type == "cuda":  # dropout and any sampling on the GPU draw from its own generator
        tensors["rng/cuda"] = torch.cuda.get_rng_state(trainer.device)
    if trainer.cfg.zero_stage in (1, 2):  # the fp32 master partitions (more precise than bf16 model weights)
        tensors.update({f"master/{n}": p.detach().cpu().contiguous() for n, p in named})
    scalars: dict[str, dict] = {}
    for p, st in optimizer.state.items():
        name = names[id(p)]
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state/{name}/{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(name, {})[k] = v
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    meta = {"version": trainer.version, "param_groups": groups, "scalars": scalars, "rank": trainer.setup.rank,
            "world_size": trainer.setup.world_size, "zero_stage": trainer.cfg.zero_stage,
            "scheduler": trainer.scheduler.state_dict() if trainer.scheduler is not None else None}
    Path(path).mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(Path(path) / f"{stem}-rank{trainer.setup.rank}.safetensors"))
    (Path(path) / f"{stem}-rank{trainer.setup.rank}.json").write_text(json.dumps(meta, default=list))


def load_rank_state(trainer, path: str, stem: str = "trainer") -> int:
    """Restore what ``save_state`` wrote (the policy's weights come from the checkpoint's model files)."""
    from safetensors.torch import load_file

    meta = json.loads((Path(path) / f"{stem}-rank{trainer.setup.rank}.json").read_text())
    saved = (meta.get("zero_stage", 0), meta.get("world_size", 1))
    if trainer.cfg.zero_stage != saved[0] or (trainer.cfg.zero_stage > 0 and trainer.setup.world_size != saved[1]):
        raise ValueError(f"{path}: optimizer state of ZeRO-{saved[0]} on {saved[1]} rank(s) cannot be loaded by "
                         f"ZeRO-{trainer.cfg.zero_stage} on {trainer.setup.world_size} rank(s)")
    tensors = load_file(str(Path(path) / f"{stem}-rank{trainer.setup.rank}.safetensors"))
    optimizer, named = _optimizer_params(trainer)
    params = dict(named)
    with torch.no_grad():
        for key, value in tensors.items():
            if key.startswith("state/"):
                name, field = key[len("state/") :].rsplit("/", 1)
                optimizer.state[params[name]][field] = value.to(trainer.device)
            elif key.startswith("master/"):
                params[key[len("master/") :]].copy_(value.to(trainer.device))
    for name, fields in meta["scalars"].items():
        optimizer.state[params[name]].update(fields)
    for group, saved_group in zip(optimizer.param_groups, meta["param_groups"]):
        group.update({k: tuple(v) if isinstance(v, list) else v for k, v in saved_group.items()})
    if trainer.scheduler is not None and meta.get("scheduler") is not None:
        trainer.scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng/torch"])
    if "rng/cuda" in tensors and trainer.device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng/cuda"], trainer.device)
    trainer.version = int(meta["version"])
    return trainer.version
