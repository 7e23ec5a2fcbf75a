"""Tool calls through the gateway, with the official ``openai`` client over HTTP and vLLM's own tool parser:
a reply's ``<tool_call>`` becomes ``message.tool_calls``; sent back, that message is written as the reply's own
text, so the next request extends the engine's tokens; tools the run cannot read, or a template that ignores
them, are refused. The engine is a scripted stand-in (the real one is tested in tests/e2e/test_agent_gateway.py):
what is tested here is the HTTP, parsing and bookkeeping layer, and the guide's example agents
(docs/guide/examples/*_agent.py) run against it, each scored by its recipe's reward."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rl.gateway import Gateway
from rl.tasks.tiny_model import build_tokenizer
from rollout.types import Completion, SamplingSpec

TEMPLATE = (Path(__file__).parents[2] / "docs/guide/examples/chatml_tools.jinja").read_text()
TOOLS = [{"type": "function", "function": {"name": "calc", "description": "Evaluate an arithmetic expression.",
                                           "parameters": {"type": "object", "properties": {"expr": {"type": "string"}},
                                                          "required": ["expr"]}}}]
# Written more tightly than the template writes a call back: were the message sent back re-rendered, the
# conversation would differ from what the engine sampled.
CALL = '<tool_call>{"name":"calc","arguments":{"expr":"2+3"}}</tool_call>'


class ScriptedEngines:
    """Answers each engine call with the next reply of a script; remembers the ids it was asked to continue."""

    def __init__(self, tokenizer, replies: list[str]):
        self.tokenizer, self.replies, self.contexts = tokenizer, list(replies), []

    def generate(self, prompts: list[list[int]], spec: SamplingSpec):
        out = []
        for ids in prompts:
            self.contexts.append(list(ids))
            text = self.replies.pop(0)
            tokens = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            out.append([Completion(0, [], tokens, text, [-0.25] * len(tokens), "stop", policy_version=4)])
        return out


@pytest.fixture(scope="module")
def gateway():
    tok = build_tokenizer()
    gw = Gateway(tok, SamplingSpec(max_new_tokens=64, temperature=1.0), max_model_len=4096, tool_parser="hermes",
                 chat_template=TEMPLATE)
    gw.start()
    yield gw
    gw.stop()


def _client(gw, key):
    import openai

    return openai.OpenAI(base_url=gw.url, api_key=key, max_retries=0)


def test_a_tool_call_goes_out_as_tool_calls_and_comes_back_as_the_engines_tokens(gateway):
    gateway.engines = engines = ScriptedEngines(gateway.tokenizer, ["Let me compute. " + CALL, "5"])
    key = gateway.open_episode(seed=0)
    client = _client(gateway, key)
    messages = [{"role": "user", "content": "What is 2+3?"}]
    first = client.chat.completions.create(model="policy", messages=messages, tools=TOOLS)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me compute. "
    (call,) = choice.message.tool_calls
    assert call.function.name == "calc" and json.loads(call.function.arguments) == {"expr": "2+3"} and call.id
    # The engine saw the tools: the template wrote them into the prompt.
    assert "<tools>" in gateway.episodes[key].seen and '"name": "calc"' in gateway.episodes[key].seen

    # Sent back as the client returns it (content, tool_calls), then the tool's result.
    messages += [choice.message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id, "content": "5"}]
    second = client.chat.completions.create(model="policy", messages=messages, tools=TOOLS)
    assert second.choices[0].finish_reason == "stop" and second.choices[0].message.content == "5"
    assert not second.choices[0].message.tool_calls

    ep = gateway.close_episode(key)
    replies = [gateway.tokenizer(t, add_special_tokens=False)["input_ids"] + [gateway.tokenizer.eos_token_id]
               for t in ("Let me compute. " + CALL, "5")]
    added = len(ep.token_ids) - len(replies[0]) - len(replies[1])
    # The first reply's own ids, then the tool response (masked), then the second reply; the second call's
    # context is exactly the episode so far.
    assert ep.token_ids[:len(replies[0])] == replies[0] and ep.token_ids[-len(replies[1]):] == replies[1]
    assert ep.loss_mask == [1] * len(replies[0]) + [0] * added + [1] * len(replies[1]) and added == ep.added_tokens > 0
    assert engines.contexts[1] == ep.prompt_ids + ep.token_ids[:-len(replies[1])]
    assert "<tool_response>\n5\n</tool_response>" in ep.seen and not ep.rejected


def test_a_streamed_tool_call_arrives_as_a_tool_call_delta(gateway):
    gateway.engines = ScriptedEngines(gateway.tokenizer, [CALL])
    client = _client(gateway, gateway.open_episode(seed=0))
    chunks = list(client.chat.completions.create(model="policy", messages=[{"role": "user", "content": "2+3?"}],
                                                 tools=TOOLS, stream=True))
    (call,) = chunks[0].choices[0].delta.tool_calls
    assert call.index == 0 and call.function.name == "calc" and json.loads(call.function.arguments) == {"expr": "2+3"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_reply_without_a_call_or_with_tool_choice_none_is_plain_content(gateway):
    gateway.engines = ScriptedEngines(gateway.tokenizer, ["5", CALL])
    client = _client(gateway, gateway.open_episode(seed=0))
    plain = client.chat.completions.create(model="policy", messages=[{"role": "user", "content": "2+3?"}], tools=TOOLS)
    assert plain.choices[0].message.content == "5" and plain.choices[0].finish_reason == "stop"
    client = _client(gateway, gateway.open_episode(seed=1))
    unread = client.chat.completions.create(model="policy", messages=[{"role": "user", "content": "2+3?"}], tools=TOOLS,
                                            tool_choice="none")
    assert unread.choices[0].message.content == CALL and not unread.choices[0].message.tool_calls


def test_a_forced_call_is_the_call_opening_then_the_models_own_tokens(gateway):
    """tool_choice named, then "required": the reply starts with the parser's call opening, written after the prompt
    as text the agent might add (in the prompt, or masked out of the loss); the engine samples only the rest. The
    agent sees the whole call; sent back, it is the opening and the reply's text, so the conversation extends."""
    named_rest, any_rest = ' {"expr": "2+3"}}\n</tool_call>', ' "calc", "arguments": {"expr": "5*4"}}\n</tool_call>'
    gateway.engines = engines = ScriptedEngines(gateway.tokenizer, [named_rest, any_rest])
    key = gateway.open_episode(seed=0)
    client = _client(gateway, key)
    messages = [{"role": "user", "content": "What is 2+3, then 5*4?"}]
    first = client.chat.completions.create(model="policy", messages=messages, tools=TOOLS,
                                           tool_choice={"type": "function", "function": {"name": "calc"}})
    (call,) = first.choices[0].message.tool_calls
    assert first.choices[0].finish_reason == "tool_calls" and call.function.name == "calc"
    assert json.loads(call.function.arguments) == {"expr": "2+3"}
    ep = gateway.episodes[key]
    assert ep.seen.endswith('<|im_start|>assistant\n<tool_call>\n{"name": "calc", "arguments":' + named_rest)
    assert engines.contexts[0] == ep.prompt_ids  # the opening is part of the prompt the engine continued

    messages += [first.choices[0].message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id, "content": "5"}]
    second = client.chat.completions.create(model="policy", messages=messages, tools=TOOLS, tool_choice="required")
    (call,) = second.choices[0].message.tool_calls
    assert call.function.name == "calc" and json.loads(call.function.arguments) == {"expr": "5*4"}

    ep = gateway.close_episode(key)
    replies = [gateway.tokenizer(t, add_special_tokens=False)["input_ids"] + [gateway.tokenizer.eos_token_id]
               for t in (named_rest, any_rest)]
    added = len(ep.token_ids) - len(replies[0]) - len(replies[1])
    assert ep.loss_mask == [1] * len(replies[0]) + [0] * added + [1] * len(replies[1]) and not ep.rejected
    assert engines.contexts[1] == ep.prompt_ids + ep.token_ids[:-len(replies[1])]
    assert ep.seen.endswith('</tool_response><|im_end|>\n<|im_start|>assistant\n<tool_call>\n{"name":' + any_rest)


