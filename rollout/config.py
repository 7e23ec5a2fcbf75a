"""The recipe's `rollout` and `teacher` sections: how the vLLM rollout actors sample, and the engines of a
distillation teacher that score the samples (owned here, composed by ``rl.config``)."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


LORA_RANKS = (8, 16, 32, 64, 128, 256)  # ranks vLLM serves


class RolloutConfig(Section):
    num_actors: int = Field(1, ge=1, description="vLLM rollout actors; each owns one engine.")
    max_new_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, description="-1 disables top-k.")
    max_model_len: int = Field(256, ge=8, description="Prompt + completion tokens vLLM reserves per sequence.")
    gpu_memory_utilization: float = Field(0.3, gt=0.0, le=1.0)
    cpu_kvcache_gib: int = Field(1, ge=1, description="VLLM_CPU_KVCACHE_SPACE on CPU machines.")
    enforce_eager: bool = Field(True, description="No CUDA graphs (eager decoding). Left unset, false on a GPU machine "
                                "(graphs decode several times faster there); the CPU decodes eagerly.")
    seed_per_prompt: bool = Field(
        True, description="Each training prompt's samples draw from a seed of their own (derived from the run's seed, "
        "the step and the prompt), so a step's samples are reproducible. Left unset, false on a GPU machine: seeded "
        "requests leave vLLM's batched sampler for a per-request generator. Held-out sampling stays seeded.")
    kv_block_size: int = Field(
        0, ge=0, description="Tokens per KV-cache block (vLLM's block_size; the unit of prefix-cache reuse). 0: vLLM's "
        "default for the platform (16 on GPU, 128 on CPU, where it must be a multiple of 32).")
    tensor_parallel_size: int = Field(1, ge=1)
    engine_in_process: bool = Field(
        True,
        description="Run the vLLM engine core inside the actor's process (VLLM_ENABLE_V1_MULTIPROCESSING=0): "
        "~3 s engine start instead of ~25 s on CPU.",
    )
    colocate: bool = Field(
        False, description="Each engine shares a GPU with a trainer rank (num_actors = trainer.num_ranks, synchronous "
        "rollout): the engine sleeps while the trainer trains (vLLM sleep mode: weights offloaded to CPU memory, KV cache "
        "freed) and wakes for the weight push and the next rollout. GPU machines only. Unset GPU counts become 0.5 each.")
    num_cpus_per_actor: float = Field(1.0, ge=0.0)
    cpu_threads: int = Field(
        0, ge=0, description="OpenMP threads of each CPU engine. 0: automatic: the node's cores shared by the engines "
        "that generate at once (with asynchronous rollout, also by the trainer ranks); set num_cpus_per_actor instead "
        "to keep Ray's pinning (one thread per reserved CPU).")
    num_gpus_per_actor: float = Field(
        0.0, ge=0.0, description="GPUs each engine reserves. Unset: tensor_parallel_size on a machine with a GPU, else 0.")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each rollout actor asks for, e.g. {worker: 1} to pin the "
        "engines to nodes started with that resource.")
    max_restarts: int = Field(3, ge=0, description="Times Ray restarts a dead rollout actor; the call is then retried with the "
                              "current weights.")
    max_staleness: int = Field(
        0, ge=0, description="Asynchronous rollout: generate up to k batches ahead while the trainer updates, so a batch "
        "may come from a policy up to k versions old (metric rollout_staleness; pair with algorithm.tis_cap). "
        "0: synchronous, on-policy.")
    partial_rollouts: bool = Field(
        False, description="Partial rollouts (needs max_staleness >= 1): more prompts are in flight than a step trains "
        "(partial_overdraw); each engine call stops once the step's prompts have all their rollouts finished, and the "
        "unfinished generations continue in the next call, under the weights loaded by then, so a long tail does not "
        "hold up the step. Each token keeps the logprob and the version of the policy that sampled it; no token trains "
        "more than max_staleness versions after it was sampled (a generation that would is started again). The engines "
        "run max_staleness - 1 batches ahead.")
    partial_overdraw: float = Field(
        0.5, gt=0.0, description="Partial rollouts: prompts in flight beyond the step's data.prompts_per_step, as a share "
        "of it (0.5 with 16 prompts per step: 24 in flight, the first 16 to finish train).")

    @property
    def batches_ahead(self) -> int:
        """Batches the engines sample while the trainer updates: max_staleness, one fewer with partial rollouts
        (whose carried tokens take the last version of the bound)."""
        return self.max_staleness - 1 if self.partial_rollouts else self.max_staleness


class TeacherConfig(Section):
    """On-policy distillation: a teacher model on its own vLLM actors scores every token the policy samples."""

    model: Optional[str] = Field(
        None, description="The teacher: a model directory or a builtin, with the policy's tokenizer. Unset: no teacher.")
    kl_coef: float = Field(1.0, gt=0.0, description="Weight of each token's negative reverse KL, log p_teacher - "
                           "log p_policy, added to its advantage.")
    reward_coef: float = Field(0.0, ge=0.0, description="Weight of the task's own advantage beside it (0: pure distillation).")
    num_actors: int = Field(1, ge=1, description="Teacher engines; the batch is split across them.")
    num_cpus_per_actor: float = Field(
        0.0, ge=0.0, description="CPUs each teacher engine reserves. 0: none; it scores between sampling and the update, "
        "when the rollout engines and the trainer wait, so it shares their cores (as they share them with each other).")
    num_gpus_per_actor: float = Field(0.0, ge=0.0, description="Unset: 1 on a machine with a GPU, else 0.")
