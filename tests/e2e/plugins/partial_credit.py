"""A reward with partial credit for the e2e tests: the tiny test model rarely gets a whole sum right
(about 2% of samples), but it gets digits right often enough for GRPO to have a signal."""


def digit_match(prompts, completions, answer, **columns):
    """Share of the answer's digits the completion has at the same place (0..1), left-aligned."""
    scores = []
    for completion, gold in zip(completions, answer):
        got = completion.strip()
        scores.append(sum(a == b for a, b in zip(got, gold)) / max(len(gold), len(got), 1))
    return scores
