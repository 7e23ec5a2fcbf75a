"""Arrow routing over a library of LoRA experts.

"Towards Modular LLMs by Building and Reusing a Library of LoRAs" (Ostapenko et al. 2024,
https://arxiv.org/abs/2405.11157), Section 4. For one adapted Linear and experts ``e = 1..E`` with
LoRA deltas ``ΔW_e = B_e @ A_e`` ([out, in]):

- the *prototype* of expert e is the top right singular vector ``v_e`` of ``ΔW_e`` ([in]): the
  input direction that ``ΔW_e`` changes most. It is defined only up to sign, so routing uses
  ``|<h, v_e>|``;
- a token with hidden input ``h`` ([in]) is routed to the ``top_k`` experts with the largest
  ``|<h, v_e>|``, with weights ``softmax(score / temperature)`` over those k (0 for the others);
- the layer output is ``base(h) + Σ_e w_e · s_e · B_e A_e h`` (``s_e`` each expert's alpha/rank).

Prototypes need no data and no training: they are computed once from the weights, per layer.
Axis letters: ``T`` tokens (all leading dims flattened), ``E`` experts, ``r`` rank.

PEFT (>= 0.17) ships the same routing as ``peft.ArrowConfig`` + ``peft.create_arrow_model``;
``build_peft_arrow_model`` builds one from library experts. PEFT estimates each prototype by 15
power-iteration steps from a random start (exact only when the top two singular values of ``ΔW_e``
are well separated); ``expert_prototypes`` here uses an exact SVD.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:  # pragma: no cover
    from adapters.library import AdapterLibrary


def _as_list(x: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return list(x.unbind(0)) if isinstance(x, torch.Tensor) else list(x)


@torch.no_grad()
def expert_prototypes(
    lora_A: torch.Tensor | Sequence[torch.Tensor], lora_B: torch.Tensor | Sequence[torch.Tensor]
) -> torch.Tensor:
    """Arrow prototypes for one layer: per expert, the top right singular vector of ``B_e @ A_e``.

    lora_A: [E, r, in] (or a list of [r_e, in]); lora_B: [E, out, r] (or a list of [out, r_e])
    -> [E, in], unit norm, float32.

    Exact and cheap: with the reduced QR ``B = Q R`` (Q orthonormal columns), ``B A = Q (R A)`` has
    the right singular vectors of the small ``R A`` ([r, in]), so ``ΔW`` is never formed. The sign is
    fixed (largest-magnitude entry positive) only to make the output deterministic; routing is
    sign-agnostic. An expert whose delta is exactly zero in this layer has no prototype: ValueError.
    """
    As, Bs = _as_list(lora_A), _as_list(lora_B)
    if len(As) != len(Bs) or not As:
        raise ValueError(f"expert_prototypes: {len(As)} A matrices and {len(Bs)} B matrices")
    protos = []
    for e, (A, B) in enumerate(zip(As, Bs)):
        if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(f"expert_prototypes: expert {e} has A {tuple(A.shape)}, B {tuple(B.shape)}; want [r, in], [out, r]")
        _, R = torch.linalg.qr(B.float())  # R [min(out, r), r]
        _, S, Vh = torch.linalg.svd(R @ A.float(), full_matrices=False)  # Vh [k, in]
        if S[0] <= 0:
            raise ValueError(f"expert_prototypes: expert {e} has a zero delta (B @ A == 0): no prototype")
        v = Vh[0]
        protos.append(v if v[v.abs().argmax()] >= 0 else -v)
    return torch.stack(protos)  # [E, in]


def arrow_route(h: torch.Tensor, prototypes: torch.Tensor, top_k: int, temperature: float = 1.0) -> torch.Tensor:
    """Arrow routing weights.

    h: [T, in] token inputs to the layer; prototypes: [E, in] -> weights [T, E].
    score[t, e] = |<h_t, p_e>|; per token keep the ``top_k`` largest (``top_k`` is capped at E),
    weights = softmax(kept scores / temperature) on those, 0 elsewhere; each row sums to 1.
    (The paper and PEFT do not normalize h: its norm sharpens the softmax like a lower temperature.)
    """
    if h.dim() != 2 or prototypes.dim() != 2 or h.shape[1] != prototypes.shape[1]:
        raise ValueError(f"arrow_route: h {tuple(h.shape)} and prototypes {tuple(prototypes.shape)}; want [T, in] and [E, in]")
    if top_k < 1:
        raise ValueError(f"arrow_route: top_k must be >= 1, got {top_k}")
    if temperature <= 0:
        raise ValueError(f"arrow_route: temperature must be > 0, got {temperature}")
    scores = (h.float() @ prototypes.float().T).abs()  # [T, E]
    k = min(top_k, prototypes.shape[0])
    kept, idx = scores.topk(k, dim=1)  # [T, k]
    weights = torch.zeros_like(scores)
    return weights.scatter(1, idx, torch.softmax(kept / temperature, dim=1))


def arrow_lora_forward(
    x: torch.Tensor,
    base_out: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    weights: torch.Tensor,
    scaling: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """Layer output with routed experts.

    x: [..., in]; base_out: [..., out] (the frozen Linear on x); lora_A: [E, r, in]; lora_B: [E, out, r];
    weights: [T, E] with T = x[..., 0].numel() (from ``arrow_route``); scaling: a float or [E]
    (each expert's alpha/rank). Returns base_out + Σ_e weights[:, e] · scaling[e] · (x @ A_eᵀ @ B_eᵀ), [..., out].
    """
    lead, in_f = x.shape[:-1], x.shape[-1]
    tok = x.reshape(-1, in_f).float()  # [T, in]
    E = lora_A.shape[0]
    if weights.shape != (tok.shape[0], E):
        raise ValueError(f"arrow_lora_forward: weights {tuple(weights.shape)}, want [T={tok.shape[0]}, E={E}]")
    s = torch.as_tensor(scaling, dtype=torch.float32, device=x.device).expand(E)  # [E]
    z = torch.einsum("ti,eri->ter", tok, lora_A.float())  # [T, E, r]
    y = torch.einsum("ter,eor->teo", z, lora_B.float())  # [T, E, out]
    delta = torch.einsum("te,teo->to", weights.float() * s, y)  # [T, out]
    return base_out + delta.view(*lead, -1).to(base_out.dtype)


def build_peft_arrow_model(
    library: "AdapterLibrary",
    names: Sequence[str],
    base_model,
    top_k: int = 3,
    temperature: float = 1.0,
    rng_seed: int = 0,
    base_model_dir=None,
):
    """A PEFT Arrow model over library experts: ``peft.create_arrow_model`` on their directories.

    Expert ``names[i]`` becomes PEFT adapter ``task_i``; the router adapter is ``arrow_router``
    (active). The experts are verified (content hashes), must be LoRA with one rank and one set of
    target modules, and, when ``base_model_dir`` is given, must have been trained on it. GenKnowSub
    (``use_gks``) is left off. ``rng_seed`` seeds PEFT's power-iteration start (deterministic).
    """
    from peft import ArrowConfig, create_arrow_model

    experts = library.check_mergeable(names)
    if base_model_dir is not None:
        for n in names:
            library.check_compatible(n, base_model_dir)
    cfg = ArrowConfig(top_k=top_k, router_temperature=temperature, use_gks=False, rng_seed=rng_seed)
    return create_arrow_model(base_model, [str(e.path) for e in experts], arrow_config=cfg)


@torch.no_grad()
def peft_arrow_routing(arrow_model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Where a PEFT Arrow model (``build_peft_arrow_model``) routes the tokens of one batch.

    input_ids, attention_mask: [N, L] -> {routed module name: [E]}: the mean routing weight each expert gets
    over the batch's non-padding tokens (``arrow_route`` with the layer's own prototypes, top_k and temperature;
    each entry sums to 1). Expert ``e`` is ``names[e]`` of ``build_peft_arrow_model`` (PEFT adapter ``task_e``).
    With top_k == 1 it is the share of tokens sent to each expert. Runs one forward pass of ``arrow_model``.
    """
    mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).reshape(-1).bool()  # [N*L]
    routed = {n: m for n, m in arrow_model.named_modules() if "arrow_router" in getattr(m, "lora_arrow", {})}
    if not routed:
        raise ValueError("peft_arrow_routing: the model has no Arrow-routed module (build it with build_peft_arrow_model)")
    out: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, inputs, _output):
            router = module.lora_arrow["arrow_router"]
            x = inputs[0].reshape(-1, inputs[0].shape[-1])[mask]  # [T, in]
            w = arrow_route(x, router.prototypes, router.top_k, router.temperature)  # [T, E] in the layer's order
            # The layer orders experts by its adapter names (task_<e>); report them in library order.
            order = torch.tensor([int(a.removeprefix("task_")) for a in router.task_adapter_names])
            out[name] = torch.zeros(w.shape[1]).index_copy(0, order, w.mean(0).cpu())
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in routed.items()]
    try:
        arrow_model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for h in handles:
            h.remove()
    return out