@pytest.mark.parametrize("rest, replies, rewarded", [
    (' {"expression": "2+3"}}\n</tool_call>', ["#### 5"], True),   # a call the calculator evaluates, then the answer
    (' {"expr": "2+3"}}\n</tool_call>', ["#### 5"], False),        # a call it cannot: the wrong argument
    (' {"expression": 2+', [], False),                             # no call: malformed, so it is the final answer
])
def test_the_example_agent_rewards_only_a_call_the_calculator_evaluates(gateway, rest, replies, rewarded):
    from rewards.registry import load_plugin

    examples = Path(__file__).parents[2] / "docs/guide/examples/chat_tools_agent.py"
    agent = load_plugin(f"{examples}:run_episode_rewarding_calls", "agent function")
    bonus = load_plugin(f"{examples}:VALID_CALL_BONUS", "bonus")
    gateway.engines = engines = ScriptedEngines(gateway.tokenizer, [rest, *replies])
    key = gateway.open_episode(seed=0)
    assert agent(_client(gateway, key), "What is 2+3?") == (bonus if rewarded else 0.0) and bonus > 0
    assert len(engines.contexts) == 1 + len(replies) and not engines.replies  # the call, then the answer after the tool
    gateway.close_episode(key)


@pytest.mark.parametrize("expression, rewarded", [("2+3", True), ("2*3", False)])
def test_the_useful_call_agent_rewards_only_a_call_that_computes_the_answer(gateway, expression, rewarded):
    """Both calls are valid; only the one whose result is the gold answer earns the bonus."""
    from rewards.registry import load_plugin

    examples = Path(__file__).parents[2] / "docs/guide/examples/chat_tools_agent.py"
    agent = load_plugin(f"{examples}:run_episode_rewarding_useful_calls", "agent function")
    bonus = load_plugin(f"{examples}:VALID_CALL_BONUS", "bonus")
    gateway.engines = ScriptedEngines(gateway.tokenizer, [f' {{"expression": "{expression}"}}}}\n</tool_call>', "#### 5"])
    key = gateway.open_episode(seed=0)
    assert agent(_client(gateway, key), "What is 2+3?", answer="5") == (bonus if rewarded else 0.0)
    gateway.close_episode(key)


