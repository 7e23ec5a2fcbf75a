"""One run: its directory, metrics, loop, checkpoints and summary, shared by every algorithm.

    start workers                           Ray actors (or in-process, use_ray: false)
    resume, or evaluate before              held-out set
    while step < total:                     a subclass says what one step is
        metrics = train_one_step()
        log; evaluate every k; checkpoint every k
    evaluate after; final checkpoint; summary.json

``rl.online.OnlineRun`` (GRPO, 2-GRPO, online DPO) and ``rl.dpo.OfflineDPORun`` fill in the
steps; checkpoint writing, signal handling, metrics and the summary exist only here.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Optional

import yaml

from rl import checkpoint as ckpt
from rl.config import Recipe, recipe_to_yaml
from rl.files import write_text_atomic
from rl.metrics import MetricsLogger, describe_machine, make_trackers
from rl.watchdog import WorkerStalled

RUN_STATUS = "run.json"  # what `rl runs` reads: status, pid and host while running, the reason when stopped


def write_run_status(run_dir: Path, status: str, reason: Optional[str] = None) -> None:
    import os
    import socket

    info = {"status": status, "pid": os.getpid(), "host": socket.gethostname(), "updated": time.time()}
    if reason:
        info["reason"] = reason
    write_text_atomic(Path(run_dir) / RUN_STATUS, json.dumps(info))


class Interrupted(SystemExit):
    """Raised after a clean stop on SIGTERM/SIGINT; exits with 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)


class TrainingDiverged(RuntimeError):
    """Too many non-finite updates in a row; the last good policy was checkpointed."""


