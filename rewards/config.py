"""The recipe's `rewards` section: which reward functions and reward models score a completion, with
what weights and limits.

An entry of ``rewards.functions`` names exactly one of:

- ``fn``: a reward function (a registered name, ``path/to/file.py:fn`` or ``package.module:fn``);
- ``model``: a reward-model directory (or ``builtin:tiny-hh-rm``), served by its own actor and
  scored as ``kind: classifier`` (a sequence-classification head with one label: its logit is the
  score) or ``kind: judge`` (a causal LM asked ``template``; the score is
  P(yes_token) / (P(yes_token) + P(no_token)) of its next token). See :mod:`rewards.model_reward`.

The options below ``model`` apply only to model entries, and ``template`` / ``yes_token`` /
``no_token`` only to judges: setting one where it does not apply fails, naming it.

Beside it, the sections that make an episode more than one completion: ``environment`` (multi-turn
environments) and ``agent`` (your own OpenAI-API agent code).
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

DEFAULT_JUDGE_TEMPLATE = (
    "{prompt}{completion}\n\nQuestion: Is the last reply of the Assistant helpful and harmless? "
    "Answer Yes or No.\nAnswer:"
)
DEFAULT_MAX_LENGTH = 512
# Fields that only a model entry reads, and those only a judge reads.
MODEL_FIELDS = ("kind", "batch_size", "max_length", "template", "yes_token", "no_token", "num_cpus", "num_gpus", "torch_threads",
                "dtype")
JUDGE_FIELDS = ("template", "yes_token", "no_token")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RewardItem(Section):
    fn: Optional[str] = Field(None, description="A registered name, `path/to/file.py:fn` or `package.module:fn`.")
    model: Optional[str] = Field(
        None, description="A reward-model directory (HF format, with its tokenizer), or `builtin:tiny-hh-rm` "
        "(built locally and cached). Exactly one of `fn` / `model`.")
    weight: float = 1.0
    name: Optional[str] = Field(
        None, description="The reward's key in metrics (`reward/<name>`) and for `rewards.accuracy`; default: `fn` or `model`.")
    # -- model entries only ---------------------------------------------------------------------------
    kind: Literal["classifier", "judge"] = Field(
        "classifier", description="`classifier`: AutoModelForSequenceClassification with num_labels=1, score = its logit "
        "on prompt + completion. `judge`: a causal LM asked `template`, score = P(yes) / (P(yes) + P(no)) of its next token.")
    batch_size: int = Field(32, ge=1, description="Texts per forward pass of the reward model (scores do not depend on it).")
    max_length: Optional[int] = Field(
        None, ge=8, description="Tokens per scored text; a longer one keeps its end (the completion), its start is cut. "
        f"Default: {DEFAULT_MAX_LENGTH}, or for `builtin:tiny-hh-rm` the 128 it was trained on.")
    template: str = Field(
        DEFAULT_JUDGE_TEMPLATE, description="Judge only: the question, a format string with {prompt} and {completion}.")
    yes_token: str = Field(" Yes", description="Judge only: the answer scored as good; must be one token of the judge's tokenizer.")
    no_token: str = Field(" No", description="Judge only: the answer scored as bad; must be one token of the judge's tokenizer.")
    num_cpus: float = Field(1.0, ge=0.0, description="CPUs the reward-model actor reserves in Ray.")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs the reward-model actor reserves in Ray; > 0 runs the model on "
                            "its GPU (0: on the CPU). Outside the run's placement group, like a teacher's engines.")
    torch_threads: int = Field(
        0, ge=0, description="Torch threads of the reward-model actor; 0: every core when rollout is synchronous (the "
        "reward phase runs alone), else num_cpus.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="The reward model's dtype.")

    @model_validator(mode="after")
    def _check_one_source(self) -> "RewardItem":
        if (self.fn is None) == (self.model is None):
            has = "both" if self.fn is not None else "neither"
            raise ValueError(f"a reward entry needs exactly one of 'fn' (a reward function) or 'model' (a reward-model "
                             f"directory); it has {has}")
        for value, key in ((self.fn, "fn"), (self.model, "model"), (self.name, "name")):
            if value is not None and not value.strip():
                raise ValueError(f"'{key}' must not be empty")
        set_ = self.model_fields_set
        if self.fn is not None:
            wrong = [f for f in MODEL_FIELDS if f in set_]
            if wrong:
                raise ValueError(f"{_fields(wrong)} only to a reward model entry ('model'), not to the reward "
                                 f"function {self.fn!r}")
        elif self.kind == "classifier":
            wrong = [f for f in JUDGE_FIELDS if f in set_]
            if wrong:
                raise ValueError(f"{_fields(wrong)} only to kind: judge (this entry is kind: classifier)")
        else:
            named = {f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None}
            if named != {"prompt", "completion"}:
                raise ValueError(f"'template' must use exactly the placeholders {{prompt}} and {{completion}} "
                                 f"(it uses {sorted(named) or 'none'})")
            if self.yes_token == self.no_token:
                raise ValueError(f"'yes_token' and 'no_token' must differ (both {self.yes_token!r})")
        return self

    @model_serializer(mode="wrap")
    def _dump_what_applies(self, handler):
        """A function entry dumps without the model options, a classifier without the judge's (`rl config`)."""
        data = handler(self)
        drop = set(MODEL_FIELDS) if self.fn is not None else set(JUDGE_FIELDS) if self.kind == "classifier" else set()
        drop |= {k for k in ("fn", "model", "name") if getattr(self, k) is None}
        return {k: v for k, v in data.items() if k not in drop}

    @property
    def key(self) -> str:
        """The reward's name in :attr:`rewards.ScoreResult.per_reward` and the metrics."""
        return self.name or self.fn or self.model  # type: ignore[return-value]


