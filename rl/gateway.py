"""An OpenAI-compatible endpoint in front of the rollout engines, for agents written against the OpenAI API.

``POST /v1/chat/completions`` and ``POST /v1/completions`` are answered by the run's vLLM actors; with ``stream``
the reply comes as server-sent events, all of its text in one chunk (the engine returns a reply whole).
Each agent episode calls with its own API key (the episode's id), and the gateway keeps that episode's tokens:

    request 1    text -> token ids (the prompt)                        the engine samples; ids appended, mask 1
    request k    text must extend what the agent has seen so far       only the new part is tokenized, mask 0,
                 (prompt, replies, what it added in between)           appended to the ids; the engine samples
                                                                       from exactly those ids

So the episode the trainer gets is the engine's own token sequence (token in, token out): nothing is
re-tokenized, and tokens the agent or its tools added are masked out of the loss. A request whose history
differs from what the episode sampled, that asks for another temperature, n > 1, stop strings, or a context
past ``rollout.max_model_len`` is refused with HTTP 400 and marks its episode failed. Requests of all running
episodes are batched into one engine call; each request's seed is fixed by its episode and call index.

Tools (``tools`` in a chat request, ``rl.openai_api``) need ``agent.tool_parser`` and a chat template that writes
them into the prompt (the model's own or ``agent.chat_template``); one that ignores them is refused, never dropped.
A forced call (``tool_choice``) starts the reply with the parser's call opening, masked out like the agent's text.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Optional

from fastapi import FastAPI, Request  # module level: the endpoints' annotations are resolved in these globals
from fastapi.responses import JSONResponse, StreamingResponse
from jinja2 import TemplateError

from rl.openai_api import (forced_call_opening, load_tool_parser, read_tool_calls, stream_chunks, template_message,
                           tools_request)
from rollout.types import Completion, SamplingSpec

BATCH_WINDOW_S = 0.01  # how long the batcher waits for more requests after the first


class BadRequest(ValueError):
    """A request the gateway refuses (HTTP 400); its episode is marked failed."""


@dataclass
class EpisodeTokens:
    """One agent episode's token sequence as the engine saw it. ``seen``: the text the agent has been shown
    (prompts and replies), which each new request's text must extend."""

    seed: Optional[int]
    prompt_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # everything after the first prompt
    logprobs: list[float] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    seen: str = ""
    calls: int = 0
    last_text: str = ""
    finish_reason: str = "stop"
    policy_version: Optional[int] = None
    added_tokens: int = 0  # tokens the agent added between calls (masked out)
    rejected: str = ""  # why a request was refused (the episode then fails)
    closed: bool = False
    busy: bool = False  # a call is in flight (an episode is one sequence: its calls come one after another)
    last_special: str = ""  # the decoded stop token the last reply ended with ("" if none)
    tool_call_replies: dict[str, str] = field(default_factory=dict)  # tool call id -> the text of the reply that made it

    def context(self, text: str, tokenizer) -> list[int]:
        """The ids to sample from for a request whose full text is ``text``; appends the agent's new tokens."""
        if self.calls == 0:
            self.prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            self.seen = text
            return list(self.prompt_ids)
        if not text.startswith(self.seen):
            at = next((i for i, (a, b) in enumerate(zip(text, self.seen)) if a != b), min(len(text), len(self.seen)))
            raise BadRequest(f"the conversation differs from what this episode sampled at character {at} "
                             f"({self.seen[at:at + 40]!r} sampled, {text[at:at + 40]!r} sent): send the replies back unchanged")
        delta = text[len(self.seen):]
        if self.last_special and delta.startswith(self.last_special):
            delta = delta[len(self.last_special):]  # a chat template writes again the stop token the engine emitted
        ids = tokenizer(delta, add_special_tokens=False)["input_ids"] if delta else []
        self.token_ids += ids
        self.logprobs += [0.0] * len(ids)
        self.loss_mask += [0] * len(ids)
        self.added_tokens += len(ids)
        self.seen = text
        return self.prompt_ids + self.token_ids

    def record(self, reply: Completion, special_text: str) -> None:
        """Append a sampled reply: its ids are trained (mask 1), its text is what the agent sees next."""
        self.token_ids += reply.token_ids
        self.logprobs += reply.logprobs
        self.loss_mask += [1] * len(reply.token_ids)
        self.seen += reply.text
        self.last_text, self.finish_reason, self.calls = reply.text, reply.finish_reason, self.calls + 1
        self.policy_version = reply.policy_version if self.policy_version is None else min(self.policy_version, reply.policy_version)
        self.last_special = special_text


