"""After every weight push, vLLM serves exactly what the trainer holds: checked on a model with the two
features the default tiny model lacks and most small instruct models have, an LM head tied to the
embedding and grouped-query attention.

The gaps these tests guard against were all silent: the run trains on, only the importance ratios
are wrong.
- A tied LM head: the CPU engine kept the head it packed at start while the embedding moved
  (vLLM-vs-trainer gap 0.29 after one push at this learning rate, 1.1 after four).
- The prefix cache: KV blocks computed with the old weights reused for a prompt sharing a prefix.
- The sampling temperature: vLLM samples from softmax(logits / T); the trainer scored with T = 1.
"""

from __future__ import annotations

import pytest

from rl.config import load_recipe
from rollout.types import SamplingSpec
from trainer.types import TrainBatch

pytestmark = pytest.mark.e2e

PUSHES = 10
MISMATCH_MEAN_TOL = 1e-5  # per step, fp32: the untied model's level (~1e-7 here)
LOGPROB_TOL = 1e-4  # any single token, fp32


def _recipe(root, run_dir, *extra):
    return load_recipe(None, [
        f"model.path={root / 'model'}", f"data.train={root / 'data' / 'train.jsonl'}",
        f"data.test={root / 'data' / 'test.jsonl'}",
        "data.prompts_per_step=16", "algorithm.group_size=4", "data.max_test_examples=16",
        "rollout.max_new_tokens=6", "rollout.max_model_len=64", "trainer.micro_batch_size=64",
        # a large step, so stale weights anywhere in the engine would show at once
        "trainer.lr=3e-3", "rewards.functions=[{fn: arithmetic_exact}, {fn: length_penalty}]",
        "logging.progress=false", "eval.before=false", "eval.after=false", f"output_dir={run_dir}", *extra,
    ])


