"""What the run's processes get before they start: threads per phase, the trainer's memory estimate (stated
at start, a warning past this machine's memory), the transport weights travel by, and how each engine starts."""

from __future__ import annotations

import os
from typing import Optional

from rl.config import Recipe, RecipeError
from rl.models import log as _log
from rollout.config import LORA_RANKS
from trainer.policies import PolicySpec


def thread_counts(recipe: Recipe, cores: Optional[int] = None) -> tuple[int, int]:
    """(torch threads per trainer rank, OpenMP threads per CPU engine).

    Ray gives an actor reserving one CPU one thread (``OMP_NUM_THREADS=1``). In the synchronous loop
    the engines and the trainer never run at the same time, so each phase gets every core of the
    node; with asynchronous rollout they run at once and split the cores. An explicit thread count
    wins; an explicit CPU reservation keeps Ray's pinning (threads = reserved CPUs).

    >>> from rl.config import load_recipe
    >>> thread_counts(load_recipe(None, check_paths=False), cores=2)
    (2, 2)
    >>> thread_counts(load_recipe(None, ["rollout.max_staleness=1"], check_paths=False), cores=2)
    (1, 1)
    >>> thread_counts(load_recipe(None, ["trainer.num_ranks=2", "rollout.num_cpus_per_actor=1"], check_paths=False), cores=2)
    (1, 1)
    """
    cores = cores or len(os.sched_getaffinity(0))
    t, ro = recipe.trainer, recipe.rollout
    together = t.num_ranks + ro.num_actors
    sync = ro.batches_ahead == 0

    def threads(explicit: int, cpus_field: str, section, share: int) -> int:
        if explicit:
            return explicit
        if cpus_field in section.model_fields_set:
            return max(1, int(getattr(section, cpus_field)))
        return max(1, cores // share)

    return (threads(t.torch_threads, "num_cpus_per_rank", t, t.num_ranks if sync else together),
            threads(ro.cpu_threads, "num_cpus_per_actor", ro, ro.num_actors if sync else together))


def trainer_memory(recipe: Recipe, policy: PolicySpec, longest_prompt: int, response_len: int) -> dict[str, float]:
    """GiB one trainer rank holds at its peak by part (``trainer.memory``, counted on the meta device) and their
    ``total``; an adapter policy's own parameters are not counted; PPO's critic is its own part. A padded
    micro-batch holds ``micro_batch_size`` rows as long as the longest prompt plus ``response_len`` (the worst
    case), a packed one ``max_tokens_per_micro_batch`` positions."""
    from trainer.memory import count_parameters, training_memory

    r, t = recipe, recipe.trainer
    size = count_parameters(policy.base_model, r.model.trust_remote_code)
    full = policy.kind == "full"
    if t.max_tokens_per_micro_batch:
        positions = tokens = t.max_tokens_per_micro_batch
    else:
        positions = t.micro_batch_size * min(r.rollout.max_model_len, longest_prompt + response_len)
        tokens = t.micro_batch_size * response_len
    if t.logits_chunk_rows:
        tokens = min(tokens, t.logits_chunk_rows)  # one chunk's logits at a time
    shape = dict(layers=size.layers, hidden=size.hidden, micro_batch_positions=positions,
                 gradient_checkpointing=t.gradient_checkpointing)
    parts = training_memory(size.params, size.vocab, r.model.dtype, size.params if full else 0, t.zero_stage, t.num_ranks,
                            reference=full and r.algorithm.spec.needs_reference(r.algorithm.kl_coef),
                            micro_batch_tokens=tokens, **shape)
    if r.algorithm.spec.critic:  # PPO's value model: the base architecture again, every weight trained (its head aside)
        parts["critic"] = sum(training_memory(size.params, 0, r.model.dtype, size.params, t.zero_stage, t.num_ranks,
                                              reference=False, micro_batch_tokens=0, **shape).values())
    gib = {k: v / 2**30 for k, v in parts.items()}
    return {**gib, "total": sum(gib.values())}


def memory_warning(estimate: dict[str, float], recipe: Recipe) -> Optional[str]:
    """A warning when one trainer rank's estimated peak is more than this machine's memory (unless the run joins a
    cluster, RAY_ADDRESS set: its trainer may run on a bigger node)."""
    if "RAY_ADDRESS" in os.environ or not hasattr(os, "sysconf"):
        return None
    machine = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    if estimate["total"] <= machine:
        return None
    t = recipe.trainer
    how = ("lower trainer.max_tokens_per_micro_batch" if t.max_tokens_per_micro_batch else
           "lower trainer.micro_batch_size or pack micro-batches (trainer.max_tokens_per_micro_batch)")
    if not t.gradient_checkpointing and estimate.get("activations", 0) > estimate["total"] / 3:
        how += ", or set trainer.gradient_checkpointing=true"
    return (f"warning: one trainer rank may need ~{estimate['total']:.1f} GiB at its peak (estimate), more than this "
            f"machine's {machine:.1f} GiB; {how}")


def weight_transport(recipe: Recipe, policy: PolicySpec, name: str, log_fn=_log):
    """The transport object the trainer publishes through; ``shared_file`` (and ``ipc`` on a CPU) checks
    /dev/shm has room for the versions kept at once (a full model: the one being written, the served one,
    k queued ones; adapters publish a few MB)."""
    from rollout.weight_sync import get_transport
    from trainer.memory import BYTES, count_parameters

    in_shm = name == "shared_file" or (name == "ipc" and not recipe.trainer.num_gpus_per_rank)
    if not in_shm:
        return get_transport(name)
    full = policy.kind == "full"
    one = count_parameters(policy.base_model, recipe.model.trust_remote_code)[0] * BYTES[recipe.model.dtype] if full else 0
    need = one * (2 + recipe.rollout.max_staleness)
    if name == "ipc":
        try:
            return get_transport("ipc", room_bytes=need)
        except MemoryError as e:
            raise RecipeError(f"cluster.weight_transport=ipc: {e}: use shared_file (it falls back to disk) or give /dev/shm "
                              "more room (docker run --shm-size)") from None
    transport = get_transport("shared_file", room_bytes=need)
    if not str(transport.directory).startswith("/dev/shm") and os.path.isdir("/dev/shm"):
        log_fn(f"weights travel through {transport.directory} on disk: /dev/shm has less than the {need / 2**20:.0f} MiB "
               "the published versions need")
    return transport


def engine_spec(recipe: Recipe, policy: PolicySpec):
    """How each vLLM engine starts: the policy's weights, or its base plus room for the LoRA it serves."""
    from rollout.vllm_worker import EngineSpec

    r = recipe
    rank = policy.served_lora_rank
    return EngineSpec(
        model_path=policy.model_path, dtype=r.model.dtype, max_model_len=r.rollout.max_model_len,
        gpu_memory_utilization=r.rollout.gpu_memory_utilization, cpu_kvcache_gib=r.rollout.cpu_kvcache_gib,
        enforce_eager=r.rollout.enforce_eager, kv_block_size=r.rollout.kv_block_size,
        tensor_parallel_size=r.rollout.tensor_parallel_size,
        # Under Ray a tensor-parallel engine's ranks are Ray workers in its bundles (rl.placement.engine_bundle_specs).
        distributed_executor_backend="ray" if r.use_ray and r.rollout.tensor_parallel_size > 1 else None,
        enable_sleep_mode=r.rollout.colocate,
        engine_in_process=r.rollout.engine_in_process,
        seed=r.seed,
        trust_remote_code=r.model.trust_remote_code,
        max_lora_rank=next((k for k in LORA_RANKS if k >= rank), 0) if rank else 0,
        max_loras=policy.loras_per_batch(r.data.prompts_per_step),
        cpu_threads=thread_counts(r)[1] if r.use_ray else 0,  # in one process (use_ray: false) torch's own default
    )
