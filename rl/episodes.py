"""Multi-turn rollouts: episodes of several generate calls through the rollout actors.

One batch of B prompts x G episodes::

    turn 1    rollout.generate(prompts, n=G)             B x G first turns (vLLM, as single-turn)
    step      env.step(turn) -> observation, done, reward (one environment instance per episode)
    turn t    rollout.generate(contexts, n=1)            the episodes still running, context =
                                                          prompt + turns + observations so far
    ...       until done, max_turns, or the context would pass rollout.max_model_len

An episode is a :class:`~rollout.types.Completion` whose ``token_ids`` hold every response token
(the policy's turns and the observations between them), with ``loss_mask`` 1 on the policy's
tokens and 0 on the observations (their logprob is 0.0 and no loss or ratio reads it), so the
trainer's per-token logprobs, advantages and TIS see exactly the tokens the policy sampled.
``text`` is the policy's last turn: the recipe's reward functions score it; the environment's own
rewards are added on top (``Episode.env_reward``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from rewards.config import EnvironmentConfig
from rewards.environments import check_step, get_environment, guarded_calls
from rollout.types import Completion, SamplingSpec

# Seeds of turn t >= 2 are offset by t * TURN_SEED_STRIDE from the batch's, so turns never share one.
TURN_SEED_STRIDE = 8191


@dataclass
class Episode(Completion):
    """One multi-turn rollout (see the module docstring for its token layout)."""

    num_turns: int = 1
    env_reward: float = 0.0
    failure: str = ""  # env_error, env_timeout, env_malformed, episode_too_long: the episode scores the fallback
    failure_detail: str = ""
    transcript: str = ""  # the whole response, turns and observations, for logs and samples
    observation_tokens: int = 0
    _env: Any = field(default=None, repr=False)
    _running: bool = field(default=True, repr=False)


class EpisodeRunner:
    """Drives episodes for one recipe: its environment, turn budget and context limit."""

    def __init__(self, cfg: EnvironmentConfig, tokenizer, max_model_len: int):
        self.cfg, self.tokenizer, self.max_model_len = cfg, tokenizer, max_model_len
        self.env_cls = get_environment(cfg.name)

    def close(self) -> None:
        """Nothing outlives a batch of episodes."""

    def run(self, rollout, prompt_token_ids: Sequence[list[int]], rows: Sequence[dict], sampling: SamplingSpec) -> list[list[Episode]]:
        """B prompts (with their dataset rows) -> B groups of ``sampling.n`` finished episodes."""
        groups = [[self._start(c, rows[i]) for c in g] for i, g in enumerate(rollout.generate(list(prompt_token_ids), sampling))]
        flat = [e for g in groups for e in g]
        for turn in range(1, self.cfg.max_turns + 1):
            running = [e for e in flat if e._running]
            self._step(running, last_turn=turn == self.cfg.max_turns, turn_tokens=sampling.max_new_tokens)
            running = [e for e in running if e._running]
            if not running:
                break
            seed = None if sampling.seed is None else sampling.seed + turn * TURN_SEED_STRIDE
            again = SamplingSpec(**{**sampling.__dict__, "n": 1, "seed": seed})
            for e, (reply,) in zip(running, rollout.generate([e.prompt_token_ids + e.token_ids for e in running], again)):
                self._append(e, reply.token_ids, reply.logprobs, sampled=True)
                e.text, e.finish_reason, e.num_turns = reply.text, reply.finish_reason, e.num_turns + 1
                e.transcript += reply.text
                e.policy_version = min(e.policy_version, reply.policy_version)
        for e in flat:
            e._env = None
        return groups

    def _start(self, c: Completion, row: dict) -> Episode:
        e = Episode(**{**c.__dict__, "loss_mask": [1] * len(c.token_ids), "transcript": c.text})
        e._env = self.env_cls(**self.cfg.options)
        kind, out = guarded_calls([lambda: e._env.reset(row)], self.cfg.step_timeout_s)[0]
        if kind is not None:
            self._fail(e, kind, out)
        return e

    def _step(self, episodes: list[Episode], last_turn: bool, turn_tokens: int) -> None:
        """Each running episode's environment answers its latest turn (in parallel, time-limited); an
        episode goes on only if its next turn of up to ``turn_tokens`` tokens fits the engine."""
        outcomes = guarded_calls([lambda e=e: e._env.step(e.text) for e in episodes], self.cfg.step_timeout_s)
        for e, (kind, out) in zip(episodes, outcomes):
            if kind is not None:
                self._fail(e, kind, out)
                continue
            problem = check_step(out)
            if problem is not None:
                self._fail(e, "env_malformed", problem)
                continue
            e.env_reward += float(out.reward)
            if out.done or last_turn:
                e._running = False
                if not out.done:
                    e.finish_reason = "max_turns"
                continue
            obs = self.tokenizer(out.observation, add_special_tokens=False)["input_ids"]
            # The next turn must fit: context + observation + a full turn within the engine's length.
            context = len(e.prompt_token_ids) + len(e.token_ids) + len(obs)
            if context + turn_tokens > self.max_model_len:
                self._fail(e, "episode_too_long", f"{context} tokens of context leave no room for a {turn_tokens}-token "
                           f"turn within rollout.max_model_len={self.max_model_len}")
                continue
            self._append(e, obs, [0.0] * len(obs), sampled=False)
            e.observation_tokens += len(obs)
            e.transcript += out.observation

    def _append(self, e: Episode, ids: list[int], logprobs: list[float], sampled: bool) -> None:
        e.token_ids = e.token_ids + list(ids)
        e.logprobs = e.logprobs + list(logprobs)
        e.loss_mask = e.loss_mask + [1 if sampled else 0] * len(ids)

    @staticmethod
    def _fail(e: Episode, kind: str, detail: Any) -> None:
        e.failure, e.failure_detail, e._running = kind, f"{detail!r}"[:300] if not isinstance(detail, str) else detail[:300], False


def apply_episode_outcomes(result, episodes: Sequence[Completion], fallback: float) -> dict[str, int]:
    """Fold the episodes' own outcomes into a scorer result, in place: the environment's reward is
    added to each total (and kept as ``per_reward["environment"]``); a failed episode scores
    ``fallback`` in every entry. Returns the failure counts by kind."""
    failures: dict[str, int] = {}
    env = [float(getattr(e, "env_reward", 0.0)) for e in episodes]
    result.per_reward["environment"] = env
    for i, e in enumerate(episodes):
        kind = getattr(e, "failure", "")
        if kind:
            failures[kind] = failures.get(kind, 0) + 1
            result.total[i] = fallback
            for values in result.per_reward.values():
                values[i] = fallback
        else:
            result.total[i] += env[i]
    return failures


def count_episode_failures(result, episodes: Sequence[Completion], fallback: float, step_failures: dict[str, int],
                           total_failures: dict[str, int], warn) -> None:
    """``apply_episode_outcomes``, then add its failure counts to this step's and the run's totals (in place);
    the first episode of each kind in the run is reported through ``warn``, every one is counted."""
    for kind, count in apply_episode_outcomes(result, episodes, fallback).items():
        if not total_failures.get(kind):
            detail = next(e.failure_detail for e in episodes if e.failure == kind)
            warn(f"warning: an episode ended with {kind} ({detail}); it scores rewards.fallback, the run goes on")
        step_failures[kind] = step_failures.get(kind, 0) + count
        total_failures[kind] = total_failures.get(kind, 0) + count


def episode_metrics(episodes: Sequence[Completion]) -> dict[str, float]:
    """Turns per episode, the share of observation tokens, and how episodes ended."""
    eps = [e for e in episodes if isinstance(e, Episode)]
    if not eps:
        return {}
    tokens = sum(len(e.token_ids) for e in eps)
    return {
        "turns_mean": sum(e.num_turns for e in eps) / len(eps),
        "multi_turn_fraction": sum(e.num_turns > 1 for e in eps) / len(eps),
        "observation_token_fraction": sum(e.observation_tokens for e in eps) / max(tokens, 1),
        "env_reward_mean": sum(e.env_reward for e in eps) / len(eps),
        "episode_failures": float(sum(bool(e.failure) for e in eps)),
    }


__all__ = ["Episode", "EpisodeRunner", "apply_episode_outcomes", "count_episode_failures", "episode_metrics", "TURN_SEED_STRIDE"]