@dataclass
class _Pending:
    ids: list[int]
    max_tokens: int
    seed: Optional[int]
    future: Future


class Gateway:
    """The HTTP server (uvicorn in a thread) and the batcher that feeds the engines. ``open_episode`` gives an
    agent its API key; ``close_episode`` takes its tokens back."""

    def __init__(self, tokenizer, sampling: SamplingSpec, max_model_len: int, model_name: str = "policy",
                 tool_parser: Optional[str] = None, chat_template: Optional[str] = None):
        """``tool_parser``: a vLLM tool parser's name (a request with tools is refused without one);
        ``chat_template``: a Jinja chat template used instead of the model's."""
        self.tokenizer, self.sampling, self.max_model_len, self.model_name = tokenizer, sampling, max_model_len, model_name
        self.chat_template, self.tool_parser_name = chat_template, tool_parser
        self.tool_parser = load_tool_parser(tool_parser, tokenizer) if tool_parser else None
        self.episodes: dict[str, EpisodeTokens] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self.engines = None  # the RolloutGroup, set for each batch of episodes
        self._server = self._thread = self._batcher = None
        self.port = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> str:
        """Serve on a free local port; returns the base URL (``.../v1``)."""
        import uvicorn

        from rl.workers import free_port

        self.port = free_port()
        self._server = uvicorn.Server(uvicorn.Config(self.app(), host="127.0.0.1", port=self.port, log_level="warning",
                                                     access_log=False))
        self._thread = threading.Thread(target=self._server.run, name="rl-gateway", daemon=True)
        self._thread.start()
        self._batcher = threading.Thread(target=self._batch_loop, name="rl-gateway-batcher", daemon=True)
        self._batcher.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"the OpenAI gateway did not start on 127.0.0.1:{self.port}")
            time.sleep(0.02)
        return self.url

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        """Stop serving (a second call does nothing)."""
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
            self._queue.put(None)
            self._batcher.join(timeout=10)
            self._server = None

    def open_episode(self, seed: Optional[int]) -> str:
        key = f"ep-{uuid.uuid4().hex}"
        with self._lock:
            self.episodes[key] = EpisodeTokens(seed=seed)
        return key

    def close_episode(self, key: str) -> EpisodeTokens:
        """No more calls for ``key`` (a late one gets 400); returns its tokens."""
        with self._lock:
            ep = self.episodes.pop(key)
            ep.closed = True
        return ep

    # ------------------------------------------------------------------ requests

    def reject(self, key: str, message: str) -> None:
        """A refused request fails its episode (the first reason is kept)."""
        with self._lock:
            ep = self.episodes.get(key)
        if ep is not None and not ep.rejected:
            ep.rejected = message

    def episode(self, key: str) -> EpisodeTokens:
        with self._lock:
            ep = self.episodes.get(key)
        if ep is None:
            raise BadRequest("unknown or finished episode: use the API key the run gave this episode")
        return ep

    def complete(self, key: str, text: str, body: dict) -> tuple[EpisodeTokens, Completion]:
        """Sample the reply to one request of episode ``key`` whose full text is ``text``."""
        with self._lock:
            ep = self.episodes.get(key)
            if ep is not None and ep.busy:
                message = "one call at a time per episode: wait for the reply before the next request"
                ep.rejected = ep.rejected or message
                raise BadRequest(message)
            if ep is not None:
                ep.busy = True
        if ep is None:
            raise BadRequest("unknown or finished episode: use the API key the run gave this episode")
        try:
            return self._complete(ep, text, body)
        finally:
            ep.busy = False

    def _complete(self, ep: EpisodeTokens, text: str, body: dict) -> tuple[EpisodeTokens, Completion]:
        try:
            if int(body.get("n", 1) or 1) != 1:
                raise BadRequest("n must be 1: an episode is one sequence of calls")
            if body.get("stop"):
                raise BadRequest("stop strings are not supported (the reply's tokens would not match its text); the "
                                 "model stops at its end-of-turn token or max_tokens")
            temperature = body.get("temperature")
            if temperature is not None and float(temperature) != self.sampling.temperature:
                raise BadRequest(f"temperature {temperature} differs from the run's rollout.temperature "
                                 f"{self.sampling.temperature} (the trainer's logprobs are of that temperature); leave it unset")
            max_tokens = min(int(body.get("max_tokens") or body.get("max_completion_tokens") or self.sampling.max_new_tokens),
                             self.sampling.max_new_tokens)
            ids = ep.context(text, self.tokenizer)
            if len(ids) + max_tokens > self.max_model_len:
                raise BadRequest(f"{len(ids)} tokens of context + {max_tokens} new tokens pass rollout.max_model_len="
                                 f"{self.max_model_len}")
        except BadRequest as e:
            ep.rejected = ep.rejected or str(e)
            raise
        seed = None if ep.seed is None else ep.seed + ep.calls
        future: Future = Future()
        self._queue.put(_Pending(ids, max_tokens, seed, future))
        reply = future.result()
        special = ""
        if reply.token_ids and reply.token_ids[-1] in self.tokenizer.all_special_ids:
            special = self.tokenizer.convert_ids_to_tokens(reply.token_ids[-1])
        ep.record(reply, special)
        return ep, reply

    def _batch_loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            time.sleep(BATCH_WINDOW_S)
            batch = [first]
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)
                    break
                batch.append(item)
            by_length: dict[int, list[_Pending]] = {}
            for p in batch:
                by_length.setdefault(p.max_tokens, []).append(p)
            for max_tokens, items in by_length.items():
                spec = SamplingSpec(**{**self.sampling.__dict__, "n": 1, "max_new_tokens": max_tokens, "seed": None,
                                       "seeds": [p.seed for p in items] if all(p.seed is not None for p in items) else None})
                try:
                    groups = self.engines.generate([p.ids for p in items], spec)
                except BaseException as e:  # every waiting request learns of it
                    for p in items:
                        p.future.set_exception(e)
                    continue
                for p, (reply,) in zip(items, groups):
                    p.future.set_result(reply)

    # ------------------------------------------------------------------ HTTP

    def _response(self, kind: str, ep: EpisodeTokens, reply: Completion, choice: dict) -> dict:
        """The OpenAI-shaped response to one request, with the policy version that produced it."""
        finish_reason = "stop" if reply.finish_reason == "stop" else "length"
        if choice.get("message", {}).get("tool_calls"):
            finish_reason = "tool_calls"
        return {
            "id": f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex[:24]}", "object": kind,
            "created": int(time.time()), "model": self.model_name,
            "system_fingerprint": f"policy-v{reply.policy_version}", "policy_version": reply.policy_version,
            "choices": [{"index": 0, "finish_reason": finish_reason, "logprobs": None, **choice}],
            "usage": {"prompt_tokens": len(ep.prompt_ids) + len(ep.token_ids) - len(reply.token_ids),
                      "completion_tokens": len(reply.token_ids),
                      "total_tokens": len(ep.prompt_ids) + len(ep.token_ids)},
        }

    def _chat_text(self, body: dict, ep: EpisodeTokens) -> str:
        """A chat request's conversation as the chat template writes it, tools included; an assistant message
        with tool calls this episode's replies made is written as that reply's own text."""
        messages, tools = body.get("messages"), body.get("tools") or None
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages must be a non-empty list")
        if not (self.chat_template or getattr(self.tokenizer, "chat_template", None)):
            raise BadRequest("this model has no chat template: use /v1/completions with a prompt, or set agent.chat_template")
        if tools:
            if self.tool_parser is None:
                raise BadRequest("this request offers tools, but the run has no agent.tool_parser to read the calls out of "
                                 "a reply (e.g. hermes): set it, or describe the tools in a message")
            try:
                tools_request(tools)  # malformed tools are refused before the engine samples
            except ValueError as e:
                raise BadRequest(str(e)) from None
        try:
            messages = [template_message(m, ep.tool_call_replies) for m in messages]
            text = self._render(messages, tools)
        except (KeyError, TypeError, AttributeError, TemplateError) as e:  # a template may raise on what it cannot write
            raise BadRequest(f"malformed messages: {type(e).__name__}: {e}") from None
        if tools and text == self._render(messages, None):
            raise BadRequest("the chat template ignores `tools` (the model would never see them): set agent.chat_template "
                             "to one that writes them, e.g. docs/guide/examples/chatml_tools.jinja for a ChatML model")
        return text + self._call_opening(body)

    def _call_opening(self, body: dict) -> str:
        """The start of a forced call (``tool_choice``), written after the prompt; "" when nothing is forced."""
        try:
            return forced_call_opening(body, self.tool_parser_name)
        except ValueError as e:
            raise BadRequest(str(e)) from None

    def _render(self, messages: list[dict], tools: Optional[list]) -> str:
        return self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True,
                                                  chat_template=self.chat_template)

    def _chat_choice(self, ep: EpisodeTokens, reply: Completion, body: dict) -> dict:
        """The assistant message of a reply (after a forced call's opening, which the agent sees as part of it): its
        tool calls read out when the request offered tools."""
        said = self._call_opening(body) + reply.text
        message: dict[str, Any] = {"role": "assistant", "content": said}
        if body.get("tools") and body.get("tool_choice") != "none":
            content, calls = read_tool_calls(self.tool_parser, said, body)
            if calls:
                message = {"role": "assistant", "content": content, "tool_calls": calls}
                ep.tool_call_replies.update({c["id"]: said for c in calls})
        return {"message": message}

    @staticmethod
    def _prompt_text(body: dict, ep: EpisodeTokens) -> str:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise BadRequest("prompt must be one string")
        return prompt

    def app(self) -> FastAPI:
        app = FastAPI()

        def key_of(request: Request) -> str:
            auth = request.headers.get("authorization", "")
            return auth[len("Bearer "):] if auth.startswith("Bearer ") else ""

        def error(message: str, status: int = 400) -> JSONResponse:
            return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}}, status_code=status)

        def serve(request_key: str, text_of, body: dict, kind: str, choice_of) -> Any:
            try:
                try:
                    text = text_of(body, self.episode(request_key))
                except BadRequest as e:
                    self.reject(request_key, str(e))
                    raise
                ep, reply = self.complete(request_key, text, body)
                choice = choice_of(ep, reply, body)
            except BadRequest as e:
                return error(str(e))
            except Exception as e:  # the engines failed: the agent sees a server error, the run finds out too
                return error(f"{type(e).__name__}: {e}", 500)
            response = self._response(kind, ep, reply, choice)
            if not body.get("stream"):
                return response
            events = [f"data: {json.dumps(chunk)}\n\n" for chunk in stream_chunks(response)] + ["data: [DONE]\n\n"]
            return StreamingResponse(iter(events), media_type="text/event-stream")

        @app.post("/v1/chat/completions")
        def chat(body: dict, request: Request):
            return serve(key_of(request), self._chat_text, body, "chat.completion", self._chat_choice)

        @app.post("/v1/completions")
        def completions(body: dict, request: Request):
            return serve(key_of(request), self._prompt_text, body, "text_completion", lambda ep, r, body: {"text": r.text})

        @app.get("/v1/models")
        def models():
            return {"object": "list", "data": [{"id": self.model_name, "object": "model", "owned_by": "rl"}]}

        return app