def _gold_scores(run, n=4):
    """vLLM's logprobs of the gold answers of n held-out prompts (to see that the policy moved)."""
    tok = run.tokenizer
    completions = [tok(r["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in run.test_set.rows[:n]]
    return [x for row in run.rollout.score(run.test_set.prompt_token_ids[:n], completions) for x in row]


def _pushes_agree(run, pushes=PUSHES):
    """Train ``pushes`` steps; each step's sampled tokens were drawn from the previous push."""
    start = run._handle.version if run._handle else 0
    scores_before = _gold_scores(run)
    rows = [run.train_one_step() for _ in range(pushes)]
    assert max(abs(a - b) for a, b in zip(_gold_scores(run), scores_before)) > 1e-2, "the policy did not move"
    for i, m in enumerate(rows):
        assert m["logprob_mismatch"] <= MISMATCH_MEAN_TOL, (i, m["logprob_mismatch"])
        assert m["logprob_mismatch_max"] < LOGPROB_TOL, (i, m["logprob_mismatch_max"])
    assert rows[-1]["policy_version"] == start + pushes
    return rows


# The full policy's pushes on this model are the tempered run's (test_tempered_training_stays_on_policy_across_pushes),
# and at temperature 1 the real model's (tests/e2e/test_real_model.py, tied and grouped-query too).
@pytest.mark.parametrize("policy", [
    pytest.param(["adapter.kind=lora", "adapter.rank=8"], id="lora"),
    # the sparse adapter includes the LM head, which is the embedding: its deltas move both
    pytest.param(["adapter.kind=sparse", "adapter.keep_ratio=0.2", "trainer.lr=1e-3",
                  "adapter.target_modules=[lm_head, q_proj, v_proj, down_proj]"], id="sparse"),
])
def test_tied_gqa_model_matches_after_every_push(policy, tied_gqa_model_root, ray_session, tmp_path):
    from helpers import vllm_trainer_gap
    from rl.online import OnlineRun

    run = OnlineRun(_recipe(tied_gqa_model_root, tmp_path, f"steps={PUSHES}", *policy))
    run.start_workers()
    try:
        before = vllm_trainer_gap(run)
        _pushes_agree(run)
        # Scored (prompt logprobs) as well as sampled: the whole distribution, not only sampled tokens.
        assert vllm_trainer_gap(run) < LOGPROB_TOL
        assert before < LOGPROB_TOL
    finally:
        run.stop_workers()


@pytest.fixture(scope="module")
def tempered_run(tied_gqa_model_root, ray_session, tmp_path_factory):
    """Full policy sampled at temperature 0.7, with 32-token KV blocks (the CPU engine's smallest; its
    default is 128) so that a 32-token shared prefix is served from the prefix cache."""
    from rl.online import OnlineRun

    run = OnlineRun(_recipe(tied_gqa_model_root, tmp_path_factory.mktemp("tempered"), "steps=20",
                            "rollout.temperature=0.7", "rollout.kv_block_size=32"))
    run.start_workers()
    yield run
    run.stop_workers()


def _sample(run, prompts, temperature, seed=7):
    groups = run.rollout.generate(prompts, SamplingSpec(n=2, max_new_tokens=6, temperature=temperature, seed=seed))
    return [c for g in groups for c in g]


def _trainer_logprobs(run, completions):
    n = len(completions)
    batch = TrainBatch([c.prompt_token_ids for c in completions], [c.token_ids for c in completions], [0.0] * n,
                       [[] for _ in completions], n, 0)
    return run.trainer.compute_logprobs(batch)


def _max_gap(completions, logprobs):
    return max(abs(a - b) for c, lp in zip(completions, logprobs) for a, b in zip(c.logprobs, lp))


def test_sampled_logprobs_are_of_the_tempered_distribution(tempered_run):
    """vLLM's logprobs of tokens sampled at T = 0.7 are log softmax(logits / 0.7), computed here with HF
    from the model files, independently of the trainer; and the trainer's are the same numbers."""
    import torch
    from transformers import AutoModelForCausalLM

    run = tempered_run
    completions = _sample(run, run.test_set.prompt_token_ids[:8], temperature=0.7)
    model = AutoModelForCausalLM.from_pretrained(run.paths.model, dtype=torch.float32).eval()
    tempered, raw = [], []
    with torch.no_grad():
        for c in completions:
            ids = torch.tensor([c.prompt_token_ids + c.token_ids])
            logits = model(ids).logits[0, len(c.prompt_token_ids) - 1 : -1]  # [L, V]: the positions predicting c
            picked = torch.tensor(c.token_ids)[:, None]
            tempered.append(torch.log_softmax(logits / 0.7, -1).gather(-1, picked).squeeze(-1).tolist())
            raw.append(torch.log_softmax(logits, -1).gather(-1, picked).squeeze(-1).tolist())
    assert _max_gap(completions, tempered) < LOGPROB_TOL
    assert _max_gap(completions, raw) > 1e-2  # T = 0.7 is not T = 1 here: the check above can fail
    assert _max_gap(completions, _trainer_logprobs(run, completions)) < LOGPROB_TOL


def test_shared_prefix_after_a_push_is_recomputed(tempered_run):
    from helpers import random_train_batch

    """Prompts sharing a 32-token prefix (one KV block) are sampled, the weights move, the
    same prompts are sampled again: the logprobs are the new weights', not a mix with the cached
    prefix of the old ones."""
    run = tempered_run
    prefix = run.tokenizer("9" * 32, add_special_tokens=False)["input_ids"]
    prompts = [prefix + p for p in run.test_set.prompt_token_ids[:8]]
    first = _sample(run, prompts, temperature=0.7)
    assert _max_gap(first, _trainer_logprobs(run, first)) < LOGPROB_TOL
    # An update on random advantages (a sampled batch may tie and not move the policy), then a push.
    run.trainer.train_step(random_train_batch(run.tokenizer, n=16), 64)
    run._publish()
    again = _sample(run, prompts, temperature=0.7)
    assert max(abs(a - b) for c, d in zip(first, again) for a, b in zip(c.logprobs, d.logprobs)) > 1e-2, "no update"
    assert _max_gap(again, _trainer_logprobs(run, again)) < LOGPROB_TOL


def test_tempered_training_stays_on_policy_across_pushes(tempered_run):
    _pushes_agree(tempered_run)


def test_memory_estimate_counts_a_tied_matrix_once(tied_gqa_model_root):
    from transformers import AutoModelForCausalLM

    from trainer.memory import count_parameters

    model = AutoModelForCausalLM.from_pretrained(tied_gqa_model_root / "model")
    assert model.config.tie_word_embeddings and model.config.num_key_value_heads < model.config.num_attention_heads
    assert count_parameters(str(tied_gqa_model_root / "model"))[0] == sum(p.numel() for p in model.parameters())
