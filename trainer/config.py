"""The recipe's `trainer`, `algorithm` and `adapter` sections: what the DeepSpeed ranks train and how
(owned here, where they are used; ``rl.config`` composes them into the recipe)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from trainer import algorithms


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TrainerConfig(Section):
    num_ranks: int = Field(1, ge=1, description="Data-parallel DeepSpeed ranks, one Ray actor each.")
    zero_stage: int = Field(0, ge=0, le=3)
    lr: float = Field(1e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warm-up, in optimizer steps.")
    max_grad_norm: float = Field(1.0, ge=0.0, description="0 disables clipping.")
    micro_batch_size: int = Field(64, ge=1, description="Sequences per forward/backward on one rank (padded; unused "
                                  "while max_tokens_per_micro_batch is set).")
    max_tokens_per_micro_batch: int = Field(
        0, ge=0, description="0: micro-batches of `micro_batch_size` sequences, padded to the longest. k > 0: each "
        "micro-batch is filled with whole sequences up to k tokens (prompt + response) and packed into one row without "
        "padding (position ids restart per sequence, so attention stays within it; a model that ignores them is "
        "refused at start); the same loss, for the tokens alone. Policy, reference, old-logprob and critic passes alike.")
    mini_batches: int = Field(
        1, ge=1, description="Optimizer steps per rollout batch (>1 makes later updates off-policy; the clip matters then)."
    )
    gradient_checkpointing: bool = False
    attn_implementation: Optional[Literal["eager", "sdpa", "sdpa_varlen", "flash_attention_2", "flex_attention"]] = Field(
        None, description="The trainer's attention kernel (transformers' attn_implementation); None: the model's default "
        "(sdpa), and with packed micro-batches sdpa_varlen: PyTorch's SDPA run on each packed sequence alone, where sdpa "
        "masks the whole row (the same numbers, less attention work). flash_attention_2 also attends within each "
        "sequence (needs the flash-attn package and a GPU).")
    logits_chunk_rows: int = Field(
        0, ge=0, description="Response tokens per pass through the LM head in training (0: all of a micro-batch at "
        "once). k > 0 caps the logits held at once at [k x vocab] instead of [response tokens x vocab], for one more "
        "LM-head forward per micro-batch (the chunks are recomputed in the backward); the same numbers.")
    host_mmap_threshold_mib: float = Field(
        0.0, ge=0.0, description="0: glibc's default. k > 0: host (CPU) blocks of k MiB or more are mapped on their own and "
        "given back to the system when freed (mallopt M_MMAP_THRESHOLD). glibc otherwise raises the threshold as large "
        "blocks are freed, after which a CPU trainer's per-micro-batch tensors reuse a heap it seldom returns; what 1 "
        "saves on a 51.7M model: docs/benchmarks/trainer-memory.md.")
    max_nonfinite_steps: int = Field(
        3, ge=1, description="A non-finite loss or gradient skips that update; this many steps in a row stop the run."
    )
    num_cpus_per_rank: float = Field(1.0, ge=0.0)
    num_gpus_per_rank: float = Field(
        0.0, ge=0.0, description="GPUs each rank reserves; the rank trains on CUDA only with one. Unset: 1 on a machine "
        "with a GPU, else 0.")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each trainer rank asks for, e.g. {head: 1}.")
    torch_threads: int = Field(
        0, ge=0, description="torch threads per rank. 0: automatic: the node's cores shared by the ranks that train at "
        "once (with asynchronous rollout, also by the engines); set num_cpus_per_rank instead to keep Ray's pinning.")


class AlgorithmConfig(Section):
    name: str = Field(
        "grpo",
        description="`grpo` (any G >= 2; G=2 with `advantage: contrastive_pair` is 2-GRPO); `ppo`: the clipped loss on "
        "GAE advantages from a value model (the `critic` section), any G >= 1; `dpo`: offline on preference "
        "pairs; `online_dpo`: two completions per prompt ranked by the rewards, DPO loss on discordant pairs.",
    )
    group_size: int = Field(8, description="G: completions sampled per prompt (>= 2; ppo: >= 1).")
    tie_handling: Literal["keep", "resample"] = Field(
        "keep",
        description="Groups whose rewards all tie carry no signal: `keep` them (zero advantage) or `resample` those "
        "prompts (2-GRPO+RS) for up to `max_resample_rounds` extra rounds.",
    )
    max_resample_rounds: int = Field(2, ge=0)
    allocation: Literal["fixed", "resample_ties", "reinforce_ada", "knapsack"] = Field(
        "fixed",
        description="How many rollouts each prompt gets. `fixed`: G each. `resample_ties`: G each, tied groups sampled "
        "again (what `tie_handling: resample` selects). `reinforce_ada`: rounds of `ada_round_size` until a prompt has "
        "signal (`ada_rule`), then a training group of G from its pool, the baseline the pool's mean (Reinforce-Ada). "
        "`knapsack`: B*G rollouts shared out by each prompt's success rate at its last visit (Knapsack RL).",
    )
    rollout_budget: Optional[int] = Field(
        None, ge=1, description="Rollouts per step an adaptive allocation may spend. None: B*G for knapsack; "
        "B x ada_round_size x ada_max_rounds for reinforce_ada (only the rounds bound it).")
    success_threshold: float = Field(
        0.5, description="A rollout succeeds when its reward is above this (Reinforce-Ada's positives, Knapsack's "
        "success rate).")
    ada_rule: Literal["balance", "positive"] = Field(
        "balance", description="When Reinforce-Ada stops sampling a prompt: `balance`, once its pool holds G//2 "
        "successes and G - G//2 failures; `positive`, once it holds one success.")
    ada_round_size: int = Field(8, ge=1, description="Rollouts per prompt in each Reinforce-Ada round (>= G).")
    ada_max_rounds: int = Field(4, ge=1, description="Reinforce-Ada rounds per step at most.")
    knapsack_min: int = Field(2, ge=1, description="Knapsack: rollouts a prompt gets at least (and a solved or "
                              "never-solved one gets).")
    knapsack_max: int = Field(32, ge=2, description="Knapsack: rollouts a prompt gets at most.")
    unlikeliness_beta: float = Field(
        0.0, ge=0.0, lt=1.0, description="Rewarding the Unlikely: scale each reward by 1 - beta * rank / G, rank 0 the "
        "least likely rollout of its group under the sampler (0: off; the authors use 0.25).")
    advantage: str = Field(
        "grpo", description="Registered advantage estimator (`trainer.algorithms.names('advantage')`): grpo, "
        "contrastive_pair (2-GRPO), rloo, reinforce_pp, reinforce_pp_baseline.")
    normalize_std: bool = Field(
        True, description="Divide by the std (of the group for grpo, of the batch for reinforce_pp*); Dr.GRPO turns "
        "it off. Not read by rloo or contrastive_pair.")
    std_eps: float = Field(1e-6, gt=0.0)
    policy_loss: str = "clipped"
    clip_low: float = Field(0.2, ge=0.0, description="epsilon_low of the clipped ratio.")
    clip_high: float = Field(0.2, ge=0.0, description="epsilon_high; > clip_low is DAPO's clip-higher.")
    dual_clip: Optional[float] = Field(None, gt=1.0, description="Dual-clip bound c for negative advantages.")
    importance_sampling_level: Literal["token", "sequence"] = Field(
        "token", description="`token`: one ratio per token (PPO/GRPO). `sequence`: GSPO's length-normalized ratio per "
        "sequence, clipped per sequence (its paper: clip_low 3e-4, clip_high 4e-4, seq-mean-token-mean).")
    loss_aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    kl_coef: float = Field(0.0, ge=0.0, description="beta; 0 skips the reference model entirely.")
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k3", description="KL estimator of the `kl_penalty: loss` term.")
    kl_penalty: Literal["loss", "reward"] = Field(
        "loss", description="Where the KL goes. `loss`: beta * kl_estimator aggregated like the policy loss (GRPO). "
        "`reward`: REINFORCE++'s per-token penalty, k1 = log pi_old - log pi_ref (detached), each token's advantage "
        "minus beta times its reward-to-go; needs kl_coef > 0 and kl_estimator k1.")
    dpo_beta: float = Field(0.1, gt=0.0, description="DPO's beta (offline and online).")
    dpo_loss: str = Field("sigmoid", description="Registered preference loss: sigmoid (DPO) or ipo.")
    dpo_label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    dpo_epochs: int = Field(1, ge=1, description="Offline DPO: passes over the preference pairs.")
    gae_gamma: float = Field(1.0, ge=0.0, le=1.0, description="ppo: GAE's discount per token.")
    gae_lambda: float = Field(0.95, ge=0.0, le=1.0, description="ppo: GAE's lambda (1: Monte-Carlo returns, 0: one-step TD).")
    tis_cap: Optional[float] = Field(
        None, gt=0.0, description="Truncated importance-sampling cap for vLLM-vs-trainer logprob mismatch; None disables."
    )
    sequence_mask: Optional[str] = Field(
        None, description="Drop whole sequences sampled off the trainer's policy from the policy loss: a registered "
        "`sequence_mask` (`geometric_mean`: the per-token geometric mean of pi_old / pi_rollout; `token_extremes`: "
        "every token's ratio) outside [sequence_mask_low, sequence_mask_high]. None: keep all.")
    sequence_mask_low: float = Field(0.5, gt=0.0)
    sequence_mask_high: float = Field(2.0, gt=0.0)

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        try:
            algorithms.get("algorithm", name)
        except KeyError as e:
            raise ValueError(e.args[0]) from None
        return name

    @property
    def spec(self) -> algorithms.Algorithm:
        """What ``name`` means to the driver and the trainer (``trainer.algorithms.objectives``)."""
        return algorithms.get("algorithm", self.name)

    @model_validator(mode="after")
    def _check_group(self) -> "AlgorithmConfig":
        spec = self.spec
        if spec.online and spec.group_size is None and self.group_size < spec.min_group_size:
            raise ValueError(f"algorithm.group_size must be >= {spec.min_group_size} for {self.name} (got {self.group_size})")
        if spec.group_size is not None and self.group_size != spec.group_size:
            raise ValueError(f"algorithm.group_size must be {spec.group_size} for {self.name} (got {self.group_size})")
        if self.kl_penalty == "reward":
            if self.kl_coef <= 0:
                raise ValueError("algorithm.kl_penalty=reward needs algorithm.kl_coef > 0 (the beta of the per-token "
                                 f"KL penalty; got kl_coef={self.kl_coef})")
            if self.kl_estimator != "k1":
                raise ValueError("algorithm.kl_penalty=reward puts the k1 estimate (log pi_old - log pi_ref) in the "
                                 f"reward, as REINFORCE++; set algorithm.kl_estimator=k1 (got {self.kl_estimator!r}, "
                                 "an estimator for kl_penalty=loss)")
            if not spec.policy_gradient or spec.critic:
                raise ValueError(f"algorithm.kl_penalty=reward shapes GRPO-style advantages; algorithm.name={self.name} "
                                 "has none (use kl_penalty=loss)")
        self._check_allocation(spec)
        if self.importance_sampling_level == "sequence" and not spec.policy_gradient:
            raise ValueError(f"algorithm.importance_sampling_level=sequence sets the ratio of the clipped policy loss; "
                             f"algorithm.name={self.name} does not use it")
        self._check_sequence_mask(spec)
        return self

    def _check_sequence_mask(self, spec: algorithms.Algorithm) -> None:
        if self.sequence_mask is None:
            return
        if self.sequence_mask not in algorithms.names("sequence_mask"):
            raise ValueError(f"algorithm.sequence_mask={self.sequence_mask!r} is not registered; registered: "
                             f"{algorithms.names('sequence_mask')}")
        if not spec.policy_gradient:
            raise ValueError(f"algorithm.sequence_mask masks sequences of the clipped policy loss; algorithm.name={self.name} "
                             "does not use it")
        if not self.sequence_mask_low <= 1.0 <= self.sequence_mask_high:
            raise ValueError(f"algorithm.sequence_mask_low <= 1 <= sequence_mask_high is needed (a sample exactly on "
                             f"policy is kept); got [{self.sequence_mask_low}, {self.sequence_mask_high}]")


    def _check_allocation(self, spec: algorithms.Algorithm) -> None:
        if self.tie_handling == "resample":  # 2-GRPO+RS's spelling of the resample_ties allocation
            if self.allocation not in ("fixed", "resample_ties"):
                raise ValueError(f"algorithm.tie_handling=resample is the resample_ties allocation; it cannot combine with "
                                 f"algorithm.allocation={self.allocation}")
            object.__setattr__(self, "allocation", "resample_ties")
        if spec.critic and self.allocation != "fixed":
            raise ValueError(f"algorithm.allocation={self.allocation} decides rollouts from group statistics; "
                             f"algorithm.name={self.name} takes its baseline from the critic (use allocation fixed)")
        if self.allocation in ("fixed", "resample_ties"):
            return
        if not spec.policy_gradient:
            raise ValueError(f"algorithm.allocation={self.allocation} gives prompts different numbers of rollouts; "
                             f"algorithm.name={self.name} needs fixed pairs (use allocation fixed or resample_ties)")
        if self.advantage not in ("grpo", "rloo"):
            raise ValueError(f"algorithm.allocation={self.allocation} needs a group-relative advantage (grpo or rloo): "
                             f"'{self.advantage}' normalizes over the batch or needs groups of 2")
        if self.allocation == "reinforce_ada":
            if self.advantage != "grpo":
                raise ValueError("algorithm.allocation=reinforce_ada computes GRPO's advantage against the pool's "
                                 f"statistics; set algorithm.advantage=grpo (got {self.advantage})")
            if self.ada_round_size < self.group_size:
                raise ValueError(f"algorithm.ada_round_size ({self.ada_round_size}) must be >= algorithm.group_size "
                                 f"({self.group_size}): the first round must be able to fill a training group")
        if self.allocation == "knapsack" and not self.knapsack_min <= self.group_size <= self.knapsack_max:
            raise ValueError(f"algorithm.group_size ({self.group_size}), the mean rollouts per prompt, must lie within "
                             f"[knapsack_min, knapsack_max] = [{self.knapsack_min}, {self.knapsack_max}]")


class CriticConfig(Section):
    """PPO's value model: the policy's architecture with a scalar head, trained beside it on its own optimizer."""

    model: Optional[str] = Field(None, description="Where the critic's decoder starts. None: the policy's base model.")
    lr: float = Field(1e-5, gt=0.0, description="The critic's learning rate (its own AdamW; betas, decay and clipping "
                      "as `trainer`).")
    value_clip: Optional[float] = Field(
        0.2, gt=0.0, description="A value moves at most this far from where the batch found it (PPO2's value clipping); "
        "None: the plain squared error.")


class AdapterConfig(Section):
    """Train an adapter as the policy; only adapter weights travel to vLLM."""

    kind: Literal["none", "lora", "sparse", "arrow"] = Field(
        "none",
        description="What the policy adapter is. `none`: the full model trains. `lora`: a PEFT LoRA. `sparse`: masked "
        "deltas on the base weights (`keep_ratio` of the entries, mask by connection sensitivity). `arrow`: library LoRA "
        "experts routed per token (Arrow), training `arrow_train`.",
    )
    source: Literal["new", "continue", "merge"] = Field(
        "new",
        description="Where it starts. `new`: a fresh adapter (an Arrow router over `experts` with a new LoRA beside them). "
        "`continue`: one library expert trained further. `merge`: library experts merged (LoRA: weighted average of "
        "their deltas re-factored to `rank`; sparse: union of masks, overlaps averaged), then trained.",
    )
    rank: int = Field(8, ge=1, description="LoRA rank (new, merged, or the new LoRA beside Arrow experts).")
    alpha: float = Field(16.0, gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    library: Optional[str] = Field(None, description="Adapter library directory (see `rl library`).")
    experts: list[str] = Field(default_factory=list, description="Library experts: one to continue, several to merge or route.")
    merge_weights: Optional[list[float]] = Field(None, description="Per-expert weights for `merge`; default uniform.")
    save_as: Optional[str] = Field(None, description="Write the trained adapter into the library under this name.")
    keep_ratio: float = Field(0.05, gt=0.0, le=1.0, description="`sparse`: share of the target weights' entries trained.")
    block_size: Optional[int] = Field(None, ge=1, description="`sparse`: keep whole block_size x block_size tiles.")
    calibration_prompts: int = Field(
        64, ge=1, description="`sparse`: training prompts whose language-modelling loss scores the connections.")
    top_k: int = Field(2, ge=1, description="`arrow`: experts each token is routed to.")
    router_temperature: float = Field(1.0, gt=0.0, description="`arrow`: softmax temperature over the kept scores.")
    arrow_train: Literal["new", "experts"] = Field(
        "new", description="`arrow`: train a new LoRA (`rank`, `alpha`) beside the frozen routed experts, or the experts.")
    arrow_serving: Literal["batch", "prompt"] = Field(
        "batch", description="`arrow`: vLLM serves one LoRA holding the routing averaged over the batch's prompt tokens "
        "(`batch`), or one LoRA per prompt averaged over that prompt's tokens (`prompt`: closer, B times the bytes).")

    @model_validator(mode="before")
    @classmethod
    def _split_mode(cls, data):
        if isinstance(data, dict) and "mode" in data:
            raise ValueError(
                "adapter.mode was split in two: adapter.kind (none | lora | sparse | arrow: what the adapter is) and "
                "adapter.source (new | continue | merge: where it starts); e.g. `mode: merge` of LoRA experts is "
                "`kind: lora, source: merge`, `mode: sparse` is `kind: sparse`, `mode: arrow` is `kind: arrow`")
        return data

    @model_validator(mode="after")
    def _check(self) -> "AdapterConfig":
        if self.kind == "none":
            if self.source != "new" or self.experts or self.save_as:
                raise ValueError("adapter.source, adapter.experts and adapter.save_as need an adapter.kind (lora | sparse | arrow)")
            return self
        if (self.source != "new" or self.kind == "arrow") and not self.library:
            raise ValueError(f"adapter.library is required for adapter.kind={self.kind}, adapter.source={self.source}")
        if self.kind == "arrow" and self.source != "new":
            raise ValueError("adapter.kind=arrow routes the library `experts` as they are: adapter.source must be `new`")
        if self.source == "continue" and len(self.experts) != 1:
            raise ValueError(f"adapter.experts must name exactly one expert to continue (got {self.experts})")
        if (self.source == "merge" or self.kind == "arrow") and len(self.experts) < 2:
            raise ValueError(f"adapter.experts must name at least two experts to {'route' if self.kind == 'arrow' else 'merge'} "
                             f"(got {self.experts})")
        if self.source == "new" and self.kind != "arrow" and self.experts:
            raise ValueError(f"adapter.experts {self.experts} are only read by adapter.source continue | merge or adapter.kind arrow")
        if self.merge_weights is not None and len(self.merge_weights) != len(self.experts):
            raise ValueError("adapter.merge_weights needs one weight per expert")
        if self.save_as and not self.library:
            raise ValueError("adapter.save_as needs adapter.library")
        return self
