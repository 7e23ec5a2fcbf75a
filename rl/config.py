"""The recipe: one typed config with every default in one place.

A recipe YAML is loaded into :class:`Recipe`, then ``key=value`` overrides are applied
(``trainer.lr=1e-4``, ``algorithm.group_size=16``). Everything is validated before Ray
starts: an unknown key names the field and the closest valid name, a wrong type or an
out-of-range value names the field, a missing model or data path names the path.

``rl config RECIPE [overrides]`` prints the fully resolved recipe.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rewards.config import AgentConfig, EnvironmentConfig, RewardsConfig
from rl.overrides import RecipeError, format_errors, parse_overrides, set_dotted
from rl.placement import check_gpu_layout, cuda_devices, machine_defaults
from rollout.config import RolloutConfig, TeacherConfig
from trainer.config import AdapterConfig, AlgorithmConfig, CriticConfig, TrainerConfig

BUILTIN_PREFIX = "builtin:"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    path: str = Field(
        "builtin:tiny-arithmetic",
        description="An HF model directory, or `builtin:tiny-arithmetic` (built locally and cached on first use).",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Trainer and vLLM dtype. Unset: bfloat16 on a machine with a GPU. float32 keeps vLLM "
        "and trainer logprobs within ~1e-5."
    )
    trust_remote_code: bool = False


class DataConfig(Section):
    train: str = Field(
        "builtin:arithmetic",
        description="Training prompts: a .jsonl/.json/.parquet/.csv file, a directory of them, a dataset saved "
        "with `save_to_disk`, or `builtin:arithmetic` (the embedded task, built with the builtin model).",
    )
    test: Optional[str] = Field(None, description="Held-out prompts; when unset, `test_fraction` of `train` is held out.")
    test_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    max_test_examples: int = Field(500, ge=1, description="Held-out examples used by each evaluation.")
    max_train_examples: Optional[int] = Field(
        None, ge=1, description="Use only the first N training prompts (a fixed prompt set, e.g. to compare epochs).")
    prompt_column: str = "prompt"
    chosen_column: str = Field("chosen", description="DPO: the preferred response (or whole dialogue).")
    rejected_column: str = Field("rejected", description="DPO: the dispreferred response (or whole dialogue).")
    preference_format: Literal["prompt_chosen_rejected", "hh_dialogue"] = Field(
        "prompt_chosen_rejected",
        description="`hh_dialogue`: chosen/rejected are full dialogues sharing a prefix (Anthropic HH); the prompt is "
        "everything up to the last 'Assistant:' turn.",
    )
    template: str = Field(
        "{prompt}",
        description="Python format string over the row's columns that makes the user message (or the whole prompt "
        "when no chat template is used).",
    )
    chat_template: Literal["auto", "always", "never"] = Field(
        "auto", description="`auto` uses the tokenizer's chat template when it has one."
    )
    system_prompt: Optional[str] = None
    prompts_per_step: int = Field(64, ge=1, description="B: prompts drawn each step (rollouts per step = B * G).")
    shuffle: bool = True
    skip_bad_lines: bool = Field(False, description="Skip (and count) malformed JSONL lines instead of stopping with file:line.")


class EvalConfig(Section):
    before: bool = True
    after: bool = True
    every: int = Field(0, ge=0, description="Evaluate every k steps; 0: only before/after.")
    max_new_tokens: Optional[int] = Field(None, ge=1, description="Default: rollout.max_new_tokens.")
    samples: int = Field(
        1, ge=1, description="Besides greedy accuracy, sample this many completions per held-out prompt at `temperature` "
        "and report mean@k and pass@k (1: greedy only).")
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature of the mean@k evaluation.")


class CheckpointConfig(Section):
    every: int = Field(0, ge=0, description="Save the policy every k steps (HF format); 0: only at the end.")
    keep_last: int = Field(2, ge=1)
    save_final: bool = True


class WatchdogConfig(Section):
    """How long the driver waits on an actor that makes no progress (rl.workers.Watchdog)."""

    warn_seconds: float = Field(180.0, gt=0.0, description="Say on the terminal which actor and phase it waits on, every this often.")
    stop_seconds: float = Field(1800.0, gt=0.0, description="Stop the run (exit 4, last checkpoint intact) after this long "
                                "without progress.")
    first_call_factor: float = Field(3.0, ge=1.0, description="Both limits times this for an actor's first call of a kind "
                                     "(start-up, engine start, the first step).")


class ClusterConfig(Section):
    """Where the actors run and how weights reach the engines (rl.placement)."""

    placement: Literal["pack", "spread", "strict_pack", "strict_spread"] = Field(
        "pack", description="Ray placement-group strategy over one bundle per trainer rank and per rollout actor: `pack` "
        "fills as few nodes as possible, `spread` spreads over nodes, `strict_*` require it.")
    placement_timeout_s: float = Field(
        60.0, gt=0.0, description="Stop before training when the cluster cannot hold every bundle within this time "
        "(the error names what is missing).")
    node_loss_wait_s: float = Field(
        30.0, gt=0.0, description="After an actor's node dies: how long a rollout actor may take to come back on another "
        "node before the run stops (last checkpoint intact, resume=auto continues).")
    weight_transport: Literal["auto", "shared_file", "object_store", "collective", "ipc"] = Field(
        "auto", description="How weights travel to the engines. `auto`: `shared_file` (a RAM-backed file, one node) when "
        "every engine shares trainer rank 0's node, else `object_store` (Ray's object store, across nodes). `collective`: "
        "trainer rank 0 broadcasts the weights, packed in buckets, to the engines over a process group of their own (gloo, "
        "or NCCL between GPUs; any node; an engine that dies cannot rejoin it). `ipc`: the engines read packed buckets in "
        "place from memory trainer rank 0 shares (shared memory on a CPU, CUDA IPC on a GPU; one node).")


class LoggingConfig(Section):
    tensorboard: bool = True
    progress: bool = True
    verbose: bool = Field(False, description="Show the engines', trainer ranks' and Ray's own logs on the terminal (`rl train -v`). "
                          "Otherwise they go to <run_dir>/logs/ and the terminal holds the run's lines, the progress bar, "
                          "warnings and errors.")
    wandb: bool = Field(False, description="Also log to Weights & Biases (the `trackers` extra). Offline by default: no account needed; "
                        "`wandb sync <run_dir>/wandb/offline-run-*` uploads later.")
    wandb_project: str = "rl-post-train"
    wandb_mode: Literal["offline", "online"] = "offline"
    mlflow: bool = Field(False, description="Also log to MLflow (the `trackers` extra), by default into a local file store "
                         "in the run directory (`mlflow ui --backend-store-uri <run_dir>/mlruns`).")
    mlflow_tracking_uri: Optional[str] = Field(None, description="An MLflow server or store; unset: file:<run_dir>/mlruns.")
    mlflow_experiment: str = "rl-post-train"


class Recipe(Section):
    name: str = "run"
    seed: int = 0
    steps: int = Field(100, ge=1)
    output_dir: str = Field(
        "runs/{name}-{timestamp}", description="`{name}`: the recipe name; `{timestamp}`: the start time (YYYYmmdd-HHMMSS)."
    )
    use_ray: bool = Field(True, description="False runs the same workers in this process (debugging).")
    resume: Optional[str] = Field(
        None,
        description="`auto`: continue from the newest complete checkpoint of this run's output_dir (or of the newest "
        "run matching it when it contains {timestamp}); a path: continue from that checkpoint; unset: start fresh.",
    )
    resume_force: bool = Field(False, description="Resume even if the checkpoint was written by a different recipe.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    rewards: RewardsConfig = Field(default_factory=RewardsConfig)
    environment: EnvironmentConfig = Field(default_factory=EnvironmentConfig)
    agent: AgentConfig = Field(default_factory=AgentConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    critic: CriticConfig = Field(default_factory=CriticConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    watchdog: WatchdogConfig = Field(default_factory=WatchdogConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @model_validator(mode="after")
    def _check_async(self) -> "Recipe":
        if self.rollout.max_staleness > 0 and self.adapter.kind == "arrow":
            raise ValueError("rollout.max_staleness > 0 does not combine with adapter.kind=arrow (an Arrow policy is "
                             "routed for each batch right before it is sampled)")
        if self.rollout.partial_rollouts and self.rollout.max_staleness == 0:
            raise ValueError("rollout.partial_rollouts=true needs rollout.max_staleness >= 1 (a generation continued after "
                             "a weight update trains one version or more after its first tokens were sampled)")
        if "partial_overdraw" in self.rollout.model_fields_set and not self.rollout.partial_rollouts:
            raise ValueError("rollout.partial_overdraw is read only with rollout.partial_rollouts=true")
        return self

    @model_validator(mode="after")
    def _check_environment(self) -> "Recipe":
        if self.environment.name is None:
            return self
        if self.rollout.max_staleness > 0:
            raise ValueError("environment.name needs rollout.max_staleness=0 (an episode's later turns are sampled by the "
                             "policy of the step that trains on it)")
        if not self.algorithm.spec.policy_gradient:
            raise ValueError(f"environment.name runs with a policy-gradient algorithm such as grpo (got {self.algorithm.name})")
        if self.adapter.kind == "arrow":
            raise ValueError("environment.name does not combine with adapter.kind=arrow (Arrow routes each prompt, and an "
                             "episode's later turns are new prompts)")
        return self

    @model_validator(mode="after")
    def _check_agent(self) -> "Recipe":
        if self.agent.fn is None:
            return self
        if self.environment.name is not None:
            raise ValueError("agent.fn and environment.name both make the episodes; set one")
        if self.rollout.max_staleness > 0:
            raise ValueError("agent.fn needs rollout.max_staleness=0 (an episode's calls are sampled by the policy of the "
                             "step that trains on it)")
        if not self.algorithm.spec.policy_gradient or self.adapter.kind == "arrow":
            raise ValueError("agent.fn runs with a policy-gradient algorithm such as grpo and a policy that is not Arrow-routed")
        return self

    @model_validator(mode="after")
    def _check_teacher_and_critic(self) -> "Recipe":
        a = self.algorithm
        if self.teacher.model is not None and (not a.spec.policy_gradient or a.spec.critic):
            raise ValueError(f"teacher.model adds a per-token advantage to the group's; it runs with algorithm.name=grpo "
                             f"(got {a.name})")
        if self.critic.model_fields_set and not a.spec.critic:
            raise ValueError(f"the critic section is read by algorithm.name=ppo only (got {a.name})")
        if a.spec.critic and self.trainer.zero_stage == 3:
            raise ValueError("algorithm.name=ppo needs trainer.zero_stage <= 2 (each rank scores its own shard with the "
                             "critic; ZeRO-3 would make every forward a collective)")
        return self

    @model_validator(mode="after")
    def _check_allocation(self) -> "Recipe":
        a, B = self.algorithm, self.data.prompts_per_step
        if a.allocation == "knapsack":
            if self.rollout.partial_rollouts:
                raise ValueError("algorithm.allocation=knapsack does not combine with rollout.partial_rollouts (a batch's "
                                 "budget is shared out among its prompts when it is submitted; partial rollouts carry "
                                 "prompts from one batch into another)")
            if a.rollout_budget is not None and a.rollout_budget < B * a.group_size:
                raise ValueError(f"algorithm.rollout_budget ({a.rollout_budget}) must be >= data.prompts_per_step x "
                                 f"algorithm.group_size ({B * a.group_size}): a prompt without history gets G rollouts")
        if a.allocation == "reinforce_ada" and a.rollout_budget is not None and a.rollout_budget < B * a.ada_round_size:
            raise ValueError(f"algorithm.rollout_budget ({a.rollout_budget}) must be >= data.prompts_per_step x "
                             f"algorithm.ada_round_size ({B * a.ada_round_size}): the first round samples every prompt")
        return self

    @model_validator(mode="after")
    def _check_packing(self) -> "Recipe":
        if self.trainer.max_tokens_per_micro_batch and not self.algorithm.spec.online:
            raise ValueError(f"trainer.max_tokens_per_micro_batch packs rollouts for the online algorithms; offline "
                             f"algorithm.name={self.algorithm.name} batches its pairs by trainer.micro_batch_size")
        return self

    @model_validator(mode="after")
    def _check_adapter_zero(self) -> "Recipe":
        if self.adapter.kind in ("sparse", "arrow") and self.trainer.zero_stage == 3:
            raise ValueError(f"adapter.kind={self.adapter.kind} needs trainer.zero_stage <= 2 (ZeRO-3 partitions the "
                             "weights these adapters read)")
        return self

    # Derived sizes, computed in one place.
    @property
    def rollouts_per_step(self) -> int:
        return self.data.prompts_per_step * self.algorithm.group_size

    def run_dir(self, timestamp: str) -> Path:
        try:
            return Path(self.output_dir.format(name=self.name, timestamp=timestamp))
        except (KeyError, IndexError) as e:
            raise RecipeError(f"recipe field 'output_dir': unknown placeholder {e} (use {{name}} and {{timestamp}})") from None

    @property
    def accuracy_reward(self) -> str:
        return self.rewards.accuracy or self.rewards.functions[0].key


# ---------------------------------------------------------------------------- loading


def load_recipe(path: str | os.PathLike | None, overrides: list[str] | None = None, check_paths: bool = True) -> Recipe:
    """Load a recipe YAML (or the defaults when ``path`` is None), apply overrides, validate."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise RecipeError(f"recipe file not found: {p}")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise RecipeError(f"recipe {p} is not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise RecipeError(f"recipe {p} must be a mapping at the top level")
    for key, value in parse_overrides(overrides or []):
        set_dotted(tree, key, value)
    try:
        recipe = Recipe.model_validate(tree)
    except ValidationError as e:
        raise RecipeError(format_errors(e, Recipe)) from None
    machine_defaults(recipe, cuda_devices())
    check_gpu_layout(recipe)
    if check_paths:
        check_recipe_paths(recipe)
    return recipe


