"""An adapter as the policy through the real stack: a new LoRA, library write-back, a merged
policy from library experts. Only adapter weights travel to vLLM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rl.config import load_recipe
from helpers import vllm_trainer_gap

pytestmark = pytest.mark.e2e
LOGPROB_TOL = 1e-4
ROOT = Path(__file__).resolve().parents[2]


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

    from rl.online import OnlineRun as Trainer

    lib = tmp_path / "library"
    low = _subtask_file(tiny_model_root, tmp_path, "low", lambda a: a < 50)
    t = Trainer(_recipe(tiny_model_root, tmp_path / "a", low, "steps=3", "adapter.kind=lora", "adapter.rank=8",
                        f"adapter.library={lib}", "adapter.save_as=adder-low", "algorithm.kl_coef=0.1"))
    t.start_workers()
    try:
        metrics = [t.train_one_step() for _ in range(3)]
        # vLLM serves base + LoRA; its logprobs of fixed completions equal the trainer's (base + adapter).
        assert vllm_trainer_gap(t) < LOGPROB_TOL
        t.step = 3
        t.write_back_adapter(t.save_checkpoint(), {})  # what fit() does at a checkpoint (the end: test_merged_library_policy)
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
    from adapters import AdapterLibrary

    expert = AdapterLibrary(lib).get("adder-low")
    assert expert.adapter_type == "lora" and expert.rank == 8
    assert expert.meta["steps"] == 3 and expert.meta["parents"] == [] and "yaml" in expert.meta["recipe"]


def test_lora_policy_raises_the_reward(ray_session, tmp_path):
    """GRPO on a new LoRA over the embedded model (the quickstart's): held-out greedy accuracy on 256 prompts
    rises by at least 4 points in 12 steps."""
    from rl.online import OnlineRun as Trainer

    recipe = load_recipe(str(ROOT / "recipes" / "quickstart.yaml"), [
        "steps=12", "adapter.kind=lora", "adapter.rank=16", "adapter.alpha=32", "trainer.lr=2e-3",
        "trainer.warmup_steps=3", "data.max_test_examples=256", "eval.every=0", "logging.progress=false",
        "checkpoint.save_final=false", f"output_dir={tmp_path / 'run'}",
    ])
    summary = Trainer(recipe).fit()
    assert summary["accuracy_after"] >= summary["accuracy_before"] + 0.04, summary


@pytest.fixture(scope="module")
def subtask_library(tiny_model_root, ray_session, tmp_path_factory):
    """A library of two LoRA experts, each trained with GRPO on its own sub-task (small / large first operand)."""
    from rl.online import OnlineRun as Trainer

    tmp = tmp_path_factory.mktemp("subtasks")
    lib = tmp / "library"
    for name, keep in (("adder-low", lambda a: a < 50), ("adder-high", lambda a: a >= 50)):
        data = _subtask_file(tiny_model_root, tmp, name, keep)
        Trainer(_recipe(tiny_model_root, tmp / name, data, "steps=2", "adapter.kind=lora", "eval.after=false",
                        f"adapter.library={lib}", f"adapter.save_as={name}")).fit()
    return lib


def test_merged_library_policy(tiny_model_root, subtask_library, tmp_path):
    from adapters import AdapterLibrary
    from rl.online import OnlineRun as Trainer

    summary = Trainer(_recipe(tiny_model_root, tmp_path / "merged", tiny_model_root / "data" / "train.jsonl", "steps=2",
                              "adapter.kind=lora", "adapter.source=merge", "adapter.experts=[adder-low, adder-high]", "adapter.rank=8",
                              f"adapter.library={subtask_library}", "adapter.save_as=adder-merged")).fit()
    library = AdapterLibrary(subtask_library)
    merged = library.get("adder-merged")
    assert merged.meta["parents"] == ["adder-low", "adder-high"] and merged.meta["steps"] == 2
    assert summary["steps"] == 2 and summary["library_expert"] == str(merged.path)  # written back at the end of fit()
    assert merged.meta["metrics"]["accuracy_after"] == summary["accuracy_after"] and "yaml" in merged.meta["recipe"]
    # The merge it started from lives in the run's own directory, with its parents; the library it
    # read from holds only what was asked for (the experts and the write-back).
    assert sorted(library.names()) == ["adder-high", "adder-low", "adder-merged"]
    start = AdapterLibrary(tmp_path / "merged" / "start-adapter").get("start")
    assert start.meta["parents"] == ["adder-low", "adder-high"] and start.rank == 8


def _served_lora_bytes(base, rank):
    cfg = base.config
    h, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    return 4 * L * rank * (4 * (h + h) + 2 * (h + i) + (i + h))


@pytest.mark.parametrize("serving", ["batch", "prompt"])
def test_arrow_routed_policy(serving, tiny_model_root, subtask_library, tmp_path):
    """Arrow over the two experts with a new LoRA beside them. vLLM serves the routing averaged over
    the batch's (or each prompt's) prompt tokens as one LoRA of rank 2*8 + 8; the trainer routes per
    token; truncated IS covers the gap."""
    from transformers import AutoModelForCausalLM

    from adapters import AdapterLibrary
    from rl.online import OnlineRun as Trainer

    name = f"adder-arrow-{serving}"
    t = Trainer(_recipe(tiny_model_root, tmp_path / "arrow", tiny_model_root / "data" / "train.jsonl", "steps=3",
                        "adapter.kind=arrow", "adapter.experts=[adder-low, adder-high]", "adapter.top_k=1",
                        f"adapter.arrow_serving={serving}", "adapter.rank=8", f"adapter.library={subtask_library}",
                        f"adapter.save_as={name}", "algorithm.tis_cap=2.0", "algorithm.kl_coef=0.05"))
    summary = t.fit()
    rows = [json.loads(l) for l in (tmp_path / "arrow" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert len(train) == 3
    base = AutoModelForCausalLM.from_pretrained(tiny_model_root / "model")
    served = _served_lora_bytes(base, 2 * 8 + 8)
    lora = _served_lora_bytes(base, 8) // 4  # parameters of the new LoRA
    for m in train:
        # One LoRA per step, or one per distinct prompt of the step (16 here: one epoch has no repeats).
        assert m["weight_sync_bytes"] == served * (1 if serving == "batch" else 16)
        # Per-token top-1 routing vs one averaged LoRA: a real gap, not float noise, and bounded (measured 0.093-0.102
        # per step served per batch, 0.077-0.095 per prompt); a LoRA served wrong would be far outside.
        assert 1e-2 < m["logprob_mismatch"] < 0.25, m["logprob_mismatch"]
        # The trainer holds the base once, the frozen experts (2 LoRAs) and the new LoRA.
        assert m["params_in_memory"] == sum(p.numel() for p in base.parameters()) + 3 * lora
    expert = AdapterLibrary(subtask_library).get(name)
    assert expert.adapter_type == "lora" and expert.rank == 8
    assert expert.meta["parents"] == ["adder-low", "adder-high"]
    assert expert.meta["extra"]["arrow"] == {"experts": ["adder-low", "adder-high"], "top_k": 1, "temperature": 1.0, "trained": "new"}
    assert expert.meta["steps"] == 3 and summary["library_expert"] == str(expert.path)


def test_sparse_policy_syncs_only_indices_and_values(tiny_model_root, ray_session, tmp_path):
    """A sparse adapter (5% of the projections' entries, chosen by connection sensitivity): only its
    indices and values travel, the engines rebuild base + delta exactly."""
    from transformers import AutoModelForCausalLM

    from adapters import AdapterLibrary
    from rl.online import OnlineRun as Trainer

    lib = tmp_path / "library"
    t = Trainer(_recipe(tiny_model_root, tmp_path / "s", tiny_model_root / "data" / "train.jsonl", "steps=3",
                        "adapter.kind=sparse", "adapter.keep_ratio=0.05", "algorithm.kl_coef=0.1",
                        f"adapter.library={lib}", "adapter.save_as=adder-sparse", "trainer.lr=1e-3"))
    t.start_workers()
    try:
        metrics = [t.train_one_step() for _ in range(3)]
        assert vllm_trainer_gap(t) < LOGPROB_TOL  # base + delta rebuilt in vLLM: exact
        t.step = 3
        ck = t.save_checkpoint()
        t.write_back_adapter(ck, {})
    finally:
        t.stop_workers()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_root / "model")
    cfg = base.config
    h, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    entries = L * (4 * h * h + 3 * h * i)
    nnz = round(0.05 * entries)
    for m in metrics:
        assert m["weight_sync_bytes"] == nnz * (8 + 4)  # int64 index + fp32 value per trained entry
        assert m["logprob_mismatch"] < 1e-4
    assert metrics[-1]["kl"] > 0
    # Reference = the base with the deltas switched off: the trainer holds the base once plus nnz values.
    assert metrics[-1]["params_in_memory"] == sum(p.numel() for p in base.parameters()) + nnz
    expert = AdapterLibrary(lib).get("adder-sparse")
    assert expert.adapter_type == "sparse" and expert.meta["nnz"] == nnz
    masks, deltas = AdapterLibrary(lib).load_sparse("adder-sparse")
    assert sum(int(m.sum()) for m in masks.values()) == nnz
    assert any(float(d.abs().max()) > 0 for d in deltas.values())  # trained values, written back


def test_adapter_for_another_base_model_is_refused(tiny_model_root, tmp_path):
    from rl.config import RecipeError
    from rl.online import OnlineRun as Trainer

    with pytest.raises(RecipeError, match="adapter"):
        Trainer(_recipe(tiny_model_root, tmp_path / "x", tiny_model_root / "data" / "train.jsonl", "adapter.kind=lora",
                        "adapter.source=continue",
                        f"adapter.library={tmp_path / 'missing-library'}", "adapter.experts=[nope]"))


@pytest.mark.parametrize("mode", ["sparse", "arrow"])
def test_adapter_policy_resumes_exactly(mode, tiny_model_root, subtask_library, cut_and_resume):
    """Resumed from the step-2 checkpoint of an uninterrupted run: steps 3-4 reproduce its rewards and losses."""
    extra = {"sparse": ["adapter.kind=sparse", "trainer.lr=1e-3"],
             "arrow": ["adapter.kind=arrow", "adapter.experts=[adder-low, adder-high]", f"adapter.library={subtask_library}",
                       "algorithm.tis_cap=2.0"]}[mode]

    def recipe(run_dir, *more):
        return _recipe(tiny_model_root, run_dir, tiny_model_root / "data" / "train.jsonl", "steps=4", "checkpoint.every=2",
                       "eval.after=false", "algorithm.kl_coef=0.05", *extra, *more)

    ref, resumed = cut_and_resume(recipe, cut=2)
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step]["reward_mean"] == pytest.approx(ref[step]["reward_mean"], abs=1e-6)
        assert resumed[step]["loss"] == pytest.approx(ref[step]["loss"], abs=1e-5)


def test_sparse_library_merge_and_continue(tiny_model_root, ray_session, tmp_path):
    """Two sparse experts from different sub-tasks; their merge (overlaps averaged, union of masks)
    trained as a sparse policy; one expert continued. Each goes back with its parents."""
    from adapters import AdapterLibrary
    from rl.online import OnlineRun as Trainer

    lib = tmp_path / "library"
    for name, keep in (("sp-low", lambda a: a < 50), ("sp-high", lambda a: a >= 50)):
        data = _subtask_file(tiny_model_root, tmp_path, name, keep)
        # checkpoint.every=1: written back at the checkpoint, then replaced by the final write-back.
        Trainer(_recipe(tiny_model_root, tmp_path / name, data, "steps=1", "checkpoint.every=1", "adapter.kind=sparse",
                        "adapter.keep_ratio=0.02",
                        "eval.after=false", "trainer.lr=1e-3", f"adapter.library={lib}", f"adapter.save_as={name}")).fit()
    library = AdapterLibrary(lib)
    masks = [library.load_sparse(n)[0] for n in ("sp-low", "sp-high")]
    union = sum(int((masks[0][w] | masks[1][w]).sum()) for w in masks[0])
    train = tiny_model_root / "data" / "train.jsonl"
    Trainer(_recipe(tiny_model_root, tmp_path / "m", train, "steps=1", "adapter.kind=sparse", "adapter.source=merge",
                    "adapter.experts=[sp-low, sp-high]",
                    "eval.after=false", f"adapter.library={lib}", "adapter.save_as=sp-merged")).fit()
    Trainer(_recipe(tiny_model_root, tmp_path / "c", train, "steps=1", "adapter.kind=sparse", "adapter.source=continue",
                    "adapter.experts=[sp-low]",
                    "eval.after=false", f"adapter.library={lib}", "adapter.save_as=sp-low-more")).fit()
    library = AdapterLibrary(lib)
    merged, more = library.get("sp-merged"), library.get("sp-low-more")
    assert merged.adapter_type == "sparse" and merged.meta["parents"] == ["sp-low", "sp-high"]
    assert merged.meta["nnz"] == union  # trained on the union of the two masks
    assert more.adapter_type == "sparse" and more.meta["parents"] == ["sp-low"]
    assert more.meta["nnz"] == library.get("sp-low").meta["nnz"]  # the mask stays fixed


def test_arrow_training_the_experts(tiny_model_root, subtask_library, tmp_path):
    """arrow_train=experts: the routed experts themselves train and go back as <save_as>-<expert>."""
    from adapters import AdapterLibrary
    from rl.online import OnlineRun as Trainer

    summary = Trainer(_recipe(tiny_model_root, tmp_path / "ae", tiny_model_root / "data" / "train.jsonl", "steps=2",
                              "adapter.kind=arrow", "adapter.experts=[adder-low, adder-high]", "adapter.arrow_train=experts",
                              f"adapter.library={subtask_library}", "adapter.save_as=tuned", "eval.after=false")).fit()
    import torch
    from safetensors.torch import load_file

    library = AdapterLibrary(subtask_library)
    for name in ("adder-low", "adder-high"):
        tuned = library.get(f"tuned-{name}")
        assert tuned.meta["parents"] == ["adder-low", "adder-high"] and tuned.rank == library.get(name).rank
        before, after = load_file(str(library.get(name).weights_path)), load_file(str(tuned.weights_path))
        assert any(not torch.equal(before[k], after[k]) for k in before)  # the expert moved
    assert sorted(summary["library_expert"]) == sorted(str(library.get(f"tuned-{n}").path) for n in ("adder-low", "adder-high"))


def test_sparse_policy_on_two_zero2_ranks(tiny_model_root, ray_session, tmp_path):
    """Two DeepSpeed ranks (ZeRO-2) choose the same mask from the same calibration prompts, train
    it data-parallel, and rank 0's push keeps vLLM equal to the trainer."""
    from rl.online import OnlineRun as Trainer

    t = Trainer(_recipe(tiny_model_root, tmp_path / "r2", tiny_model_root / "data" / "train.jsonl", "steps=2",
                        "adapter.kind=sparse", "adapter.keep_ratio=0.05", "trainer.zero_stage=2", "trainer.num_ranks=2",
                        "trainer.micro_batch_size=16", "algorithm.kl_coef=0.05", "trainer.lr=1e-3"))
    t.start_workers()
    try:
        metrics = [t.train_one_step() for _ in range(2)]
        assert vllm_trainer_gap(t) < LOGPROB_TOL
    finally:
        t.stop_workers()
    assert metrics[-1]["kl"] > 0 and all(m["updates_applied"] > 0 for m in metrics)  # summed over ranks
