"""The gateway's per-episode token bookkeeping (rl.gateway.EpisodeTokens): the engine's ids are kept, only what
the agent adds is tokenized (and masked), a changed history is refused, and a chat template's re-written
end-of-turn token is not added twice."""

from __future__ import annotations

import pytest

from rl.gateway import BadRequest, EpisodeTokens
from rl.tasks.tiny_model import build_tokenizer
from rollout.types import Completion


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _reply(tok, text: str, eos: bool = True, version: int = 3) -> Completion:
    ids = tok(text, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if eos else [])
    return Completion(0, [], ids, text, [-0.5] * len(ids), "stop" if eos else "length", policy_version=version)


def test_two_calls_keep_the_engines_ids_and_mask_what_the_agent_added(tok):
    ep = EpisodeTokens(seed=0)
    ids = ep.context("12+34=", tok)
    assert ids == tok("12+34=", add_special_tokens=False)["input_ids"] == ep.prompt_ids
    first = _reply(tok, "46")
    ep.record(first, special_text=tok.eos_token)
    ids = ep.context("12+34=46 = ", tok)  # the agent appends " = " after the reply it was shown
    added = tok(" = ", add_special_tokens=False)["input_ids"]
    # The engine's reply (with its EOS, which the agent never saw) stays; only " = " is new.
    assert ids == ep.prompt_ids + first.token_ids + added
    second = _reply(tok, "46", eos=False, version=2)
    ep.record(second, special_text="")
    assert ep.token_ids == first.token_ids + added + second.token_ids
    assert ep.loss_mask == [1] * len(first.token_ids) + [0] * len(added) + [1] * len(second.token_ids)
    assert ep.logprobs == first.logprobs + [0.0] * len(added) + second.logprobs
    assert (ep.calls, ep.added_tokens, ep.policy_version, ep.finish_reason, ep.last_text) == (2, len(added), 2, "length", "46")


def test_a_changed_history_is_refused_with_where_it_differs(tok):
    ep = EpisodeTokens(seed=0)
    ep.context("12+34=", tok)
    ep.record(_reply(tok, "46"), special_text=tok.eos_token)
    with pytest.raises(BadRequest, match="differs from what this episode sampled at character 7"):
        ep.context("12+34=47 = ", tok)
    with pytest.raises(BadRequest, match="at character 2"):
        ep.context("12", tok)  # shorter than what was shown


def test_a_rewritten_end_of_turn_token_is_not_added_twice(tok):
    """A chat template writes the end-of-turn token after the assistant's content; the engine already emitted it."""
    ep = EpisodeTokens(seed=0)
    ep.context("Q:", tok)
    reply = _reply(tok, "4")
    ep.record(reply, special_text=tok.eos_token)
    ids = ep.context("Q:4" + tok.eos_token + "1+1=", tok)
    assert ids == ep.prompt_ids + reply.token_ids + tok("1+1=", add_special_tokens=False)["input_ids"]
