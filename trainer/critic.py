"""PPO's critic on one trainer rank: a value model (the policy's decoder architecture with a scalar head)
on its own DeepSpeed engine and optimizer. ``PolicyTrainer`` owns one when the algorithm needs it
(``Algorithm.critic``); the math (GAE, value loss) is ``trainer.algorithms.critic``."""

from __future__ import annotations

from pathlib import Path

import torch

from trainer import algorithms
from trainer.config import CriticConfig
from trainer.engine import (check_packing, clip_gradients, clips_in_hook, decoder_and_head, deepspeed_config,
                            forward_packed_or_padded, unpack)
from trainer.stats import Stats
from trainer.types import TrainBatch


class ValueModel(torch.nn.Module):
    """decoder + Linear(hidden, 1): one value per position, of the state before the token it predicts."""

    def __init__(self, causal_lm, seed: int = 0):
        super().__init__()
        parts = decoder_and_head(causal_lm)
        if parts is None:
            raise ValueError(f"{type(causal_lm).__name__}: the critic needs a causal LM with a plain decoder + LM head")
        self.decoder = parts[0]
        hidden = causal_lm.config.hidden_size
        self.value_head = torch.nn.Linear(hidden, 1, dtype=parts[1].weight.dtype)
        # Values start near 0 (the rewards' scale is unknown here); the decoder's features are the policy's. The same
        # head on every rank and in every run of one seed (not the rank-offset global generator).
        torch.nn.init.normal_(self.value_head.weight, std=1.0 / (hidden + 1), generator=torch.Generator().manual_seed(seed))
        torch.nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, **attention_kwargs):
        hidden = self.decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=use_cache, **attention_kwargs).last_hidden_state
        return self.value_head(hidden).squeeze(-1).float()  # [rows, T]


class Critic:
    """The value model of one rank. ``values(batch)`` scores a batch (no grad); ``loss(mb, counts, stats)``
    is a micro-batch's value loss; ``step()`` / ``zero_grad()`` follow the policy's update."""

    def __init__(self, cfg: CriticConfig, trainer_cfg, model, dtype: str, device, setup):
        import deepspeed

        self.critic_cfg = cfg
        # Batching, betas, decay, clipping and ZeRO as the policy's; its own learning rate.
        self.cfg = trainer_cfg.model_copy(update={"lr": cfg.lr})
        self.setup, self.device, self.version = setup, device, 0
        if trainer_cfg.max_tokens_per_micro_batch:  # its micro-batches are packed like the policy's
            check_packing(model)
        module = ValueModel(model, seed=setup.seed).to(device)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, model_parameters=[p for p in module.parameters() if p.requires_grad],
            config=deepspeed_config(self.cfg, dtype))
        if clips_in_hook(self.cfg, dtype):  # ZeRO-0 in float32: DeepSpeed leaves clipping to us, as for the policy
            self.optimizer.register_step_pre_hook(self._clip)

    def _clip(self, optimizer, args, kwargs) -> None:  # a step pre-hook must return None
        clip_gradients(optimizer, self.cfg.max_grad_norm)

    def _values(self, mb: dict) -> torch.Tensor:
        """[n, T-1] values at the positions that predict each response token; 0 elsewhere."""
        values = unpack(forward_packed_or_padded(self.engine, mb), mb)
        return torch.where(mb["response_mask"].bool(), values, 0.0)

    def values(self, batch: TrainBatch, micro_batches: list[tuple[list[int], dict]]) -> list[list[float]]:
        """The critic's value of every response token of ``batch`` (no grad), per row; ``micro_batches`` are the
        batch collated as the policy trainer cuts it, each with its row indices."""
        self.engine.eval()
        out: list[list[float]] = [[] for _ in range(len(batch))]
        with torch.no_grad():
            for rows, mb in micro_batches:
                values = unpack(forward_packed_or_padded(self.engine, mb), mb)  # [n, T-1]
                for i, v in zip(rows, values):
                    start = len(batch.prompt_token_ids[i]) - 1  # every response token, masked or not
                    out[i] = v[start : start + len(batch.response_token_ids[i])].tolist()
        return out

    def loss(self, mb: dict, counts: dict, stats: Stats) -> torch.Tensor:
        """The clipped value loss of one micro-batch, normalized by whole-batch token counts (always token-mean:
        each token's value is its own regression target)."""
        self.engine.train()
        mask = mb["response_mask"]
        loss, metrics = algorithms.get("value_loss", "clipped")(
            self._values(mb), mb["old_values"], mb["returns"], mask, clip=self.critic_cfg.value_clip,
            aggregation="token-mean", **counts)
        ntok = float(mask.sum())
        stats.sum("value_loss", loss.detach())
        stats.mean("value_clip_frac", metrics["value_clip_frac"] * ntok, ntok)
        stats.mean("value_error", metrics["value_error"] * ntok, ntok)
        return loss

    def backward(self, loss: torch.Tensor, world_size: int) -> None:
        self.engine.backward(loss * world_size, scale_wrt_gas=False)

    def grads_finite(self) -> bool:
        return all(bool(torch.isfinite(p.grad).all()) for p in self.engine.module.parameters() if p.grad is not None)

    def step(self) -> None:
        self.engine.step()

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    # ------------------------------------------------------------------ checkpoint

    def save(self, path: str) -> None:
        """Weights (rank 0, safetensors) and this rank's optimizer state, beside the policy's in ``path``."""
        from safetensors.torch import save_file

        from trainer.rank_state import save_rank_state

        if self.setup.rank == 0:
            Path(path).mkdir(parents=True, exist_ok=True)
            weights = {k: v.detach().cpu().contiguous() for k, v in self.engine.module.state_dict().items()}
            save_file(weights, str(Path(path) / "critic-weights.safetensors"))
        save_rank_state(self, path, stem="critic")

    def load(self, path: str) -> None:
        from safetensors.torch import load_file

        from trainer.rank_state import load_rank_state

        weights = load_file(str(Path(path) / "critic-weights.safetensors"))
        with torch.no_grad():
            for name, param in self.engine.module.state_dict().items():
                param.copy_(weights[name].to(param.device))
        load_rank_state(self, path, stem="critic")
