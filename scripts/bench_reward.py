"""A reward for benchmarks on a random model: a stable pseudo-random score per completion, so
every group has variance and every step trains (the reward itself costs nothing)."""

import hashlib


def pseudo_random(prompts, completions, **columns):
    """>>> pseudo_random(["p"], ["a", "a"]) == pseudo_random(["q"], ["a", "a"])
    True
    """
    return [int(hashlib.sha1(c.encode()).hexdigest()[:6], 16) / 0xFFFFFF for c in completions]
