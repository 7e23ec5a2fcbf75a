"""A rollout worker owns one vLLM engine: it samples completions with per-token logprobs,
scores fixed completions, and loads new policy weights in place.

It is a plain class; ``rl/workers.py`` turns it into a Ray actor (or keeps it in-process).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Optional

from rollout.types import Completion, SamplingSpec, WeightHandle, WeightKind, prompt_key
from rollout.weight_sync import LocalCopies


@dataclass
class EngineSpec:
    model_path: str
    dtype: str = "float32"
    max_model_len: int = 256
    gpu_memory_utilization: float = 0.3
    cpu_kvcache_gib: int = 1
    enforce_eager: bool = True
    kv_block_size: int = 0  # 0: vLLM's default for the platform
    tensor_parallel_size: int = 1
    enable_sleep_mode: bool = False  # colocated with a trainer rank: the engine sleeps while it trains
    distributed_executor_backend: Optional[str] = None  # None: vLLM's choice ("ray" for a tensor-parallel engine under Ray)
    engine_in_process: bool = True
    seed: int = 0
    trust_remote_code: bool = False
    max_lora_rank: int = 0  # > 0 serves the policy as a LoRA adapter over the base model
    max_loras: int = 1  # LoRAs in one batch (> 1: one LoRA per prompt, an Arrow policy's per-prompt routing)
    cpu_threads: int = 0  # OpenMP threads of a CPU engine; 0 leaves Ray's (one per reserved CPU)
    log_file: Optional[str] = None  # this engine's stdout/stderr (vLLM's log) go here instead of the driver's terminal

    def env(self) -> dict[str, str]:
        """Environment the engine needs; must be set before vLLM is imported."""
        env = {"VLLM_CPU_KVCACHE_SPACE": str(self.cpu_kvcache_gib), "TOKENIZERS_PARALLELISM": "false"}
        if self.engine_in_process:
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if self.cpu_threads:
            env["OMP_NUM_THREADS"] = str(self.cpu_threads)  # Ray would pin one thread per reserved CPU
        return env


def _redirect_output(path: str) -> None:
    """Send this process's stdout and stderr (file descriptors 1 and 2, so C++ and child output too) to ``path``."""
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for target in (1, 2):
        os.dup2(fd, target)
    os.close(fd)


