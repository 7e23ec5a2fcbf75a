"""Rollouts produced by your own agent code through the OpenAI API (``agent.fn``).

Each rollout is one call of ``run_episode(client, prompt, **columns)``: ``client`` is an ``openai.OpenAI`` whose
base URL is the run's gateway (``rl.gateway``) and whose API key names the episode; ``prompt`` is the row's
prompt (``data.template`` applied, no chat template: the agent builds its own messages); ``columns`` are the
row's other columns (a column named ``prompt`` is the ``prompt`` argument). It may make any number of calls
within ``rollout.max_model_len`` and add any text between them (tool results, instructions). It returns a
reward (added to the recipe's rewards, which score the last reply) or None. The episode that trains is the
engine's own token sequence: its replies trained, what the agent added masked out (``rl.gateway.EpisodeTokens``).

An agent that raises, runs past ``agent.timeout_s``, makes a request the gateway refuses, or makes no request
costs that episode (it scores ``rewards.fallback``; ``reward_failures_agent_*`` counts it), never the run.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from rl.episodes import Episode
from rollout.types import SamplingSpec

# Episode e of a batch samples its call c with seed (batch seed + e * EPISODE_SEED_STRIDE + c).
EPISODE_SEED_STRIDE = 1024


class AgentRunner:
    """Runs ``agent.fn`` for every rollout of a batch, ``agent.concurrency`` at a time, against the gateway."""

    def __init__(self, cfg, data_cfg, tokenizer, max_model_len: int):
        from rewards.registry import load_plugin
        from rl.gateway import Gateway

        self.cfg, self.data_cfg = cfg, data_cfg
        self.fn: Callable[..., Any] = load_plugin(cfg.fn, "agent function")
        template = Path(cfg.chat_template).read_text() if cfg.chat_template else None
        self.gateway = Gateway(tokenizer, SamplingSpec(), max_model_len, tool_parser=cfg.tool_parser, chat_template=template)
        self._started = False

    def close(self) -> None:
        """Stop the gateway (a later ``run`` starts it again)."""
        if self._started:
            self.gateway.stop()
            self._started = False

    def run(self, rollout, prompt_token_ids: Sequence[list[int]], rows: Sequence[dict], sampling: SamplingSpec) -> list[list[Episode]]:
        """B prompts (with their rows) -> B groups of ``sampling.n`` finished episodes, sampled as ``sampling`` says
        (temperature, top-p/k, the most new tokens per call; greedy for an evaluation)."""
        if not self._started:
            self.gateway.start()
            self._started = True
        self.gateway.engines, self.gateway.sampling = rollout, sampling
        jobs = [(b, g) for b in range(len(rows)) for g in range(sampling.n)]
        keys = [self.gateway.open_episode(None if sampling.seed is None else sampling.seed + i * EPISODE_SEED_STRIDE)
                for i in range(len(jobs))]
        outcomes: list[tuple[str, Any]] = [("", None)] * len(jobs)
        started: list[tuple[threading.Thread, float]] = []
        for i, ((b, _), key) in enumerate(zip(jobs, keys)):
            self._wait_for_a_slot(started)
            t = threading.Thread(target=self._episode, args=(i, key, rows[b], outcomes), daemon=True, name=f"rl-agent-{i}")
            t.start()
            started.append((t, time.monotonic() + self.cfg.timeout_s))
        for t, deadline in started:
            t.join(max(0.0, deadline - time.monotonic()))
        late = f"no answer within agent.timeout_s={self.cfg.timeout_s:g}"
        outcomes = [("agent_timeout", late) if t.is_alive() else outcome for (t, _), outcome in zip(started, outcomes)]
        episodes = [self._episode_of(i, b, self.gateway.close_episode(key), outcomes[i], prompt_token_ids[b])
                    for i, ((b, _), key) in enumerate(zip(jobs, keys))]
        return [episodes[b * sampling.n:(b + 1) * sampling.n] for b in range(len(rows))]

    def _wait_for_a_slot(self, started: list[tuple[threading.Thread, float]]) -> None:
        """Until fewer than ``agent.concurrency`` agents run; one past its time limit no longer holds a slot."""
        while True:
            now = time.monotonic()
            running = [(t, d) for t, d in started if t.is_alive() and d > now]
            if len(running) < self.cfg.concurrency:
                return
            t, deadline = min(running, key=lambda x: x[1])
            t.join(max(0.0, deadline - now))

    def _episode(self, i: int, key: str, row: dict, outcomes: list) -> None:
        import openai

        try:
            client = openai.OpenAI(base_url=self.gateway.url, api_key=key, max_retries=0, timeout=self.cfg.timeout_s)
            columns = {k: v for k, v in row.items() if not k.startswith("_")}
            prompt = self.data_cfg.template.format(**columns)
            columns.pop("prompt", None)  # a "prompt" column is the prompt itself (the template applied to the row)
            outcomes[i] = ("", self.fn(client, prompt, **columns))
        except BaseException as e:  # noqa: BLE001 -- the agent's fault costs its episode
            outcomes[i] = ("agent_error", f"{type(e).__name__}: {e}")

    def _episode_of(self, i: int, b: int, tokens, outcome: tuple[str, Any], dataset_prompt: list[int]) -> Episode:
        kind, value = outcome
        if kind != "agent_timeout" and tokens.rejected:  # the agent may have raised on the refusal, or caught it
            kind, value = "agent_bad_request", tokens.rejected
        e = Episode(prompt_index=b, prompt_token_ids=tokens.prompt_ids or list(dataset_prompt), token_ids=tokens.token_ids,
                    text=tokens.last_text, logprobs=tokens.logprobs, finish_reason=tokens.finish_reason,
                    policy_version=tokens.policy_version or 0, loss_mask=tokens.loss_mask, num_turns=tokens.calls,
                    transcript=tokens.seen, observation_tokens=tokens.added_tokens)
        if not kind and tokens.calls == 0:
            kind, value = "agent_error", "the agent made no request"
        if not kind and value is not None:
            try:
                e.env_reward = float(value)
            except (TypeError, ValueError):
                kind, value = "agent_error", f"run_episode returned {value!r}, not a reward (a number) or None"
        if kind:
            e.failure, e.failure_detail = kind, str(value)[:300]
        if not e.token_ids:  # nothing sampled: one masked token keeps the row well-formed; it scores the fallback
            e.token_ids, e.logprobs, e.loss_mask = [0], [0.0], [0]
        return e


def make_episode_runner(recipe, tokenizer):
    """What makes a rollout when it is more than one completion: the recipe's environment (``EpisodeRunner``), its
    agent (``AgentRunner``), or None."""
    from rl.episodes import EpisodeRunner

    if recipe.environment.name:
        return EpisodeRunner(recipe.environment, tokenizer, recipe.rollout.max_model_len)
    if recipe.agent.fn:
        return AgentRunner(recipe.agent, recipe.data, tokenizer, recipe.rollout.max_model_len)
    return None