@pytest.mark.parametrize("parser, rest", [("hermes", ' "calc", "arguments": {"expr": "2+3"}}\n</tool_call>'),
                                          ("pythonic", "calc(expr='2+3')]")])
def test_each_known_call_opening_is_read_back_by_its_vllm_parser(parser, rest):
    """Every parser with a call opening reads the forced call back (vLLM's own parsers), named or not."""
    from rl.openai_api import CALL_OPENINGS, forced_call_opening, load_tool_parser, read_tool_calls

    assert parser in CALL_OPENINGS
    named_rest = rest.split('"arguments":', 1)[1] if parser == "hermes" else rest.split("(", 1)[1]
    tool_parser = load_tool_parser(parser, build_tokenizer())
    for choice, text in (("required", rest), ({"type": "function", "function": {"name": "calc"}}, named_rest)):
        body = {"tools": TOOLS, "tool_choice": choice}
        _, (call,) = read_tool_calls(tool_parser, forced_call_opening(body, parser) + text, body)
        assert call["function"]["name"] == "calc" and json.loads(call["function"]["arguments"]) == {"expr": "2+3"}


def test_a_malformed_call_comes_back_as_text_and_keeps_the_terminal_quiet():
    """vLLM's parser logs a traceback for every reply whose call does not parse; on a run that is the model's
    output (a forced call at temperature 1 often is malformed), so it must not reach the terminal."""
    import logging

    from rl.openai_api import load_tool_parser, read_tool_calls

    parser = load_tool_parser("hermes", build_tokenizer())
    assert logging.getLogger(type(parser).__module__).getEffectiveLevel() > logging.ERROR
    text = '<tool_call>\n{"name": "calc", "arguments": {"expr": "2+3"}\n</tool_call>'  # one brace short
    assert read_tool_calls(parser, text, {"tools": TOOLS}) == (text, [])


def test_a_parser_without_a_known_opening_cannot_force_a_call():
    from rl.openai_api import forced_call_opening

    with pytest.raises(ValueError, match="known for hermes, pythonic, not for agent.tool_parser 'mistral'"):
        forced_call_opening({"tools": TOOLS, "tool_choice": "required"}, "mistral")


@pytest.mark.parametrize("setup, body, message", [
    ({"tool_parser": None, "chat_template": TEMPLATE}, {"tools": TOOLS}, "no agent.tool_parser"),
    ({"tool_parser": "hermes", "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}, {"tools": TOOLS},
     "the chat template ignores `tools`"),
    ({"tool_parser": "hermes", "chat_template": TEMPLATE}, {"tool_choice": "required"}, "offers no tools"),
    ({"tool_parser": "hermes", "chat_template": TEMPLATE},
     {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "search"}}}, "not one of this request's tools"),
    ({"tool_parser": "hermes", "chat_template": TEMPLATE}, {"tools": TOOLS, "tool_choice": "any"}, "one of 'auto', 'none'"),
    ({"tool_parser": "hermes", "chat_template": TEMPLATE}, {"tools": [{"type": "function", "name": "calc"}]}, "malformed tools"),
    ({"tool_parser": None, "chat_template": "{{ raise_exception('roles must alternate') }}"}, {}, "TemplateError: roles must alternate"),
])
def test_chat_requests_the_run_cannot_serve_are_refused_before_any_engine_call(setup, body, message):
    """Refused while the request's text is written (over HTTP that is a 400 that fails the episode, as every
    refusal: tests/unit/test_gateway_tokens.py)."""
    from rl.gateway import BadRequest, EpisodeTokens

    gw = Gateway(build_tokenizer(), SamplingSpec(), max_model_len=4096, **setup)  # no engine: none may be called
    with pytest.raises(BadRequest, match=message):
        gw._chat_text({"messages": [{"role": "user", "content": "2+3?"}], **body}, EpisodeTokens(seed=0))


