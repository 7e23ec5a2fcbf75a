"""An adapter as the policy through the real stack: a new LoRA, library write-back, a merged
policy from library experts. Only adapter weights travel to vLLM."""

from __future__ import annotations

import json

import pytest

from rl.config import load_recipe
from rl.types import TrainBatch

pytestmark = pytest.mark.e2e
LOGPROB_TOL = 1e-4


def _subtask_file(tiny_model_root, tmp_path, name, keep):
    rows = [json.loads(l) for l in (tiny_model_root / "data" / "train.jsonl").read_text().splitlines()]
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows if keep(int(r["prompt"].split("+")[0]))))
    return path


def _recipe(tiny_model_root, run_dir, train, *extra):
    return load_recipe(None, [
        f"model.path={tiny_model_root / 'model'}", f"data.train={train}",
        f"data.test={tiny_model_root / 'data' / 'test.jsonl'}",
        "data.prompts_per_step=16", "algorithm.group_size=4", "data.max_test_examples=16",
        "rollout.max_new_tokens=6", "rollout.max_model_len=64", "trainer.lr=5e-3", "trainer.micro_batch_size=64",
        "rewards.functions=[{fn: arithmetic_exact}, {fn: length_penalty}]",
        "logging.progress=false", "eval.before=false", f"output_dir={run_dir}", *extra,
    ])


def test_lora_policy_syncs_only_the_adapter_and_writes_back(tiny_model_root, ray_session, tmp_path):
    from transformers import AutoModelForCausalLM

    from rl.driver import Trainer

    lib = tmp_path / "library"
    low = _subtask_file(tiny_model_root, tmp_path, "low", lambda a: a < 50)
    t = Trainer(_recipe(tiny_model_root, tmp_path / "a", low, "steps=3", "adapter.mode=lora", "adapter.rank=8",
                        f"adapter.library={lib}", "adapter.save_as=adder-low", "algorithm.kl_coef=0.1"))
    t.start_workers()
    try:
        metrics = [t.train_one_step() for _ in range(3)]
        # vLLM serves base + LoRA; its logprobs of fixed completions equal the trainer's (base + adapter).
        prompts = t.test_set.prompt_token_ids[:4]
        tok = t.tokenizer
        completions = [tok(r["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in t.test_set.rows[:4]]
        vllm_lp = t.rollout.score(prompts, completions)
        trainer_lp = t.trainer.compute_logprobs(TrainBatch(prompts, completions, [0.0] * 4, [[] for _ in prompts], 4, 0))
        assert max(abs(a - b) for ra, rb in zip(vllm_lp, trainer_lp) for a, b in zip(ra, rb)) < LOGPROB_TOL
    finally:
        t.stop_workers()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_root / "model")
    full_bytes = sum(p.numel() * 4 for p in base.parameters())
    # LoRA rank 8 on the 7 projections of each layer: r * (in + out) parameters per projection.
    cfg = base.config
    h, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    lora_params = L * 8 * (4 * (h + h) + 2 * (h + i) + (i + h))
    for m in metrics:
        assert m["weight_sync_bytes"] == 4 * lora_params < full_bytes / 4
    assert metrics[-1]["kl"] > 0  # reference = the base with the adapter disabled; the adapter moved away
    # With KL on, the trainer holds the base once plus the adapter: no second model copy.
    assert metrics[-1]["params_in_memory"] == sum(p.numel() for p in base.parameters()) + lora_params

    # Write-back happens at the end of fit(); run a short fit to the library.
    summary = Trainer(_recipe(tiny_model_root, tmp_path / "b", low, "steps=2", "adapter.mode=lora",
                              f"adapter.library={lib}", "adapter.save_as=adder-low2")).fit()
    from adapters import AdapterLibrary

    expert = AdapterLibrary(lib).get("adder-low2")
    assert expert.meta["steps"] == 2 and expert.meta["parents"] == []
    assert "accuracy_after" in expert.meta["metrics"] and "yaml" in expert.meta["recipe"]
    assert summary["library_expert"] == str(expert.path)


def test_merged_library_policy(tiny_model_root, ray_session, tmp_path):
    from adapters import AdapterLibrary
    from rl.driver import Trainer

    lib = tmp_path / "library"
    for name, keep in (("adder-low", lambda a: a < 50), ("adder-high", lambda a: a >= 50)):
        data = _subtask_file(tiny_model_root, tmp_path, name, keep)
        Trainer(_recipe(tiny_model_root, tmp_path / name, data, "steps=2", "adapter.mode=lora", "eval.after=false",
                        f"adapter.library={lib}", f"adapter.save_as={name}")).fit()
    summary = Trainer(_recipe(tiny_model_root, tmp_path / "merged", tiny_model_root / "data" / "train.jsonl", "steps=2",
                              "adapter.mode=merge", "adapter.experts=[adder-low, adder-high]", "adapter.rank=8",
                              f"adapter.library={lib}", "adapter.save_as=adder-merged")).fit()
    library = AdapterLibrary(lib)
    merged = library.get("adder-merged")
    assert merged.meta["parents"] == ["adder-low", "adder-high"]
    assert summary["steps"] == 2
    names = library.names()
    assert any(n.startswith("run-merge-") for n in names), names  # the merge it started from, with its parents


def test_adapter_for_another_base_model_is_refused(tiny_model_root, tmp_path):
    from rl.config import RecipeError
    from rl.driver import Trainer

    with pytest.raises(RecipeError, match="adapter"):
        Trainer(_recipe(tiny_model_root, tmp_path / "x", tiny_model_root / "data" / "train.jsonl", "adapter.mode=continue",
                        f"adapter.library={tmp_path / 'missing-library'}", "adapter.experts=[nope]"))
