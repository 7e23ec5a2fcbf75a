"""`rl eval --checkpoint` scores exactly the policy a run trained, served as the run served it:
a LoRA and a sparse adapter, each trained a few steps, then evaluated from the final checkpoint
alone. The held-out accuracy must be the run's own final accuracy. (The full model's checkpoint is
evaluated the same way on the real pretrained model: tests/e2e/test_real_model.py.)"""

from __future__ import annotations

import pytest

from rl.config import load_recipe

pytestmark = pytest.mark.e2e

KINDS = {
    # lr high enough that a few steps visibly move each policy away from the base model.
    "lora": ["adapter.kind=lora", "adapter.rank=8", "trainer.lr=2e-2"],
    "sparse": ["adapter.kind=sparse", "adapter.keep_ratio=0.05", "trainer.lr=2e-2"],
}


def _recipe(tiny_model_root, run_dir, kind):
    return load_recipe(None, [
        f"model.path={tiny_model_root / 'model'}", f"data.train={tiny_model_root / 'data' / 'train.jsonl'}",
        f"data.test={tiny_model_root / 'data' / 'test.jsonl'}", "steps=3",
        "data.prompts_per_step=16", "algorithm.group_size=4", "data.max_test_examples=64",
        "rollout.max_new_tokens=6", "rollout.max_model_len=64", "trainer.micro_batch_size=64",
        "logging.progress=false", "logging.tensorboard=false", f"output_dir={run_dir}", *KINDS[kind],
    ])


@pytest.mark.parametrize("kind", list(KINDS))
def test_eval_of_a_final_checkpoint_gives_the_runs_own_accuracy(kind, tiny_model_root, ray_session, tmp_path):
    from rl.evaluate import run_eval
    from rl.online import OnlineRun

    recipe = _recipe(tiny_model_root, tmp_path / "run", kind)
    summary = OnlineRun(recipe).fit()
    # The policy moved, so an evaluation that served the base model would give accuracy_before and fail the check
    # below. Whether the move is an improvement is not this test's question (test_adapter_policy asks it).
    assert summary["accuracy_after"] != summary["accuracy_before"], summary
    result = run_eval(recipe, checkpoint=str(tmp_path / "run"))  # a run directory: its newest checkpoint
    assert result["policy"] == kind and result["checkpoint"] == summary["checkpoint"]
    assert result["accuracy"] == summary["accuracy_after"], (result, summary)
    assert result["num_examples"] == 64
