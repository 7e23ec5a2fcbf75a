"""Methods added to every vLLM worker (``LLM(worker_extension_cls=...)``).

They run inside the worker process, where ``self`` is the vLLM worker, and are invoked
with ``llm.collective_rpc("rl_load_weights", args=(handle_dict,))``. Arguments cross as
plain dicts of strings: tensors passed through ``collective_rpc`` arrive as lists.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from rollout.types import WeightHandle
from rollout.weight_sync import Transports

# Loggers that warn about every layer a partial reload leaves alone (expected for sparse deltas).
_PARTIAL_RELOAD_LOGGERS = ("vllm.model_executor.model_loader.reload.layerwise", "vllm.model_executor.model_loader.reload.inplace")


@contextmanager
def _quiet(names):
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


class WeightSyncExtension:
    def rl_load_weights(self, handle: dict) -> float:
        """Load a published policy version in place; returns seconds spent."""
        t0 = time.perf_counter()
        h = WeightHandle(**handle)
        # reload_weights (not model.load_weights) also repacks CPU linear weights and resets LoRA caches.
        self.reload_weights(weights_iterator=self._rl_transport(h.transport).receive(h))
        self._rl_refresh_tied_layers()
        return time.perf_counter() - t0

    def rl_load_sparse_delta(self, handle: dict) -> float:
        """Serve a sparse adapter: each touched weight becomes ``base + delta`` (exact), reloaded in place.

        Only ``<weight>.indices`` / ``<weight>.values`` travel. The base values of the touched weights
        (and of the weights vLLM packs with them, e.g. q/k/v into qkv_proj, which reload together) are
        read once from the model's safetensors files and kept in host memory.
        """
        t0 = time.perf_counter()
        h = WeightHandle(**handle)
        deltas: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in self._rl_transport(h.transport).receive(h):
            weight, _, part = key.rpartition(".")
            deltas.setdefault(weight, {})[part] = t
        names = self._rl_with_packed_partners(set(deltas))
        base = self._rl_base_weights(names)

        def weights():
            for name in sorted(names):
                w = base[name]
                if name in deltas:
                    w = w.clone()
                    w.view(-1)[deltas[name]["indices"]] += deltas[name]["values"].to(w.dtype)
                yield name, w

        with _quiet(_PARTIAL_RELOAD_LOGGERS):
            self.reload_weights(weights_iterator=weights())
        self._rl_refresh_tied_layers()
        return time.perf_counter() - t0

    def _rl_transport(self, name: str):
        """This worker's reading side of transport ``name``, kept for the run."""
        return self.__dict__.setdefault("_rl_transports", Transports())[name]

    def _rl_refresh_tied_layers(self) -> int:
        """Redo the post-load processing of layers that share one weight (a tied LM head and embedding).

        The checkpoint has no ``lm_head.weight`` when it is tied, so an in-place reload fills only the
        embedding; the new values land in the storage both layers share, but the LM head's own
        post-load processing never runs again. On CPU that processing packs the weight into a
        oneDNN/SGL kernel copy, so the engine kept computing logits with the head it loaded at start
        while the embedding moved: a vLLM-vs-trainer logprob gap growing with every push. Returns
        the number of layers refreshed.
        """
        by_storage: dict[int, list[torch.nn.Module]] = {}
        for module in self.model_runner.get_model().modules():
            weight, method = getattr(module, "weight", None), getattr(module, "quant_method", None)
            if isinstance(weight, torch.Tensor) and weight.numel() and hasattr(method, "process_weights_after_loading"):
                by_storage.setdefault(weight.data_ptr(), []).append(module)
        refreshed = 0
        for modules in by_storage.values():
            if len(modules) > 1:
                for module in modules:
                    module.quant_method.process_weights_after_loading(module)
                    refreshed += 1
        return refreshed

    def _rl_with_packed_partners(self, names: set[str]) -> set[str]:
        """Add the checkpoint weights vLLM packs into one layer with any of ``names``."""
        packed = getattr(self.model_runner.get_model(), "packed_modules_mapping", {}) or {}
        out = set(names)
        for name in names:
            module, _, param = name.rpartition(".")
            parent, _, leaf = module.rpartition(".")
            for group in packed.values():
                if leaf in group:
                    out.update(f"{parent}.{p}.{param}" for p in group)
        return out

    def _rl_base_weights(self, names: set[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        cache = self.__dict__.setdefault("_rl_sparse_base", {})
        missing = names - set(cache)
        if missing:
            model_dir = Path(self.vllm_config.model_config.model)
            for f in sorted(model_dir.glob("*.safetensors")):
                with safe_open(str(f), framework="pt", device="cpu") as st:
                    for key in missing & set(st.keys()):
                        cache[key] = st.get_tensor(key)
            absent = names - set(cache)
            if absent:
                raise KeyError(f"sparse adapter weights not in {model_dir}'s safetensors files: {sorted(absent)[:3]}")
        return {n: cache[n] for n in names}
