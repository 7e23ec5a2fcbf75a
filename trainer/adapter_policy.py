"""Adapter policies: what the trainer trains when the policy is an adapter over a frozen base model.

One interface, three kinds; each decides how the rollout engines serve it, and only adapter
weights ever leave the trainer:

- ``LoraPolicy``: a PEFT LoRA (new, a library expert continued, or a merge). vLLM serves it as a
  LoRA; a sync is the adapter directory.
- ``SparsePolicy``: masked deltas on base weights (``adapters.sparse.SparseAdapter``; mask chosen
  once by connection sensitivity). vLLM has no sparse adapters, so a sync sends only the mask's
  (indices, values) and each engine rebuilds the touched weights as ``base + delta`` in place
  (``rollout/vllm_extension.py``): exact, logprob mismatch at float rounding.
- ``ArrowPolicy``: library LoRA experts routed per token by Arrow (``adapters.arrow``), plus a new
  LoRA beside them or with the experts themselves trained. vLLM applies one LoRA per request and
  cannot route per token; it serves the routing *averaged over the prompt tokens of the batch about
  to be sampled* (``arrow_serving: batch``) or of each prompt (``prompt``: one LoRA per prompt),
  written exactly as a LoRA of rank ``E*r (+ r_new)``: ``Σ_e w̄_e s_e B_e A_e = [w̄_1 s_1 B_1 | ... ]
  @ [A_1; ...]``. The trainer computes the exact per-token routing; the gap shows as
  ``logprob_mismatch`` and is corrected by truncated importance sampling (``algorithm.tis_cap``).

The reference model of every kind is the base with the adapter disabled (``disabled()``): no
second copy of the model.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from adapters.arrow import arrow_lora_forward, arrow_route, expert_prototypes
from adapters.sparse import SPARSE_CONFIG_FILE, SparseAdapter, connection_sensitivity_mask, sensitivity_inputs
from rl.config import AdapterConfig
from rl.types import WeightHandle, prompt_key

ARROW_CONFIG_FILE = "arrow_policy.json"
ARROW_WEIGHTS_FILE = "arrow_policy.safetensors"
LORA_CONFIG_FILE = "adapter_config.json"
PEFT_PREFIX = "base_model.model."


def trainable_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def _fresh_dir(root: Path, stem: str) -> tuple[Path, Path]:
    """A (temporary, final) pair of directory names no earlier publish used."""
    tag = f"{stem}-{uuid.uuid4().hex[:8]}"
    return root / f"{tag}.tmp", root / tag


def _padded(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input_ids and attention_mask [n, T]."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(list(p))
        mask[i, : len(p)] = 1
    return ids.to(device), mask.to(device)


class AdapterPolicy:
    """``model`` is what DeepSpeed wraps; only its trainable parameters are the adapter."""

    model: nn.Module

    def disabled(self):
        """Context manager: the base model alone (the KL / DPO reference)."""
        raise NotImplementedError

    def publish(self, transport, version: int, prompts=None, pad_id: int = 0) -> WeightHandle:
        """Write what the engines need for this version (rank 0) and say where it is."""
        raise NotImplementedError

    def release(self, transport, handle: WeightHandle) -> None:
        if handle.transport == "lora_dir":
            shutil.rmtree(handle.location, ignore_errors=True)
        else:
            transport.release(handle)

    def save(self, path: str | os.PathLike, base_model: str) -> None:
        """The adapter into a checkpoint directory (loadable by ``build_adapter_policy`` and the library)."""
        raise NotImplementedError

    def library_sources(self, checkpoint: str | os.PathLike) -> dict[str, Path]:
        """{name suffix: adapter directory} to write into the library ('' = the adapter itself)."""
        return {"": Path(checkpoint)}

    def frozen_adapter_numel(self) -> int:
        """Adapter entries held outside ``model.parameters()`` (e.g. frozen routed experts kept as buffers)."""
        return 0


# ---------------------------------------------------------------------------------------------- LoRA


class LoraPolicy(AdapterPolicy):
    def __init__(self, model: nn.Module, cfg: AdapterConfig, init_dir: Optional[str]):
        from peft import LoraConfig, PeftModel, get_peft_model

        if init_dir:
            self.model = PeftModel.from_pretrained(model, init_dir, is_trainable=True)
        else:
            lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                              target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")
            self.model = get_peft_model(model, lora)

    def disabled(self):
        return self.model.disable_adapter()

    def publish(self, transport, version, prompts=None, pad_id=0):
        root = Path(transport.directory)
        root.mkdir(parents=True, exist_ok=True)
        tmp, final = _fresh_dir(root, f"adapter-v{version:06d}")
        self.model.save_pretrained(tmp, safe_serialization=True)
        os.replace(tmp, final)
        return WeightHandle(version=version, transport="lora_dir", location=str(final), num_bytes=trainable_bytes(self.model))

    def save(self, path, base_model):
        self.model.save_pretrained(path, safe_serialization=True)


# -------------------------------------------------------------------------------------------- sparse


def target_weight_names(model: nn.Module, target_modules: Sequence[str]) -> list[str]:
    """``<module>.weight`` of every Linear whose last name component is in ``target_modules``."""
    names = [f"{n}.weight" for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in set(target_modules)]
    if not names:
        raise ValueError(f"adapter.target_modules {list(target_modules)} match no Linear layer of the model")
    return names


def snip_masks(model: nn.Module, names: list[str], prompts: Sequence[Sequence[int]], keep_ratio: float,
               block_size: Optional[int], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Connection-sensitivity masks from the base model's next-token loss on ``prompts``.

    RL has no labelled loss before the first rollout; the language-modelling loss of the task's own
    prompts says which weights the task's inputs run through. Same prompts, same masks on every rank.
    """
    params = dict(model.named_parameters())
    was = {n: p.requires_grad for n, p in params.items()}
    for n, p in params.items():
        p.requires_grad_(n in names)
    ids, mask = _padded(prompts, pad_id, device)
    labels = ids.masked_fill(mask == 0, -100)
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    masks = connection_sensitivity_mask(*sensitivity_inputs(model, names), keep_ratio=keep_ratio, block_size=block_size)
    model.zero_grad(set_to_none=True)
    for n, p in params.items():
        p.requires_grad_(was[n])
    return masks


