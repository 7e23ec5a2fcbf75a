"""An agent written against the OpenAI API, trained as the policy's rollouts (``agent.fn``).

The run calls ``run_episode`` once per rollout with an ``openai.OpenAI`` client served by its own engines. This
one gives the embedded arithmetic model a calculator: a reply that is an expression ending in ``=`` (``"12+34="``)
is a tool call; the agent appends the reply and the tool's answer to the prompt and asks again. The recipe's
reward (``arithmetic_exact``) scores the last reply; what the agent appended is masked out of the loss.
"""

import re

from rewards.environments import evaluate_arithmetic

CALL = re.compile(r"^\s*([0-9+\-* ()]+)=\s*$")


def run_episode(client, prompt, max_calls=1, **columns):
    text = prompt
    for _ in range(max_calls + 1):
        reply = client.completions.create(model="policy", prompt=text, max_tokens=8).choices[0].text
        call = CALL.match(reply)
        if call is None:
            return None  # the final answer: the recipe's rewards score it
        try:
            result = str(evaluate_arithmetic(call.group(1)))
        except ValueError:
            result = "-"
        text += f"{reply} {result} "  # the tool's answer; the model speaks again after it
    return None
