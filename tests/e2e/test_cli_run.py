"""`rl train` as a user runs it: a subprocess on a terminal, its own Ray, a recipe file plus overrides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cli_run(quickstart_cli_run):
    """The session's `rl train` on a pseudo-terminal (tests/conftest.py: 6 steps, a checkpoint and an evaluation
    every 2)."""
    return quickstart_cli_run


def test_no_op_is_compiled_at_run_time(cli_run):
    run_dir, _ = cli_run
    built = [p.name for p in (run_dir.parent / "torch_extensions").rglob("*") if p.suffix in (".so", ".o", ".ninja")]
    assert built == [], built


def test_every_step_logged_once_with_evals(cli_run):
    run_dir, terminal = cli_run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if r["kind"] == "train"]
    assert train_steps == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [0, 2, 4, 6]
    assert "held-out accuracy:" in terminal.screen
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_summary_and_checkpoints(cli_run):
    run_dir, _ = cli_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 6
    # The summary's before/after are the evaluations the metrics recorded at steps 0 and 6.
    evals = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"}
    assert (summary["accuracy_before"], summary["accuracy_after"]) == (evals[0]["accuracy"], evals[6]["accuracy"])
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["step_000006"]  # keep_last=1 removed steps 2 and 4; no .tmp left behind
    assert summary["checkpoint"].endswith("step_000006")
    assert (run_dir / "recipe.resolved.yaml").exists()


def test_curves_status_and_run_list(cli_run):
    run_dir, terminal = cli_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["curves"] == str(run_dir / "curves.png") and (run_dir / "curves.png").stat().st_size > 10_000
    assert f"curves: {run_dir / 'curves.png'}" in terminal.screen
    assert summary["status"] == "finished"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
    from rl.runs import describe_run

    row = describe_run(run_dir)
    assert (row["status"], row["steps"], row["planned_steps"]) == ("finished", 6, 6)
    assert row["accuracy_after"] == summary["accuracy_after"]


def test_wandb_offline_and_mlflow_file_store_get_the_run(cli_run, monkeypatch):
    """No account, no server: W&B writes an offline run in the run dir, MLflow a local file store;
    both hold the resolved recipe and the same rows as metrics.jsonl."""
    run_dir, _ = cli_run
    offline = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3's opt-in for reading its file store
    client = mlflow.MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("rl-post-train").experiment_id])
    assert run.data.params["algorithm.group_size"] == "4" and run.data.params["steps"] == "6"
    history = client.get_metric_history(run.info.run_id, "train/reward_mean")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(m.step, m.value) for m in history] == [(r["step"], r["reward_mean"]) for r in rows if r["kind"] == "train"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/accuracy")] == [0, 2, 4, 6]
    assert run.info.status == "FINISHED"


def test_checkpoint_loads_in_transformers_and_vllm(cli_run, ray_session):
    import ray
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rollout.vllm_worker import EngineSpec, RolloutWorker

    run_dir, _ = cli_run
    ckpt = run_dir / "checkpoints" / "step_000006"
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    prompt = tok("12+34=")["input_ids"]
    completion = tok("46", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
    hf = lp[len(prompt) - 1 :].tolist()

    spec = EngineSpec(model_path=str(ckpt), max_model_len=64)
    worker = ray.remote(RolloutWorker).options(num_cpus=1, runtime_env={"env_vars": spec.env()}).remote(spec)
    try:
        vllm_lp = ray.get(worker.score.remote([prompt], [completion]))[0]
    finally:
        ray.kill(worker)
    assert max(abs(a - b) for a, b in zip(hf, vllm_lp)) < 1e-4
