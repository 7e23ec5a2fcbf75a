"""A chat agent that offers a calculator through the OpenAI tools API (``tools=``, ``message.tool_calls``).

Each rollout is one call of ``run_episode`` with an ``openai.OpenAI`` client served by the run's engines
(``recipes/smollm2-agent-tools.yaml``, which sets ``agent.tool_parser`` and, for SmolLM2, ``agent.chat_template``).
A reply with a tool call is answered with a ``tool`` message; a reply without one is the final answer, which the
recipe's reward scores. The loop is the one any OpenAI-API agent runs; nothing in it knows about training.
``run_episode_calling_first`` forces the first reply to be a calculator call (``tool_choice``), for a model that
would not call on its own.
"""

import json

from rewards.environments import evaluate_arithmetic

SYSTEM = "Give the final answer after '####'."
CALCULATOR = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression of integers with + - * and parentheses.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string", "description": "e.g. 12+34"}},
                   "required": ["expression"]}}}


def calculator(arguments: str) -> str:
    try:
        return str(evaluate_arithmetic(str(json.loads(arguments)["expression"])))
    except (ValueError, KeyError, TypeError):
        return "error: expected {\"expression\": \"<integers with + - * and parentheses>\"}"


def run_episode(client, prompt, max_calls=2, first_tool_choice="auto", **columns):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
    for turn in range(max_calls + 1):
        message = client.chat.completions.create(model="policy", messages=messages, tools=[CALCULATOR], max_tokens=48,
                                                 tool_choice=first_tool_choice if turn == 0 else "auto").choices[0].message
        if not message.tool_calls:
            return None  # the final answer: the recipe's rewards score it
        messages.append(message.model_dump(exclude_none=True))
        messages += [{"role": "tool", "tool_call_id": call.id, "content": calculator(call.function.arguments)}
                     for call in message.tool_calls]
    return None


def run_episode_calling_first(client, prompt, **columns):
    return run_episode(client, prompt, first_tool_choice={"type": "function", "function": {"name": "calculator"}}, **columns)