def check_recipe_paths(recipe: Recipe) -> None:
    """Missing model or data paths fail here, naming the field, before anything starts."""
    checks = [("model.path", recipe.model.path), ("data.train", recipe.data.train), ("data.test", recipe.data.test)]
    for field, value in checks:
        if value is None or value.startswith(BUILTIN_PREFIX):
            continue
        if not Path(value).exists():
            raise RecipeError(f"recipe field '{field}': path does not exist: {value}")
    if not recipe.model.path.startswith(BUILTIN_PREFIX):
        check_model_dir(Path(recipe.model.path), "model.path", recipe.model.trust_remote_code)
    for i, item in enumerate(recipe.rewards.functions):  # a reward model's head and tokenizer: rl.prepare.model_reward
        if item.model is not None and not item.model.startswith(BUILTIN_PREFIX) and not Path(item.model).exists():
            raise RecipeError(f"recipe field 'rewards.functions.{i}.model': path does not exist: {item.model}")
    names = [r.key for r in recipe.rewards.functions]
    if recipe.rewards.accuracy is not None and recipe.rewards.accuracy not in names:
        raise RecipeError(f"recipe field 'rewards.accuracy': '{recipe.rewards.accuracy}' is not one of rewards.functions {names}")
    if not names:
        raise RecipeError("recipe field 'rewards.functions': at least one reward function is needed")


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_model_dir(mdir: Path, field: str, trust_remote_code: bool = False) -> None:
    """An HF causal-LM directory with a tokenizer and an architecture transformers knows."""
    if not mdir.is_dir() or not (mdir / "config.json").exists():
        raise RecipeError(f"recipe field '{field}': {mdir} has no config.json (not an HF model directory)")
    if not any((mdir / f).exists() for f in _TOKENIZER_FILES):
        raise RecipeError(f"recipe field '{field}': {mdir} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)})")
    if trust_remote_code:
        return
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        model_type = AutoConfig.from_pretrained(mdir).model_type
    except (ValueError, KeyError, OSError) as e:
        raise RecipeError(f"recipe field '{field}': cannot read {mdir}/config.json: {e}") from None
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise RecipeError(f"recipe field '{field}': architecture '{model_type}' in {mdir} is not a causal LM transformers supports")


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
