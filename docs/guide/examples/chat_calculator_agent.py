"""A chat agent with a calculator, written against the OpenAI chat API (``agent.fn``), for a chat model.

Each rollout is one call of ``run_episode`` with an ``openai.OpenAI`` client served by the run's engines
(``recipes/smollm2-agent-calculator.yaml``). The system message offers a calculator: a reply ``CALC <expression>``
is a tool call, answered in the next user message; any other reply is the final answer, which the recipe's reward
scores. The gateway renders each request through the model's chat template and keeps the engine's own token ids:
the replies are trained, the system, user and tool messages are masked out of the loss.
"""

import re

from rewards.environments import evaluate_arithmetic

SYSTEM = ("You can use a calculator. To use it, reply with only CALC followed by an expression, for example "
          "CALC 12+34, and the result comes back in the next message. Give the final answer after '####'.")
CALL = re.compile(r"^\s*CALC\s*:?\s*([0-9+\-* ()]+?)\s*=?\s*$")


def run_episode(client, prompt, max_calls=1, **columns):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
    for _ in range(max_calls + 1):
        reply = client.chat.completions.create(model="policy", messages=messages, max_tokens=48).choices[0].message.content
        call = CALL.match(reply or "")
        if call is None:
            return None  # the final answer: the recipe's rewards score it
        try:
            result = str(evaluate_arithmetic(call.group(1)))
        except ValueError:
            result = "not an expression of + - * on integers"
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": f"Result: {result}"}]
    return None
