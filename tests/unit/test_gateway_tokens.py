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


@pytest.mark.parametrize("body, message", [
    ({"n": 2}, "n must be 1"),
    ({"stop": ["\n"]}, "stop strings are not supported"),
    ({"temperature": 0.7}, "differs from the run's rollout.temperature 1.0"),
    ({"max_tokens": 4, "_long": True}, "pass rollout.max_model_len=16"),
])
def test_refused_requests_fail_their_episode_before_reaching_an_engine(tok, body, message):
    from rl.gateway import Gateway
    from rollout.types import SamplingSpec

    gw = Gateway(tok, SamplingSpec(max_new_tokens=8, temperature=1.0), max_model_len=16)  # not started: no engine is needed
    key = gw.open_episode(seed=0)
    text = "1+2=" * (4 if body.pop("_long", False) else 1)
    with pytest.raises(BadRequest, match=message) as refused:
        gw.complete(key, text, body)
    assert gw.close_episode(key).rejected == str(refused.value)  # the episode fails with that reason
    with pytest.raises(BadRequest, match="unknown or finished episode"):
        gw.complete(key, "1+2=", {})


def test_one_call_at_a_time_per_episode(tok):
    from rl.gateway import Gateway
    from rollout.types import SamplingSpec

    gw = Gateway(tok, SamplingSpec(), max_model_len=64)
    key = gw.open_episode(seed=0)
    gw.episodes[key].busy = True  # a call in flight
    with pytest.raises(BadRequest, match="one call at a time per episode"):
        gw.complete(key, "1+2=", {})
    assert gw.episodes[key].busy  # the call in flight keeps its claim


@pytest.mark.parametrize("kind", ["chat.completion", "text_completion"])
def test_a_streamed_reply_is_chunks_the_openai_client_reads(kind):
    """``stream_chunks`` of a whole response: chunks of the openai package's own types, whose text adds up to the
    reply, with the finish reason and usage on the last."""
    from openai.types import Completion as TextCompletion
    from openai.types.chat import ChatCompletionChunk

    from rl.openai_api import stream_chunks

    chat = kind == "chat.completion"
    choice = {"message": {"role": "assistant", "content": "46"}} if chat else {"text": "46"}
    response = {"id": "x-1", "object": kind, "created": 1, "model": "policy", "system_fingerprint": "policy-v2", "policy_version": 2,
                "choices": [{"index": 0, "finish_reason": "length", "logprobs": None, **choice}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}
    raw = stream_chunks(response)
    if chat:
        last = [ChatCompletionChunk.model_validate(c) for c in raw][-1]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in raw)
    else:  # a text chunk's finish reason stays null until the last, as in the API's own stream; the type does not
        # allow null (the client builds chunks without validating them), so only the last is validated
        last = TextCompletion.model_validate(raw[-1])
        text = "".join(c["choices"][0]["text"] for c in raw)
    assert text == "46" and [c["choices"][0]["finish_reason"] for c in raw] == [None, "length"]
    assert last.usage.total_tokens == 7 and {c["system_fingerprint"] for c in raw} == {"policy-v2"}
