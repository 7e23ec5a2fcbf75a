"""The run's metrics log (rl/metrics.py::MetricsLogger): one JSON row per step, TensorBoard scalars, and a list of
numbers (e.g. rollouts per prompt) as a histogram."""

from __future__ import annotations

import json
import math

from rl.metrics import MetricsLogger


def test_rows_scalars_and_histograms(tmp_path):
    log = MetricsLogger(tmp_path, total_steps=2, tensorboard=True, progress=False)
    log.log(1, {"reward_mean": 0.5, "loss": math.nan, "policy": "full", "rollouts_per_prompt": [2, 2, 8, 12]})
    log.log(2, {"reward_mean": 0.75, "rollouts_per_prompt": [4.0, 4.0, 8.0, 8.0]})
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0] == {"step": 1, "kind": "train", "reward_mean": 0.5, "loss": None, "policy": "full",
                       "rollouts_per_prompt": [2.0, 2.0, 8.0, 12.0]}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"histograms": 0, "scalars": 0}).Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/reward_mean")] == [(1, 0.5), (2, 0.75)]
    assert "train/loss" not in events.Tags()["scalars"]  # a non-finite value is not plotted
    histograms = events.Histograms("train/rollouts_per_prompt")
    assert [h.step for h in histograms] == [1, 2]
    first = histograms[0].histogram_value
    assert (first.min, first.max, first.num, first.sum) == (2.0, 12.0, 4.0, 24.0)


def test_the_machine_line_names_the_cpu_model():
    """Float results differ between CPU models, so a report's machine line names the model."""
    from rl.metrics import cpu_model, describe_machine

    model = cpu_model()
    assert model and model != "unknown CPU" and "\n" not in model
    assert f"({model})" in describe_machine()


def test_a_report_states_the_machine_its_results_recorded():
    """A re-render states the machine saved with the results, and refuses results that do not say (rather than
    naming the machine it runs on)."""
    import pytest

    from rl.metrics import recorded_machine, recorded_machine_of_rows

    assert recorded_machine({"machine": "x86_64 (CPU A), 2 CPU cores, Python 3.11.7, no GPU", "seconds": 1}) == \
        "x86_64 (CPU A), 2 CPU cores, Python 3.11.7, no GPU"
    with pytest.raises(KeyError, match="do not record their machine"):
        recorded_machine({"seconds": 1})
    assert recorded_machine_of_rows([{"arm": "a", "machine": "m1"}, {"arm": "b", "machine": "m1"}]) == "m1"
    with pytest.raises(ValueError, match="one machine"):
        recorded_machine_of_rows([{"machine": "m1"}, {"machine": "m2"}])
    with pytest.raises(KeyError, match="do not record their machine"):
        recorded_machine_of_rows([{"machine": "m1"}, {"arm": "b"}])


def test_a_runs_machine_is_the_one_its_summary_records(tmp_path):
    """Experiment rows take the machine from the run they read back; a run from before runs recorded it is this
    machine's."""
    import json

    from rl.metrics import describe_machine, machine_of_run

    (tmp_path / "summary.json").write_text(json.dumps({"status": "finished", "machine": "x86_64 (CPU B), 2 CPU cores"}))
    assert machine_of_run(tmp_path) == "x86_64 (CPU B), 2 CPU cores"
    (tmp_path / "summary.json").write_text(json.dumps({"status": "finished"}))
    assert machine_of_run(tmp_path) == describe_machine()


def test_saved_rows_from_another_machine_are_dropped_and_counted(capsys):
    """A script that re-measures some rows keeps only the saved rows of the machine it runs on, and says how many
    it dropped (a row without a machine counts as another's)."""
    from rl.metrics import rows_measured_on

    rows = [{"arm": "a", "machine": "m1"}, {"arm": "b", "machine": "m2"}, {"arm": "c"}, {"arm": "d", "machine": "m1"}]
    assert [r["arm"] for r in rows_measured_on(rows, "m1")] == ["a", "d"]
    assert "dropping 2 saved rows measured on another machine" in capsys.readouterr().out
    assert rows_measured_on(rows[:1], "m1") == rows[:1] and capsys.readouterr().out == ""
