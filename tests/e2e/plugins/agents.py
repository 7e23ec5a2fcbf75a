"""Agents for the gateway's e2e test: one that makes two calls with text of its own between them, and ones that
fail in each way an agent can. ``behaviour(prompt)`` picks one from the prompt, so a test can choose prompts."""

import time

BEHAVIOURS = ("two_calls", "raises", "hangs", "other_temperature", "edits_history", "two_calls")
ADDED = " = "  # what the agent writes between its two calls


def behaviour(prompt: str) -> str:
    return BEHAVIOURS[sum(map(ord, prompt)) % len(BEHAVIOURS)]


def run_episode(client, prompt, **columns):
    kind = behaviour(prompt)
    if kind == "raises":
        raise RuntimeError("a bug in the agent")
    if kind == "hangs":
        time.sleep(60)
    if kind == "other_temperature":
        client.completions.create(model="policy", prompt=prompt, max_tokens=6, temperature=0.3)
    first = client.completions.create(model="policy", prompt=prompt, max_tokens=6).choices[0].text
    history = prompt + first if kind != "edits_history" else prompt + "0" + first
    client.completions.create(model="policy", prompt=history + ADDED, max_tokens=6)
    return 0.5  # the agent's own reward, added to the recipe's