class SparsePolicy(AdapterPolicy):
    def __init__(self, model: nn.Module, cfg: AdapterConfig, init_dir: Optional[str], calibration=None, pad_id: int = 0):
        if init_dir:
            self.adapter = SparseAdapter.load(init_dir)
            self.selection = json.loads((Path(init_dir) / SPARSE_CONFIG_FILE).read_text())
        else:
            if not calibration:
                raise ValueError("a new sparse adapter needs calibration prompts to choose its mask")
            device = next(model.parameters()).device
            names = target_weight_names(model, cfg.target_modules)
            masks = snip_masks(model, names, calibration, cfg.keep_ratio, cfg.block_size, pad_id, device)
            self.adapter = SparseAdapter(masks)
            self.selection = {"selection": "snip", "keep_ratio": cfg.keep_ratio, "block_size": cfg.block_size,
                              "calibration_prompts": len(calibration)}
        self.model = self.adapter.attach(model)

    def disabled(self):
        return self.adapter.disabled()

    def publish(self, transport, version, prompts=None, pad_id=0):
        handle = transport.publish(self.adapter.tensors().items(), version)
        handle.kind = "sparse_delta"
        return handle

    def save(self, path, base_model):
        extra = {k: v for k, v in self.selection.items() if k in ("selection", "keep_ratio", "block_size", "calibration_prompts")}
        self.adapter.save(path, base_model_name_or_path=base_model, **extra)


# --------------------------------------------------------------------------------------------- Arrow


