"""An Arrow-routed policy: library LoRA experts routed per token by Arrow (``adapters.arrow``), plus a new
LoRA beside them or with the experts themselves trained. vLLM applies one LoRA per request and
cannot route per token; it serves the routing *averaged over the prompt tokens of the batch about
to be sampled* (``arrow_serving: batch``) or of each prompt (``prompt``: one LoRA per prompt),
written exactly as a LoRA of rank ``E*r (+ r_new)``: ``Σ_e w̄_e s_e B_e A_e = [w̄_1 s_1 B_1 | ... ]
@ [A_1; ...]``. The trainer computes the exact per-token routing; the gap shows as
``logprob_mismatch`` and is corrected by truncated importance sampling (``algorithm.tis_cap``).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from adapters.arrow import arrow_lora_forward, arrow_route, expert_prototypes
from trainer.config import AdapterConfig
from trainer.batching import padded_prompts
from trainer.policies.base import Policy, held_numel

ARROW_CONFIG_FILE = "arrow_policy.json"
ARROW_WEIGHTS_FILE = "arrow_policy.safetensors"
LORA_CONFIG_FILE = "adapter_config.json"
PEFT_PREFIX = "base_model.model."


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


class ArrowPolicy(Policy):
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
    def reference(self) -> Iterator[nn.Module]:
        for layer in self.layers.values():
            layer.enabled = False
        try:
            yield self.model
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
                ids, mask = padded_prompts(prompts[start : start + batch_size], pad_id, device)
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

    def publish(self, transport, version, params=(), prompts=None, pad_id=0):
        if not prompts:
            raise ValueError("an Arrow-routed policy is served per batch: publish() needs the prompts about to be sampled")
        R = self.served_rank()  # alpha = rank below: vLLM's scale is then 1
        if self.meta.get("serving", "batch") == "batch":
            routing = self.mean_routing(prompts, pad_id)
            return transport.publish_lora(version, lambda d: _write_peft_lora(d, self.served_lora(routing), rank=R, alpha=float(R)))
        sums, counts = self.prompt_routing(prompts, pad_id)

        def write(directory: Path, i: int) -> int:
            routing = {m: s[i] / counts[i].clamp(min=1) for m, s in sums.items()}
            return _write_peft_lora(directory, self.served_lora(routing), rank=R, alpha=float(R))

        return transport.publish_prompt_loras(version, prompts, write)

    def numel_in_memory(self) -> int:
        held = held_numel(self.model)
        if self.meta["train"] == "experts":
            return held
        return held + sum(layer.expert_A.numel() + layer.expert_B.numel() for layer in self.layers.values())

    def save(self, path, base_model, state_dict=None):
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