class Run:
    """Subclasses set ``total_steps``, start their ``workers`` (``rl.launch.Workers``) and implement the hooks below."""

    progress_label = "GRPO"
    log_prefix = "[rl]"

    def __init__(self, recipe: Recipe, run_dir: Optional[Path] = None):
        self.recipe = recipe
        self.started = time.time()
        self.run_dir = run_dir or recipe.run_dir(time.strftime("%Y%m%d-%H%M%S", time.localtime(self.started)))
        self.step = 0
        self.total_steps = recipe.steps
        self.resume_state: Optional[dict] = None  # set (with resume_from) by runs that can resume
        self.resume_from: Optional[Path] = None
        self.workers = None  # rl.launch.Workers: the run's trainer ranks, engines and reward models, while they run
        # Each actor's own output (vLLM, DeepSpeed, Ray worker lines) goes here unless logging.verbose.
        self.log_dir = None if recipe.logging.verbose or not recipe.use_ray else str((self.run_dir / "logs").resolve())
        self._logger: Optional[MetricsLogger] = None  # while fit() runs: lines go above the progress bar
        self._nonfinite_in_a_row = 0
        self.checkpointed_step: Optional[int] = None  # the step of the last checkpoint this process saved

    # ------------------------------------------------------------------ hooks

    @property
    def trainer(self):
        return self.workers.trainer if self.workers is not None else None

    @property
    def rollout(self):
        return self.workers.rollout if self.workers is not None else None

    def start_workers(self) -> None:
        """Build ``self.workers`` and call its ``setup()``."""
        raise NotImplementedError

    def stop_workers(self) -> dict:
        """Stop every actor; returns final numbers for the summary (e.g. peak memory, where it ran)."""
        return self.workers.cleanup() if self.workers is not None else {}

    def train_one_step(self) -> dict[str, float]:
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        raise NotImplementedError

    def header(self) -> str:
        """The line printed at start: sizes, workers, data, model, run directory."""
        raise NotImplementedError

    def checkpoint_state(self) -> dict:
        """What ``driver_state.json`` records beside the policy (see ``rl/checkpoint.py``)."""
        return {"step": self.step, "resumable": False, "recipe_fingerprint": ckpt.recipe_fingerprint(self.recipe)}

    def after_checkpoint(self, path: str, summary: dict) -> None:
        """Called after every checkpoint (e.g. write an adapter back into its library)."""

    def adapter_provenance(self) -> tuple[str, str, tuple[str, ...]]:
        """(base model, training data, summary keys) recorded with an adapter written back to its library."""
        raise NotImplementedError

    def write_back_adapter(self, checkpoint: str, summary: dict):
        """Save the trained adapter(s) of ``self.policy`` into the library with their provenance; each call replaces
        the run's previous version (called at every checkpoint and at the end). None without an adapter to save."""
        ad, policy = self.recipe.adapter, getattr(self, "policy", None)
        if policy is None or not policy.is_adapter or not ad.save_as:
            return None
        from adapters import AdapterLibrary
        from rl.config import recipe_to_yaml

        base_model, data, metric_keys = self.adapter_provenance()
        meta = {
            "base_model": base_model,
            "task": f"{self.recipe.algorithm.name} on {data}",
            "data": data,
            "recipe": {"yaml": recipe_to_yaml(self.recipe)},
            "metrics": {k: summary[k] for k in metric_keys if k in summary},
            "parents": list(ad.experts),
            "steps": self.step,
        }
        if ad.kind == "arrow":
            meta["extra"] = {"arrow": {"experts": list(ad.experts), "top_k": ad.top_k, "temperature": ad.router_temperature,
                                       "trained": ad.arrow_train}}
        library = AdapterLibrary(ad.library, create=True)
        paths = [str(library.add(ad.save_as + suffix, source, meta, replace=True).path)
                 for suffix, source in self.trainer.library_sources(checkpoint).items()]
        return paths[0] if len(paths) == 1 else paths

    def restore(self) -> None:
        """Continue from ``self.resume_state`` (only runs that can resume set it)."""
        raise NotImplementedError

    def on_step(self, metrics: dict, logger: MetricsLogger) -> None:
        """Skipped (non-finite) updates are logged; ``trainer.max_nonfinite_steps`` in a row stop the run."""
        if not metrics.get("updates_skipped_nonfinite"):
            self._nonfinite_in_a_row = 0
            return
        self._nonfinite_in_a_row += 1
        self.print(f"step {self.step}: non-finite loss or gradient, update skipped ({self._nonfinite_in_a_row} in a row)")
        if self._nonfinite_in_a_row >= self.recipe.trainer.max_nonfinite_steps:
            path = self.save_checkpoint()  # skipped updates never touched the weights: the last good policy
            raise TrainingDiverged(
                f"{self._nonfinite_in_a_row} steps in a row had a non-finite loss or gradient (trainer.max_nonfinite_steps); "
                f"stopped at step {self.step}. The last good policy is in {path}."
            )

    def record_eval(self, when: str, ev: dict, summary: dict, logger: MetricsLogger) -> None:
        """Put an evaluation's numbers into the summary (``when``: before, after) and say them."""

    def summary_lines(self, s: dict) -> list[str]:
        return []

    # ------------------------------------------------------------------ shared

    def save_checkpoint(self) -> str:
        """The policy (``save_pretrained``), each rank's state when resumable, then ``driver_state.json``; atomic."""
        state = self.checkpoint_state()

        def write(tmp: Path) -> None:
            self.trainer.save_pretrained(str(tmp.resolve()))  # absolute: a rank may run in another directory
            if state.get("resumable"):
                self.trainer.save_state(str(tmp.resolve() / "trainer_state"))
            (tmp / ckpt.STATE_FILE).write_text(json.dumps(state, indent=2))

        path = ckpt.write_atomically(self.run_dir / "checkpoints" / f"step_{self.step:06d}", write)
        ckpt.prune(self.run_dir, self.recipe.checkpoint.keep_last)
        self.checkpointed_step = self.step
        return str(path)

    def print(self, text: str) -> None:
        (self._logger.print if self._logger else print)(f"{self.log_prefix} {text}")

    def fit(self) -> dict:
        r = self.recipe
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "recipe.resolved.yaml").write_text(recipe_to_yaml(r))
        start_step = int(self.resume_state["step"]) if self.resume_state else 0
        if self.resume_state:
            ckpt.truncate_metrics(self.run_dir, start_step)  # steps after the checkpoint are redone: logged once
        trackers = make_trackers(self.run_dir, r.name, yaml.safe_load(recipe_to_yaml(r)), r.logging)
        logger = self._logger = MetricsLogger(self.run_dir, self.total_steps, tensorboard=r.logging.tensorboard,
                                              progress=r.logging.progress, start_step=start_step, label=self.progress_label,
                                              trackers=trackers)
        self.print(self.header())
        # The machine goes with the results: numbers read back later (experiment reports) name where they were measured.
        summary: dict = {"name": r.name, "run_dir": str(self.run_dir), "machine": describe_machine()}
        write_run_status(self.run_dir, "running")
        try:
            t0 = time.perf_counter()
            self.start_workers()
            stop_signal = self._install_stop_handlers()  # after Ray's start-up, which installs handlers of its own
            summary["startup_seconds"] = time.perf_counter() - t0
            self._begin(summary, logger)
            try:
                self._loop(summary, logger, stop_signal)
            except WorkerStalled as e:  # nothing more to save: the last checkpoint stays as it is
                kept = ckpt.complete_checkpoints(self.run_dir)
                summary.update(steps=self.step, stopped_by=f"{type(e).__name__}: {e}", checkpoint=str(kept[-1]) if kept else None)
                raise
            if r.eval.after:
                ev = self.evaluate()
                logger.log(self.step, ev, kind="eval")
                self.record_eval("after", ev, summary, logger)
            if r.checkpoint.save_final and self.checkpointed_step != self.step:
                summary["checkpoint"] = self.save_checkpoint()
            if summary.get("checkpoint"):
                self.after_checkpoint(summary["checkpoint"], summary)  # again: now with the final evaluation
            summary["steps"] = self.step
            summary["status"] = "finished"
        except BaseException as e:
            self._record_stop(summary, e)
            raise
        finally:
            logger.close()
            self._logger = None
            summary.update(self.stop_workers() or {})
            self._restore_signal_handlers()
            if "steps" in summary:
                summary["total_seconds"] = time.time() - self.started
                summary["curves"] = self._draw_curves()
                write_text_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2))
            write_run_status(self.run_dir, summary.get("status", "failed"), summary.get("reason"))
        for line in self._summary_lines(summary):
            self.print(line)
        return summary

    def _begin(self, summary: dict, logger: MetricsLogger) -> None:
        if self.resume_state:
            self.restore()
            self.print(f"resumed from {self.resume_from} at step {self.step}")
        elif self.recipe.eval.before:
            ev = self.evaluate()
            logger.log(0, ev, kind="eval")
            self.record_eval("before", ev, summary, logger)

    def _loop(self, summary: dict, logger: MetricsLogger, stop_signal: list) -> None:
        r = self.recipe
        t_train = time.perf_counter()
        summary.setdefault("checkpoint", None)
        while self.step < self.total_steps and not stop_signal:
            metrics = self.train_one_step()
            logger.log(self.step, metrics)
            self.on_step(metrics, logger)
            if r.eval.every and self.step % r.eval.every == 0 and self.step < self.total_steps:
                ev = self.evaluate()
                logger.log(self.step, ev, kind="eval")
                self.record_eval(f"step {self.step}", ev, summary, logger)
            if r.checkpoint.every and self.step % r.checkpoint.every == 0:
                summary["checkpoint"] = self.save_checkpoint()
                self.after_checkpoint(summary["checkpoint"], summary)
        summary["train_seconds"] = time.perf_counter() - t_train
        if stop_signal:
            # SIGTERM / Ctrl-C: keep the work done so far, then stop everything cleanly.
            name = signal.Signals(stop_signal[0]).name
            summary.update(checkpoint=self.save_checkpoint(), steps=self.step, interrupted_by=name)
            self.print(f"{name}: checkpoint at step {self.step} in {summary['checkpoint']}; continue with resume=auto")
            raise Interrupted(stop_signal[0])

    def _record_stop(self, summary: dict, e: BaseException) -> None:
        """Why the run did not finish, and how to continue it, in its summary."""
        kept = ckpt.complete_checkpoints(self.run_dir)
        summary.setdefault("steps", self.step)
        summary.setdefault("checkpoint", str(kept[-1]) if kept else None)
        if isinstance(e, Interrupted):
            summary.update(status="interrupted", reason=summary.get("interrupted_by", "signal"))
        else:
            summary.update(status="failed", reason=summary.get("stopped_by") or f"{type(e).__name__}: {e}")
        summary["resume"] = (f"run the same command with resume=auto output_dir={self.run_dir} to continue from "
                             f"{summary['checkpoint']}" if summary["checkpoint"] else "no checkpoint was written: start again")

    def _draw_curves(self) -> Optional[str]:
        """``curves.png`` in the run directory; a plotting failure costs the picture, never the run."""
        from rl.plot import plot_run_curves

        if not (self.run_dir / "metrics.jsonl").exists() or not (self.run_dir / "metrics.jsonl").stat().st_size:
            return None  # stopped before its first step
        try:
            return str(plot_run_curves(self.run_dir))
        except Exception as e:  # noqa: BLE001 - e.g. no metrics rows yet
            print(f"{self.log_prefix} no curves.png: {type(e).__name__}: {e}")
            return None

    def _summary_lines(self, s: dict) -> list[str]:
        head = f"done: {s['name']} ({s['steps']} steps in {s.get('train_seconds', 0):.0f} s of training, {s['total_seconds']:.0f} s in all)"
        tail = f"checkpoint: {s.get('checkpoint')}   metrics: {s['run_dir']}/metrics.jsonl   summary: {s['run_dir']}/summary.json"
        extra = [f"curves: {s['curves']}"] if s.get("curves") else []
        if self.log_dir:
            extra.append(f"engine and trainer logs: {self.log_dir}/ (rollout-<i>.log, trainer-rank<r>.log; "
                         "logging.verbose=true shows them here)")
        return [head, *self.summary_lines(s), tail, *extra]

    def _install_stop_handlers(self) -> list:
        """SIGTERM and SIGINT ask the loop to stop after the current step (the list gets the signal)."""
        received: list = []
        self._old_handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old_handlers[sig] = signal.signal(sig, lambda signum, frame: received.append(signum))
        return received

    def _restore_signal_handlers(self) -> None:
        for sig, handler in getattr(self, "_old_handlers", {}).items():
            signal.signal(sig, handler)
        self._old_handlers = {}