class ArrowLinear(nn.Module):
    """A frozen Linear + Arrow-routed library experts (+ an optional new LoRA beside them).

    expert_A [E, r, in], expert_B [E, out, r], expert_scaling [E], prototypes [E, in];
    new_A [r_new, in], new_B [out, r_new] (B starts at zero: training starts at the routed library).

    Not PEFT's Arrow layer: it computes the routing inside its forward without exposing it (serving
    needs the routing weights), and a new LoRA trained beside routed experts is not a PEFT
    configuration. The math is ``adapters/arrow.py``'s, unit-tested against ``create_arrow_model``.
    """

    def __init__(self, base: nn.Linear, A, B, scaling, prototypes, top_k: int, temperature: float,
                 train_experts: bool, new_rank: int = 0, new_alpha: float = 1.0, new_A=None, new_B=None):
        super().__init__()
        self.base, self.top_k, self.temperature = base, top_k, temperature
        if train_experts:
            self.expert_A, self.expert_B = nn.Parameter(A.float().clone()), nn.Parameter(B.float().clone())
        else:
            self.register_buffer("expert_A", A.float().clone())
            self.register_buffer("expert_B", B.float().clone())
        self.register_buffer("expert_scaling", torch.as_tensor(scaling, dtype=torch.float32).clone())
        self.register_buffer("prototypes", prototypes.float().clone())
        self.new_A = self.new_B = None
        self.new_scaling = new_alpha / new_rank if new_rank else 0.0
        if new_rank:
            if new_A is None:
                new_A = torch.empty(new_rank, base.in_features)
                nn.init.kaiming_uniform_(new_A, a=5**0.5)  # PEFT's LoRA A init
                new_B = torch.zeros(base.out_features, new_rank)
            self.new_A, self.new_B = nn.Parameter(new_A.float().clone()), nn.Parameter(new_B.float().clone())
        self.enabled = True
        self.token_mask: Optional[torch.Tensor] = None  # [n, L] bool, set while calibrating: which tokens count
        self.route_rows: list[torch.Tensor] = []  # per calibration forward: routing summed over each row's tokens [n, E]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.enabled:
            return out
        flat = x.reshape(-1, x.shape[-1])
        weights = arrow_route(flat.detach(), self.prototypes, self.top_k, self.temperature)  # [T, E]
        if self.token_mask is not None:
            per_token = weights.view(*self.token_mask.shape, -1) * self.token_mask[..., None]  # [n, L, E]
            self.route_rows.append(per_token.sum(1))
        out = arrow_lora_forward(x, out, self.expert_A, self.expert_B, weights, self.expert_scaling)
        if self.new_A is not None:
            out = out + ((x.float() @ self.new_A.T) @ self.new_B.T * self.new_scaling).to(out.dtype)
        return out


