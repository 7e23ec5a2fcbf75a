"""A chat agent that offers a calculator through the OpenAI tools API (``tools=``, ``message.tool_calls``).

Each rollout is one call of ``run_episode`` with an ``openai.OpenAI`` client served by the run's engines
(``recipes/smollm2-agent-tools.yaml``, which sets ``agent.tool_parser`` and, for SmolLM2, ``agent.chat_template``).
A reply with a tool call is answered with a ``tool`` message; a reply without one is the final answer, which the
recipe's reward scores. The loop is the one any OpenAI-API agent runs; nothing in it knows about training.
``run_episode_calling_first`` forces the first reply to be a calculator call (``tool_choice``), for a model that
would not call on its own; ``run_episode_rewarding_calls`` does too and returns ``VALID_CALL_BONUS`` (added to the
recipe's rewards) when the episode made a call the calculator could evaluate, so that learning to answer does
not mean learning to leave the tool. ``run_episode_rewarding_useful_calls`` pays the same bonus only when a call
computed the row's gold ``answer``: a call that is valid but computes something else earns nothing.
"""

import json

from rewards.environments import evaluate_arithmetic

SYSTEM = "Give the final answer after '####'."
CALCULATOR = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression of integers with + - * and parentheses.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string", "description": "e.g. 12+34"}},
                   "required": ["expression"]}}}


FORCE_CALCULATOR = {"type": "function", "function": {"name": "calculator"}}
VALID_CALL_BONUS = 0.5  # below a correct answer's 1: a valid call with a wrong answer scores less than a right answer
CALCULATOR_ERROR = "error: expected {\"expression\": \"<integers with + - * and parentheses>\"}"


def calculator(arguments: str) -> str:
    try:
        return str(evaluate_arithmetic(str(json.loads(arguments)["expression"])))
    except (ValueError, KeyError, TypeError):
        return CALCULATOR_ERROR


def tool_episode(client, prompt, max_calls=2, first_tool_choice="auto") -> list[str]:
    """The tool loop; returns what the calculator computed for the calls it could evaluate. The last reply
    (the one without a call) is the final answer, which the recipe's rewards score."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
    computed = []
    for turn in range(max_calls + 1):
        message = client.chat.completions.create(model="policy", messages=messages, tools=[CALCULATOR], max_tokens=48,
                                                 tool_choice=first_tool_choice if turn == 0 else "auto").choices[0].message
        if not message.tool_calls:
            break
        messages.append(message.model_dump(exclude_none=True))
        for call in message.tool_calls:
            result = calculator(call.function.arguments) if call.function.name == "calculator" else f"error: no tool {call.function.name!r}"
            if not result.startswith("error"):
                computed.append(result)
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    return computed


def run_episode(client, prompt, **columns):
    tool_episode(client, prompt)


def run_episode_calling_first(client, prompt, **columns):
    tool_episode(client, prompt, first_tool_choice=FORCE_CALCULATOR)


def run_episode_rewarding_calls(client, prompt, **columns):
    return VALID_CALL_BONUS if tool_episode(client, prompt, first_tool_choice=FORCE_CALCULATOR) else 0.0


def run_episode_rewarding_useful_calls(client, prompt, answer, **columns):
    computed = tool_episode(client, prompt, first_tool_choice=FORCE_CALCULATOR)
    return VALID_CALL_BONUS if str(answer).strip() in computed else 0.0
