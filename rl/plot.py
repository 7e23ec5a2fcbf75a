"""``rl plot RUN_DIR [RUN_DIR ...]``: overlaid PNG curves of several runs (reward, accuracy, KL,
response length, step time), read from each run's ``metrics.jsonl``."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Callable

from rl.metrics import read_metrics

PANELS = [
    ("reward_mean", "train", "reward (mean)"),
    ("accuracy", "eval", "held-out accuracy"),
    ("accuracy", "train", "train accuracy (sampled)"),
    ("kl", "train", "KL to reference"),
    ("response_length", "train", "response length (tokens)"),
    ("time_step", "train", "step time (s)"),
]
# One run's own picture (``curves.png``, written when a run finishes): also entropy and where each step's time goes.
RUN_PANELS = [*PANELS[:5], ("entropy", "train", "entropy (nats/token)"), ("time_step", "train", "step time (s)"),
              (("time_generate", "time_reward", "time_train", "time_weight_sync"), "train", "step time split (s)")]
DPO_PANELS = [("loss", "train", "DPO loss"), ("reward_accuracy", "train", "reward accuracy (train)"),
              ("reward_accuracy", "eval", "reward accuracy (held-out)"), ("reward_margin", "train", "reward margin"),
              ("time_step", "train", "step time (s)"), ("loss", "eval", "held-out loss")]


def plot_run_curves(run_dir: Path) -> Path:
    """``run_dir/curves.png``: the run's reward, accuracy, KL, entropy, length and step-time split."""
    rows = read_metrics(Path(run_dir), "train")
    online = any("reward_mean" in r for r in rows) or not rows
    panels = RUN_PANELS if online else DPO_PANELS
    return plot_runs([str(run_dir)], str(Path(run_dir) / "curves.png"), panels=panels, labels=[Path(run_dir).name])


def plot_runs(run_dirs: list[str], out: str, x: str = "step", labels: list[str] | None = None, panels=PANELS) -> Path:
    """One PNG with a panel per metric; each run is a line. ``x`` is ``step`` or ``rollouts`` (cumulative).
    A panel's key may be a tuple of keys: one line per key (and run)."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = math.ceil(len(panels) / 2)
    fig, axes = plt.subplots(2, cols, figsize=(5 * cols, 8))
    for i, run in enumerate(run_dirs):
        label = labels[i] if labels else Path(run).name
        train = read_metrics(Path(run), "train")
        evals = read_metrics(Path(run), "eval")
        if not train and not evals:
            raise FileNotFoundError(f"no metrics.jsonl rows in {run}")
        # Cumulative rollouts at each step, for comparing runs with different batch shapes.
        cum, total = {0: 0.0}, 0.0
        for row in train:
            total += row.get("rollouts") or 0.0
            cum[row["step"]] = total
        for ax, (keys, kind, title) in zip(axes.flat, panels):
            for key in (keys if isinstance(keys, tuple) else (keys,)):
                rows = [r for r in (train if kind == "train" else evals) if r.get(key) is not None]
                if not rows:
                    continue
                xs = [cum.get(r["step"], 0.0) if x == "rollouts" else r["step"] for r in rows]
                line_label = f"{label}: {key.removeprefix('time_')}" if isinstance(keys, tuple) else label
                ax.plot(xs, [r[key] for r in rows], marker="o" if kind == "eval" else None, markersize=3, label=line_label)
                ax.set_title(title)
                ax.set_xlabel("rollouts" if x == "rollouts" else "step")
    for ax, (key, kind, title) in zip(axes.flat, panels):
        if ax.lines:
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        else:  # e.g. KL when no run had a KL term
            ax.set_title(title)
            ax.text(0.5, 0.5, f"no run logged {kind} '{key}'", ha="center", va="center", transform=ax.transAxes, color="gray")
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def plot_arm_curves(results: list[dict], arms: list[str], metrics: list[tuple[str, str]], out: Path, title: str,
                    dashed: Callable[[str], bool] = lambda arm: False) -> None:
    """An experiment's arms over seeds: a row per metric (``(key, y label)``), held-out value against cumulative
    rollouts and against training seconds; the mean over seeds with a min-max band. ``results``: one dict per
    (arm, seed) with ``curve``, a list of evaluations (``step``, ``rollouts``, ``seconds`` and the metric keys)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(metrics), 2, figsize=(12, 4.5 * len(metrics)), squeeze=False)
    for arm in arms:
        runs = [r for r in results if r["arm"] == arm]
        # The steps every seed evaluated (seeds may have been evaluated at different steps), each seed's point there.
        steps = sorted(set.intersection(*({p["step"] for p in r["curve"]} for r in runs)))
        points = [[next(p for p in r["curve"] if p["step"] == step) for r in runs] for step in steps]
        for row, (key, ylabel) in enumerate(metrics):
            for col, x in enumerate(("rollouts", "seconds")):
                xs = [statistics.mean(p[x] for p in at) for at in points]
                ys = [[p[key] for p in at] for at in points]
                ax = axes[row][col]
                line, = ax.plot(xs, [statistics.mean(y) for y in ys], marker="o", markersize=3, label=arm,
                                linestyle="--" if dashed(arm) else "-")
                ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], color=line.get_color(), alpha=0.15)
                ax.set_xlabel("cumulative rollouts" if x == "rollouts" else "cumulative training seconds")
                ax.set_ylabel(ylabel)
                if x == "rollouts":
                    ax.set_xscale("symlog", linthresh=max(1.0, min(xs[1:], default=1.0)))  # the start is at 0
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