class ArrowPolicy(AdapterPolicy):
    """Routed library experts; ``publish()`` needs the prompts about to be sampled (routing is averaged over them)."""

    def __init__(self, model: nn.Module, cfg: AdapterConfig, init_dir: Optional[str], experts: Sequence[str] = ()):
        """``experts``: library expert directories (PEFT LoRA), in ``cfg.experts`` order; or ``init_dir``,
        an ArrowPolicy checkpoint (resume)."""
        from safetensors.torch import load_file

        model.requires_grad_(False)
        if init_dir:
            meta = json.loads((Path(init_dir) / ARROW_CONFIG_FILE).read_text())
            tensors = load_file(str(Path(init_dir) / ARROW_WEIGHTS_FILE))
        else:
            meta, tensors = _arrow_from_experts(cfg, experts)
        self.meta = {**meta, "serving": cfg.arrow_serving}  # how it is served is this run's choice
        self.layers: dict[str, ArrowLinear] = {}
        for m in meta["modules"]:
            parent, _, child = m.rpartition(".")
            base = model.get_submodule(m)
            layer = ArrowLinear(
                base, tensors[f"{m}.expert_A"], tensors[f"{m}.expert_B"], tensors[f"{m}.expert_scaling"],
                tensors[f"{m}.prototypes"], meta["top_k"], meta["temperature"], meta["train"] == "experts",
                meta["new_rank"], meta["new_alpha"], tensors.get(f"{m}.new_A"), tensors.get(f"{m}.new_B"),
            ).to(base.weight.device)
            setattr(model.get_submodule(parent), child, layer)
            self.layers[m] = layer
        self.model = model

    @contextmanager
    def disabled(self) -> Iterator[None]:
        for layer in self.layers.values():
            layer.enabled = False
        try:
            yield
        finally:
            for layer in self.layers.values():
                layer.enabled = True

    @torch.no_grad()
    def prompt_routing(self, prompts: Sequence[Sequence[int]], pad_id: int, batch_size: int = 64):
        """Routing summed over each prompt's tokens: ({module: [N, E]}, token counts [N])."""
        device = next(self.model.parameters()).device
        counts = []
        was_training = self.model.training
        self.model.eval()
        try:
            for layer in self.layers.values():
                layer.route_rows = []
            for start in range(0, len(prompts), batch_size):
                ids, mask = _padded(prompts[start : start + batch_size], pad_id, device)
                for layer in self.layers.values():
                    layer.token_mask = mask.bool()
                self.model(input_ids=ids, attention_mask=mask)
                counts.append(mask.sum(1))
            sums = {m: torch.cat(layer.route_rows).cpu() for m, layer in self.layers.items()}
        finally:
            for layer in self.layers.values():
                layer.token_mask, layer.route_rows = None, []
            self.model.train(was_training)
        return sums, torch.cat(counts).cpu().float()

    def mean_routing(self, prompts: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
        """{module: routing weights [E] averaged over every prompt token of the batch}."""
        sums, counts = self.prompt_routing(prompts, pad_id)
        return {m: s.sum(0) / counts.sum().clamp(min=1) for m, s in sums.items()}

    def served_lora(self, routing: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{module: (A [R, in], B [out, R])} with R = E*r (+ r_new): Σ_e w̄_e s_e B_e A_e (+ s_new B_new A_new)."""
        out = {}
        for m, layer in self.layers.items():
            w = routing[m] * layer.expert_scaling.cpu()  # [E]
            A = [a for a in layer.expert_A.detach().cpu()]
            B = [b * w[e] for e, b in enumerate(layer.expert_B.detach().cpu())]
            if layer.new_A is not None:
                A.append(layer.new_A.detach().cpu())
                B.append(layer.new_B.detach().cpu() * layer.new_scaling)
            out[m] = (torch.cat(A, 0).contiguous(), torch.cat(B, 1).contiguous())
        return out

    def served_rank(self) -> int:
        return served_arrow_rank(self.meta["expert_rank"], len(self.meta["experts"]), self.meta["new_rank"])

    def publish(self, transport, version, prompts=None, pad_id=0):
        if not prompts:
            raise ValueError("an Arrow-routed policy is served per batch: publish() needs the prompts about to be sampled")
        root = Path(transport.directory)
        root.mkdir(parents=True, exist_ok=True)
        tmp, final = _fresh_dir(root, f"arrow-v{version:06d}")
        R = self.served_rank()  # alpha = rank below: vLLM's scale is then 1
        if self.meta.get("serving", "batch") == "batch":
            num_bytes = _write_peft_lora(tmp, self.served_lora(self.mean_routing(prompts, pad_id)), rank=R, alpha=float(R))
            os.replace(tmp, final)
            return WeightHandle(version=version, transport="lora_dir", location=str(final), num_bytes=num_bytes)
        sums, counts = self.prompt_routing(prompts, pad_id)
        keys, num_bytes = [], 0
        for i, p in enumerate(prompts):
            key = prompt_key(p)
            if key in keys:
                continue
            routing = {m: s[i] / counts[i].clamp(min=1) for m, s in sums.items()}
            num_bytes += _write_peft_lora(tmp / key, self.served_lora(routing), rank=R, alpha=float(R))
            keys.append(key)
        os.replace(tmp, final)
        return WeightHandle(version=version, transport="lora_dir", location=str(final), num_bytes=num_bytes,
                            names=keys, kind="lora_per_prompt")

    def frozen_adapter_numel(self) -> int:
        if self.meta["train"] == "experts":
            return 0
        return sum(layer.expert_A.numel() + layer.expert_B.numel() for layer in self.layers.values())

    def save(self, path, base_model):
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for m, layer in self.layers.items():
            for key in ("expert_A", "expert_B", "expert_scaling", "prototypes", "new_A", "new_B"):
                t = getattr(layer, key)
                if t is not None:
                    tensors[f"{m}.{key}"] = t.detach().float().cpu().contiguous()
        save_file(tensors, str(path / ARROW_WEIGHTS_FILE))
        (path / ARROW_CONFIG_FILE).write_text(json.dumps({**self.meta, "base_model": base_model}, indent=2) + "\n")
        # The trained parts as plain PEFT LoRA directories, so the library (and PEFT) can take them.
        if self.meta["new_rank"]:
            _write_peft_lora(path / "new_lora", {m: (l.new_A.detach().cpu(), l.new_B.detach().cpu()) for m, l in self.layers.items()},
                             rank=self.meta["new_rank"], alpha=self.meta["new_alpha"], base_model=base_model)
        if self.meta["train"] == "experts":
            for e, name in enumerate(self.meta["experts"]):
                pairs = {m: (l.expert_A[e].detach().cpu(), l.expert_B[e].detach().cpu()) for m, l in self.layers.items()}
                _write_peft_lora(path / "experts" / name, pairs, rank=self.meta["expert_rank"],
                                 alpha=self.meta["expert_alpha"][e], base_model=base_model)

    def library_sources(self, checkpoint):
        ck = Path(checkpoint)
        if self.meta["train"] == "experts":
            return {f"-{name}": ck / "experts" / name for name in self.meta["experts"]}
        return {"": ck / "new_lora"}


def served_arrow_rank(expert_rank: int, num_experts: int, new_rank: int) -> int:
    """Rank of the single LoRA that serves an Arrow policy: every expert's rank plus the new adapter's."""
    return expert_rank * num_experts + new_rank


def _arrow_from_experts(cfg: AdapterConfig, expert_dirs: Sequence[str]) -> tuple[dict, dict[str, torch.Tensor]]:
    """Arrow tensors from library LoRA experts: stacked A/B, scales and prototypes per module."""
    from safetensors.torch import load_file

    from adapters.library import LORA_WEIGHTS_FILE, lora_pairs, lora_scaling

    pairs, scales, alphas, rank = [], [], [], None
    for d in expert_dirs:
        lcfg = json.loads((Path(d) / LORA_CONFIG_FILE).read_text())
        pairs.append(lora_pairs(load_file(str(Path(d) / LORA_WEIGHTS_FILE))))
        scales.append(lora_scaling(lcfg["lora_alpha"], lcfg["r"], lcfg.get("use_rslora", False)))
        alphas.append(float(lcfg["lora_alpha"]))
        rank = lcfg["r"]
    tensors: dict[str, torch.Tensor] = {}
    modules = []
    for peft_name in sorted(pairs[0]):
        m = peft_name[len(PEFT_PREFIX):] if peft_name.startswith(PEFT_PREFIX) else peft_name
        A = torch.stack([p[peft_name][0].float() for p in pairs])  # [E, r, in]
        B = torch.stack([p[peft_name][1].float() for p in pairs])  # [E, out, r]
        tensors[f"{m}.expert_A"], tensors[f"{m}.expert_B"] = A, B
        tensors[f"{m}.expert_scaling"] = torch.tensor(scales, dtype=torch.float32)
        tensors[f"{m}.prototypes"] = expert_prototypes(A, B)
        modules.append(m)
    new_rank = cfg.rank if cfg.arrow_train == "new" else 0
    meta = {"experts": list(cfg.experts), "top_k": cfg.top_k, "temperature": cfg.router_temperature,
            "train": cfg.arrow_train, "new_rank": new_rank, "new_alpha": cfg.alpha, "expert_rank": rank,
            "expert_alpha": alphas, "modules": modules, "serving": cfg.arrow_serving}
    return meta, tensors


def _write_peft_lora(directory: Path, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int, alpha: float,
                     base_model: Optional[str] = None) -> int:
    """A PEFT LoRA directory (adapter_config.json + adapter_model.safetensors); returns the weight bytes."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    suffixes = sorted({m.rsplit(".", 1)[-1] for m in pairs})
    LoraConfig(r=rank, lora_alpha=alpha, target_modules=suffixes, task_type="CAUSAL_LM",
               base_model_name_or_path=base_model).save_pretrained(str(directory))
    state = {}
    for m, (a, b) in pairs.items():
        state[f"{PEFT_PREFIX}{m}.lora_A.weight"] = a.float().contiguous()
        state[f"{PEFT_PREFIX}{m}.lora_B.weight"] = b.float().contiguous()
    save_file(state, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    return sum(t.numel() * t.element_size() for t in state.values())


# --------------------------------------------------------------------------------------------- build


def build_adapter_policy(model: nn.Module, cfg: AdapterConfig, init_dir: Optional[str], *, expert_dirs: Sequence[str] = (),
                         calibration=None, pad_id: int = 0) -> AdapterPolicy:
    """The policy for ``cfg.mode``; an ``init_dir`` (library expert, merge, checkpoint) decides its kind by its files."""
    if init_dir:
        d = Path(init_dir)
        if (d / SPARSE_CONFIG_FILE).is_file():
            return SparsePolicy(model, cfg, init_dir)
        if (d / ARROW_CONFIG_FILE).is_file():
            return ArrowPolicy(model, cfg, init_dir)
        return LoraPolicy(model, cfg, init_dir)
    if cfg.mode == "sparse":
        return SparsePolicy(model, cfg, None, calibration=calibration, pad_id=pad_id)
    if cfg.mode == "arrow":
        return ArrowPolicy(model, cfg, None, experts=expert_dirs)
    return LoraPolicy(model, cfg, None)
