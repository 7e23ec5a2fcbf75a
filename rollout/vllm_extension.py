"""Methods added to every vLLM worker (``LLM(worker_extension_cls=...)``).

They run inside the worker process, where ``self`` is the vLLM worker, and are invoked
with ``llm.collective_rpc("rl_load_weights", args=(handle_dict,))``. Arguments cross as
plain dicts of strings: tensors passed through ``collective_rpc`` arrive as lists.
"""

from __future__ import annotations

import time

from rl.types import WeightHandle
from rollout.weight_sync import get_transport


class WeightSyncExtension:
    def rl_load_weights(self, handle: dict) -> float:
        """Load a published policy version in place; returns seconds spent."""
        t0 = time.perf_counter()
        h = WeightHandle(**handle)
        # reload_weights (not model.load_weights) also repacks CPU linear weights and resets LoRA caches.
        self.reload_weights(weights_iterator=get_transport(h.transport).receive(h))
        return time.perf_counter() - t0