class RolloutWorker:
    def __init__(self, spec: EngineSpec):
        if spec.log_file:
            _redirect_output(spec.log_file)
        for k, v in spec.env().items():
            os.environ.setdefault(k, v)
        from vllm import LLM  # imported late: the environment above must be in place first

        self.spec = spec
        t0 = time.perf_counter()
        from vllm.platforms import current_platform

        # vLLM's CPU worker cannot rewind a seeded request's generator when a prompt's prefill is split
        # over two engine steps ("CPU Generator does not use offset"), so on CPU every prompt is prefilled
        # whole; the per-step token budget must then hold the longest one.
        no_chunking = {"enable_chunked_prefill": False, "max_num_batched_tokens": max(spec.max_model_len, 4096)} \
            if current_platform.is_cpu() else {}
        self.llm = LLM(
            model=spec.model_path,
            dtype=spec.dtype,
            max_model_len=spec.max_model_len,
            gpu_memory_utilization=spec.gpu_memory_utilization,
            enforce_eager=spec.enforce_eager,
            tensor_parallel_size=spec.tensor_parallel_size,
            distributed_executor_backend=spec.distributed_executor_backend,
            seed=spec.seed,
            trust_remote_code=spec.trust_remote_code,
            worker_extension_cls="rollout.vllm_extension.WeightSyncExtension",
            # The logprob of each sampled token under the distribution it was sampled from (after
            # temperature), which is what the trainer computes; vLLM's default is the raw T = 1 one.
            logprobs_mode="processed_logprobs",
            **no_chunking,
            **({"block_size": spec.kv_block_size} if spec.kv_block_size else {}),
            **({"enable_sleep_mode": True} if spec.enable_sleep_mode else {}),
            **({"enable_lora": True, "max_lora_rank": spec.max_lora_rank, "max_loras": spec.max_loras,
                "max_cpu_loras": spec.max_loras} if spec.max_lora_rank else {}),
        )
        self.lora_request = None  # set by load_weights when the policy is an adapter
        self.prompt_loras: dict = {}  # prompt_key -> LoRARequest, when the policy is served one LoRA per prompt
        self._lora_loads = 0
        self._partial_requests = 0  # request ids of generate_until's requests
        self.startup_seconds = time.perf_counter() - t0
        self.weight_version = 0
        self.local_copies = LocalCopies()  # versions that crossed nodes, pulled into this node's RAM

    def peak_rss_gib(self) -> float:
        """This actor's peak resident memory: the engine, its KV cache and the weights it holds."""
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    def ready(self) -> dict:
        return {"startup_seconds": self.startup_seconds, "pid": os.getpid()}

    def close(self) -> None:
        self.local_copies.close()

    def release(self) -> None:
        """Stop the engine now, not whenever it is garbage-collected. In the driver's process (``use_ray: false``)
        the engine shares torch.distributed with the trainer and with the next run's workers, and its teardown
        destroys that world: collected during a later run, it would pull the world from under that run."""
        self.llm.llm_engine.engine_core.shutdown()

    def join_weight_group(self, addr: str, port: int, world_size: int, rank: int, backend: str = "gloo") -> bool:
        """Join trainer rank 0's weight group (the collective transport) as ``rank``, over ``backend`` (gloo, nccl)."""
        import ray

        if not self.spec.engine_in_process or self.spec.tensor_parallel_size != 1:
            raise ValueError("cluster.weight_transport=collective needs rollout.engine_in_process=true and "
                             "rollout.tensor_parallel_size=1 (the group lives in the actor's process)")
        self.local_copies.transports["collective"].join(addr, port, world_size, rank, ray.util.get_node_ip_address(), backend)
        return True

    def local_copies_dir(self) -> str:
        return str(self.local_copies.directory)

    def _sampling_params(self, sampling: SamplingSpec, seed: Optional[int], **extra):
        from vllm import SamplingParams

        return SamplingParams(
            n=sampling.n,
            max_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else 0,
            logprobs=0 if sampling.logprobs else None,
            seed=seed,
            **extra,
        )

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingSpec) -> list[list[Completion]]:
        """B prompts (token ids) -> B lists of ``sampling.n`` completions with per-token logprobs."""
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_token_ids]
        # One seed per prompt, derived from the step's seed, so a step's samples are reproducible.
        seeds = sampling.seeds or [None if sampling.seed is None else sampling.seed + i for i in range(len(prompts))]
        params = [self._sampling_params(sampling, seed) for seed in seeds]
        outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self._lora_for(prompt_token_ids))
        result = []
        for i, out in enumerate(outputs):
            group = []
            for c in out.outputs:
                ids = list(c.token_ids)
                lps = [float(step[tok].logprob) for tok, step in zip(ids, c.logprobs)] if c.logprobs else []
                group.append(
                    Completion(
                        prompt_index=i,
                        prompt_token_ids=list(out.prompt_token_ids),
                        token_ids=ids,
                        text=c.text,
                        logprobs=lps,
                        finish_reason=str(c.finish_reason),
                        policy_version=self.weight_version,
                    )
                )
            result.append(group)
        return result

    def generate_until(self, groups: list[list[Completion]], sampling: SamplingSpec, groups_wanted: int) -> list[list[Completion]]:
        """Partial rollouts: continue every unfinished completion of ``groups`` (``finish_reason`` "", a fresh one
        with no tokens) until ``groups_wanted`` groups have all their completions finished, then stop the rest where
        they are. Returns the groups, each completion extended by the tokens sampled now (each token's version in
        ``token_versions``); the unfinished ones continue in a later call, under whatever weights are loaded then.

        A continued completion is a new request of prompt + its tokens so far: its KV cache is computed again, with
        the current weights. ``sampling.seeds``: one per group; a request's seed also depends on its completion's
        index and length, so a continuation never repeats the random stream of the request it continues.
        """
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        engine = self.llm.llm_engine
        loras = self._lora_for([g[0].prompt_token_ids for g in groups]) if groups else None
        running: dict[str, tuple[int, Completion]] = {}
        for g, group in enumerate(groups):
            for i, c in enumerate(group):
                if c.finished:
                    continue
                if not c.token_versions:
                    c.token_versions = [c.policy_version] * len(c.token_ids)
                seed = None if not sampling.seeds or sampling.seeds[g] is None else \
                    (sampling.seeds[g] + 7919 * i + 104729 * len(c.token_ids)) % 2**31
                rest = dataclasses.replace(sampling, n=1, max_new_tokens=sampling.max_new_tokens - len(c.token_ids))
                params = self._sampling_params(rest, seed, output_kind=RequestOutputKind.DELTA)
                self._partial_requests += 1
                request_id = f"partial-{self._partial_requests}"
                engine.add_request(request_id, TokensPrompt(prompt_token_ids=c.prompt_token_ids + c.token_ids), params,
                                   lora_request=loras[g] if isinstance(loras, list) else loras)
                running[request_id] = (g, c)
        open_per_group = [sum(not c.finished for c in group) for group in groups]
        done = sum(n == 0 for n in open_per_group)
        while running and done < groups_wanted:
            for out in engine.step():
                if out.request_id not in running:
                    continue
                g, c = running[out.request_id]
                o = out.outputs[0]
                ids = list(o.token_ids)
                c.token_ids += ids
                c.logprobs += [float(step[tok].logprob) for tok, step in zip(ids, o.logprobs)] if o.logprobs else []
                c.token_versions += [self.weight_version] * len(ids)
                c.text += o.text
                if out.finished:
                    c.finish_reason = str(o.finish_reason)
                    del running[out.request_id]
                    open_per_group[g] -= 1
                    done += open_per_group[g] == 0
        if running:
            engine.abort_request(list(running))
        for group in groups:
            for c in group:
                c.policy_version = min(c.token_versions, default=self.weight_version)
        return groups

    def score(self, prompt_token_ids: list[list[int]], completion_token_ids: list[list[int]]) -> list[list[float]]:
        """Logprob the engine gives each token of fixed completions (for checking weight sync)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=p + c) for p, c in zip(prompt_token_ids, completion_token_ids)]
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        if self.lora_request is None and not self.prompt_loras:
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        else:
            # vLLM-CPU 0.32 fails on batched prompt logprobs under LoRA (an einsum shape error): one at a time.
            loras = self._lora_for(prompt_token_ids)
            per_prompt = loras if isinstance(loras, list) else [loras] * len(prompts)
            outputs = [self.llm.generate([p], params, use_tqdm=False, lora_request=lora)[0] for p, lora in zip(prompts, per_prompt)]
        result = []
        for p, c, out in zip(prompt_token_ids, completion_token_ids, outputs):
            # prompt_logprobs[j] is the distribution at position j (None for the first token).
            entries = out.prompt_logprobs[len(p) :]
            result.append([float(e[tok].logprob) for tok, e in zip(c, entries)])
        return result

    def _new_lora(self, path: str):
        from vllm.lora.request import LoRARequest

        self._lora_loads += 1  # ids must be fresh: vLLM caches adapters by id, and a version can be re-published
        return LoRARequest(f"policy-{self._lora_loads}", self._lora_loads, path)

    def _lora_for(self, prompt_token_ids: list[list[int]]):
        """The LoRA request(s) for these prompts: one for all, or one per prompt (by ``prompt_key``)."""
        if not self.prompt_loras:
            return self.lora_request
        loras = [self.prompt_loras.get(prompt_key(p)) for p in prompt_token_ids]
        missing = [i for i, lora in enumerate(loras) if lora is None]
        if missing:
            raise KeyError(f"no per-prompt LoRA was published for prompt(s) {missing[:5]} of this request")
        return loras

    def sleep(self) -> None:
        """Free this engine's GPU memory for a trainer rank sharing its GPU: weights offloaded to CPU memory (kept, so a
        LoRA or sparse adapter's base stays), KV cache freed (``rollout.colocate``)."""
        self.llm.sleep(level=1)

    def wake_up(self, tags: Optional[list[str]] = None) -> None:
        """Take the GPU memory back: ``["weights"]`` before a weight push, then the rest (KV cache) before sampling."""
        self.llm.wake_up(tags)

    def load_weights(self, handle: WeightHandle) -> float:
        """Load a published policy version in place; returns seconds spent (max over TP workers).

        A LoRA (kind ``lora``) is a PEFT directory: it becomes the LoRA every request uses, under a fresh id (vLLM caches
        adapters by id); the base weights never move.
        A sparse adapter (kind ``sparse_delta``) arrives as indices/values; the worker adds it to
        its copy of the base values of the touched weights and reloads those weights in place.
        """
        t0 = time.perf_counter()
        handle = self.local_copies.localize(handle)
        if handle.is_lora:
            old = [self.lora_request, *self.prompt_loras.values()]
            if handle.kind == WeightKind.LORA_PER_PROMPT:
                self.lora_request = None
                self.prompt_loras = {key: self._new_lora(f"{handle.location}/{key}") for key in handle.names}
            else:
                self.lora_request, self.prompt_loras = self._new_lora(handle.location), {}
            for lora in old:
                if lora is not None:
                    self.llm.llm_engine.remove_lora(lora.lora_int_id)
            self._forget_cached_prefixes()
            self.weight_version = handle.version
            self.local_copies.loaded()
            return time.perf_counter() - t0
        method = "rl_load_sparse_delta" if handle.kind == WeightKind.SPARSE_DELTA else "rl_load_weights"
        self.llm.collective_rpc(method, args=(dataclasses.asdict(handle),))
        self._forget_cached_prefixes()
        self.weight_version = handle.version
        self.local_copies.loaded()
        return time.perf_counter() - t0

    def _forget_cached_prefixes(self) -> None:
        """Drop the prefix cache: its KV blocks were computed with the weights just replaced, and a
        prompt sharing a cached prefix (a chat template, a held-out prompt seen before) would reuse
        them. (A new LoRA's name is already part of its blocks' hashes; one rule for every kind of load is simpler.)"""
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache after a weight load (requests still running?)")
