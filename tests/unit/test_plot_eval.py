"""`rl plot` draws several runs from their metrics files; pass@k math."""

from __future__ import annotations

import json

import pytest

from rl.evaluate import pass_at_k
from rl.plot import plot_runs


def _run(tmp_path, name, rewards):
    d = tmp_path / name
    d.mkdir()
    rows = [{"step": 0, "kind": "eval", "accuracy": 0.1}]
    rows += [{"step": i + 1, "kind": "train", "reward_mean": r, "rollouts": 16, "time_step": 0.5} for i, r in enumerate(rewards)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(d)


def test_plot_overlays_runs_to_png(tmp_path):
    out = plot_runs([_run(tmp_path, "a", [0.1, 0.2]), _run(tmp_path, "b", [0.3, 0.1])], str(tmp_path / "p.png"), x="rollouts")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_refuses_a_dir_without_metrics(tmp_path):
    with pytest.raises(FileNotFoundError):
        plot_runs([str(tmp_path)], str(tmp_path / "p.png"))


def test_pass_at_k_by_hand():
    # n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 3, 3) == 1.0  # n - c < k: always a correct one
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