def _fields(names: list[str]) -> str:
    return f"{', '.join(repr(n) for n in names)} appl{'ies' if len(names) == 1 else 'y'}"


class RewardsConfig(Section):
    functions: list[RewardItem] = Field(default_factory=lambda: [RewardItem(fn="arithmetic_exact")])
    fallback: float = Field(0.0, description="Reward given to a completion whose reward function fails.")
    timeout_seconds: Optional[float] = Field(
        None, gt=0.0, description="Per-call time limit of a reward function (or reward-model batch call); a call past it "
        "costs its samples (fallback)."
    )
    accuracy: Optional[str] = Field(
        None, description="Which reward is 'accuracy' in metrics and evaluation (its key: `name`, `fn` or `model`); "
        "default: the first. Held-out accuracy counts scores >= 0.5, which suits 0/1 checks, not a reward model's "
        "scores: for a reward model watch reward_mean."
    )


class EnvironmentConfig(Section):
    """Multi-turn rollouts (``rl/episodes.py``): unset ``name`` samples one completion per rollout, as before."""

    name: Optional[str] = Field(
        None, description="A registered environment (`scripted`, `calculator`, `python`), `path/to/file.py:Class` or "
        "`package.module:Class`; see rewards.environments. Unset: single-turn.")
    options: dict = Field(default_factory=dict, description="Keyword arguments of the environment's constructor.")
    max_turns: int = Field(2, ge=1, description="Policy turns per episode at most; each is up to rollout.max_new_tokens.")
    step_timeout_s: float = Field(10.0, gt=0.0, description="An environment step past this ends its episode (reward fallback, "
                                  "counted as env_timeout).")

    @model_validator(mode="after")
    def _check_name(self) -> "EnvironmentConfig":
        if self.name is not None:
            from rewards.environments import get_environment

            try:
                cls = get_environment(self.name)
                cls(**self.options)
            except (KeyError, AttributeError, TypeError, ValueError, FileNotFoundError, ImportError) as e:
                raise ValueError(f"environment {self.name!r}: {e}") from None
        return self


class AgentConfig(Section):
    """Rollouts made by your own agent code through the OpenAI API (``rl/agents.py``, ``rl/gateway.py``)."""

    fn: Optional[str] = Field(
        None, description="`path/to/file.py:run_episode` or `package.module:run_episode`: run_episode(client, prompt, "
        "**columns) -> reward or None, with `client` an openai.OpenAI served by the rollout engines. Unset: no agent.")
    concurrency: int = Field(16, ge=1, description="Episodes running at once (their requests are batched into one engine call).")
    timeout_s: float = Field(60.0, gt=0.0, description="An episode past this is abandoned: it scores rewards.fallback "
                             "(counted as agent_timeout).")
    tool_parser: Optional[str] = Field(
        None, description="The vLLM tool parser that reads tool calls out of a reply when a request offers `tools` "
        "(`hermes` for Qwen2.5/Hermes-style <tool_call> JSON, `llama3_json`, `pythonic`, ...). Unset: a request with "
        "tools is refused.")
    chat_template: Optional[str] = Field(
        None, description="A Jinja chat template file the gateway renders chat requests with instead of the model's, "
        "e.g. docs/guide/examples/chatml_tools.jinja to offer tools to a ChatML model whose own template ignores them.")

    @model_validator(mode="after")
    def _check_fn(self) -> "AgentConfig":
        if self.fn is not None:
            from rewards.registry import load_plugin

            try:
                fn = load_plugin(self.fn, "agent function")
            except (AttributeError, ValueError, FileNotFoundError, ImportError, SyntaxError) as e:
                raise ValueError(f"agent.fn {self.fn!r}: {e}") from None
            if not callable(fn):
                raise ValueError(f"agent.fn {self.fn!r} is not a function run_episode(client, prompt, **columns)")
        if self.chat_template is not None and not Path(self.chat_template).is_file():
            raise ValueError(f"agent.chat_template {self.chat_template!r}: no such file")
        return self
