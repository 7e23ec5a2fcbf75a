"""The OpenAI API's shapes the gateway (``rl.gateway``) speaks beyond plain text: a whole response as stream chunks,
and tool calls. ``agent.tool_parser`` names one of vLLM's tool parsers
(``hermes``, ``llama3_json``, ``pythonic``, ...), which reads the calls out of a reply into ``message.tool_calls``
(``finish_reason: "tool_calls"``). When the agent sends such a message back, it is written as the reply's own text,
not as the chat template would write the calls again: the conversation stays the engine's tokens."""

from __future__ import annotations

import functools
import json
import uuid
from typing import Optional


def stream_chunks(response: dict) -> list[dict]:
    """A whole response as the OpenAI stream chunks that carry it: the reply's text in one delta, then its finish
    reason with the usage. Fields other than ``choices`` and ``object`` are the response's own.

    >>> r = {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "policy", "system_fingerprint": "policy-v3",
    ...      "policy_version": 3, "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    ...      "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None, "message": {"role": "assistant", "content": "46"}}]}
    >>> [(c["object"], c["choices"][0]["delta"], c["choices"][0]["finish_reason"]) for c in stream_chunks(r)]
    [('chat.completion.chunk', {'role': 'assistant', 'content': '46'}, None), ('chat.completion.chunk', {}, 'stop')]
    """
    choice = response["choices"][0]
    if response["object"] == "chat.completion":
        message = choice["message"]
        delta = {"role": "assistant", "content": message["content"]}
        if message.get("tool_calls"):
            delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
        kind, text, done = "chat.completion.chunk", {"delta": delta}, {"delta": {}}
    else:
        kind, text, done = "text_completion", {"text": choice["text"]}, {"text": ""}
    head = {k: v for k, v in response.items() if k not in ("object", "choices", "usage")} | {"object": kind}
    last = {"index": 0, **done, "finish_reason": choice["finish_reason"], "logprobs": None}
    return [{**head, "choices": [{"index": 0, **text, "finish_reason": None, "logprobs": None}]},
            {**head, "choices": [last], "usage": response["usage"]}]


def template_message(message: dict, replies: dict[str, str]) -> dict:
    """One request message as the chat template takes it. An assistant message whose tool calls came from one of
    this episode's replies becomes that reply's text: the template then writes back exactly what was sampled."""
    calls = message.get("tool_calls") or []
    known = {replies.get(c.get("id")) for c in calls}
    if calls and len(known) == 1 and None not in known:
        return {"role": "assistant", "content": known.pop()}
    out = {"role": message["role"], "content": message.get("content") or ""}
    out.update({k: message[k] for k in ("tool_calls", "tool_call_id", "name") if message.get(k)})
    return out


def load_tool_parser(name: str, tokenizer):
    """vLLM's tool parser ``name`` for ``tokenizer`` (importing vLLM's parsers takes a few seconds)."""
    from vllm.tool_parsers import ToolParserManager

    try:
        return ToolParserManager.get_tool_parser(name)(tokenizer)
    except KeyError:
        raise ValueError(f"agent.tool_parser {name!r} is not one of vLLM's tool parsers: "
                         f"{', '.join(ToolParserManager.list_registered())}") from None


def tools_request(tools: list):
    """vLLM's request object for a request's ``tools``, what its tool parsers read them from; malformed tools are a
    ``ValueError``. An agent sends the same tools on every call: they are checked and built once."""
    return _tools_request(json.dumps(tools, sort_keys=True))  # a request body is JSON: so are its tools


@functools.lru_cache(maxsize=64)
def _tools_request(tools_json: str):
    from pydantic import ValidationError
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    try:
        return ChatCompletionRequest(model="policy", messages=[{"role": "user", "content": ""}], tools=json.loads(tools_json))
    except ValidationError as e:  # the gateway answers a ValueError with HTTP 400
        raise ValueError(f"malformed tools: {e.errors()[0]['loc']}: {e.errors()[0]['msg']}") from None


def read_tool_calls(parser, text: str, body: dict) -> tuple[Optional[str], list[dict]]:
    """The tool calls in a reply's ``text`` as OpenAI ``tool_calls`` (arguments a JSON string), and the text
    outside them; no calls (none written, or not parseable) leaves the whole text as the content."""
    found = parser.extract_tool_calls(text, tools_request(body["tools"]))
    if not found.tools_called:
        return text, []
    calls = [{"id": c.id or f"call_{uuid.uuid4().hex[:24]}", "type": "function",
              "function": {"name": c.function.name, "arguments": c.function.arguments}} for c in found.tool_calls]
    return found.content, calls