def test_an_unknown_tool_parser_names_the_known_ones():
    with pytest.raises(ValueError, match="is not one of vLLM's tool parsers: .*hermes"):
        Gateway(build_tokenizer(), SamplingSpec(), max_model_len=64, tool_parser="hermez")


def _recipe_agent_and_reward(recipe_name: str):
    """The agent function and the reward (scoring the last reply) that a recipe trains with, resolved from the recipe."""
    from rewards import get_reward
    from rewards.registry import load_plugin
    from rl.config import load_recipe

    root = Path(__file__).parents[2]
    recipe = load_recipe(str(root / "recipes" / recipe_name), [], check_paths=False)
    (reward,) = recipe.rewards.functions
    return load_plugin(f"{root}/{recipe.agent.fn}", "agent function"), get_reward(reward.fn)


def _reply_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


@pytest.mark.parametrize("final, reward", [("36", 1.0), ("35", 0.0)])
def test_the_completions_calculator_agent_appends_the_computed_result_and_its_last_reply_is_scored(gateway, final, reward):
    """docs/guide/examples/calculator_agent.py over /v1/completions: a reply "12*3=" is a call, the agent appends
    what the calculator computed (" 36 ") and asks again; the recipe's reward scores the reply after it."""
    agent, score = _recipe_agent_and_reward("agent-calculator-arithmetic.yaml")
    gateway.engines = engines = ScriptedEngines(gateway.tokenizer, ["12*3=", final])
    key = gateway.open_episode(seed=0)
    assert agent(_client(gateway, key), "12*3=", answer="36") is None  # no bonus: the recipe's reward alone decides
    ep = gateway.close_episode(key)

    assert ep.seen == "12*3=" + "12*3=" + " 36 " + final and not engines.replies
    tok = gateway.tokenizer
    assert engines.contexts[1] == tok("12*3=12*3=", add_special_tokens=False)["input_ids"] + [tok.eos_token_id] + tok(" 36 ")["input_ids"]
    assert ep.loss_mask == [1] * len(_reply_ids(tok, "12*3=")) + [0] * len(" 36 ") + [1] * len(_reply_ids(tok, final))
    assert score(["12*3="], [ep.last_text], answer=["36"]) == [reward]


@pytest.mark.parametrize("final, reward", [("#### 36", 1.0), ("#### 35", 0.0)])
def test_the_chat_calculator_agent_answers_a_call_with_the_computed_result_and_its_last_reply_is_scored(gateway, final, reward):
    """docs/guide/examples/chat_calculator_agent.py over /v1/chat/completions: a reply "CALC 12*3" is a call,
    answered in the next user message with what the calculator computed; the recipe's reward scores the final reply."""
    agent, score = _recipe_agent_and_reward("smollm2-agent-calculator.yaml")
    gateway.engines = engines = ScriptedEngines(gateway.tokenizer, ["CALC 12*3", final])
    key = gateway.open_episode(seed=0)
    assert agent(_client(gateway, key), "What is 12*3?", answer="36") is None
    ep = gateway.close_episode(key)

    assert len(engines.contexts) == 2 and not engines.replies
    result_turn = "<|im_start|>user\nResult: 36<|im_end|>\n<|im_start|>assistant\n"
    assert ep.seen.endswith("CALC 12*3<|im_end|>\n" + result_turn + final)
    tok = gateway.tokenizer
    first, last = _reply_ids(tok, "CALC 12*3"), _reply_ids(tok, final)
    assert ep.loss_mask == [1] * len(first) + [0] * (len(ep.token_ids) - len(first) - len(last)) + [1] * len(last)
    assert score(["What is 12*3?"], [ep.last_text], answer=["36"]) == [reward]
