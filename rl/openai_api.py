"""The OpenAI API's shapes the gateway (``rl.gateway``) speaks beyond plain text: a whole response as stream chunks,
and tool calls. ``agent.tool_parser`` names one of vLLM's tool parsers
(``hermes``, ``llama3_json``, ``pythonic``, ...), which reads the calls out of a reply into ``message.tool_calls``
(``finish_reason: "tool_calls"``). When the agent sends such a message back, it is written as the reply's own text,
not as the chat template would write the calls again: the conversation stays the engine's tokens.

A forced call (``tool_choice: "required"`` or a named function) is the parser's call opening written after the
prompt, as text the agent might have added (masked out of the loss); the model writes the rest. Constrained
decoding would sample from a grammar-masked distribution the trainer's logprobs do not know of, so the gateway does
not use it: a reply that does not finish a valid call comes back as text."""

from __future__ import annotations

import functools
import json
import logging
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


# How a call opens in each parser's format: (any function, one named function). ``{name}``: the name as a JSON
# string. The openings end before a space: the model writes it with the token that follows, as it would unforced.
CALL_OPENINGS = {
    "hermes": ("<tool_call>\n{{\"name\":", "<tool_call>\n{{\"name\": {name}, \"arguments\":"),
    "pythonic": ("[", "[{bare}("),
}


def forced_call_opening(body: dict, parser_name: Optional[str]) -> str:
    """The text a chat request's ``tool_choice`` puts at the start of the reply: "" unless it forces a call
    ("required", or ``{"type": "function", "function": {"name": ...}}``); a choice the run cannot force is a
    ``ValueError``.

    >>> tools = [{"type": "function", "function": {"name": "calc", "parameters": {}}}]
    >>> forced_call_opening({"tools": tools, "tool_choice": "required"}, "hermes")
    '<tool_call>\\n{"name":'
    >>> forced_call_opening({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "calc"}}}, "pythonic")
    '[calc('
    >>> forced_call_opening({"tools": tools, "tool_choice": "auto"}, "hermes")
    ''
    """
    choice = body.get("tool_choice")
    if choice in (None, "auto", "none"):
        return ""
    names = [t.get("function", {}).get("name") for t in body.get("tools") or [] if isinstance(t, dict)]
    if not names:
        raise ValueError(f"tool_choice {choice!r} forces a call, but the request offers no tools")
    if choice == "required":
        name = None
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in names:
            raise ValueError(f"tool_choice names {name!r}, which is not one of this request's tools: {names}")
    else:
        raise ValueError(f"tool_choice {choice!r}: one of 'auto', 'none', 'required' or "
                         "{'type': 'function', 'function': {'name': ...}}")
    if parser_name not in CALL_OPENINGS:
        raise ValueError(f"tool_choice {choice!r}: a forced call is written as the tool parser's call opening, "
                         f"known for {', '.join(CALL_OPENINGS)}, not for agent.tool_parser {parser_name!r}")
    any_call, named = CALL_OPENINGS[parser_name]
    return any_call.format() if name is None else named.format(name=json.dumps(name), bare=name)


def load_tool_parser(name: str, tokenizer):
    """vLLM's tool parser ``name`` for ``tokenizer`` (importing vLLM's parsers takes a few seconds). A reply whose
    call does not parse is the model's output, not a fault: it comes back as text, and the parser's traceback for
    it (logged at ERROR, one per malformed reply) stays off the terminal."""
    from vllm.tool_parsers import ToolParserManager

    try:
        parser_class = ToolParserManager.get_tool_parser(name)
    except KeyError:
        raise ValueError(f"agent.tool_parser {name!r} is not one of vLLM's tool parsers: "
                         f"{', '.join(ToolParserManager.list_registered())}") from None
    logging.getLogger(parser_class.__module__).setLevel(logging.CRITICAL)
    return parser_class(tokenizer)


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
