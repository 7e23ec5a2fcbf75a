"""Shared fixtures. Expensive things (the tiny model, Ray, engines) are built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_root() -> Path:
    """A tiny model + task built with the real builder, small enough to SFT in seconds.

    Cached under .cache/test-models (gitignored), so local re-runs skip the build.
    """
    from rl.tasks.tiny_model import TinyModelSpec, build_tiny_model

    spec = TinyModelSpec(
        hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128,  # head_dim 32: vLLM CPU's smallest
        sft_steps=150, n_train_rows=1024, n_test_rows=64,
    )
    return Path(build_tiny_model(spec, cache_dir=ROOT / ".cache" / "test-models", log=lambda s: None))


@pytest.fixture(scope="session")
def tied_gqa_model_root() -> Path:
    """The tiny model's build with the two features most small instruct models have and the default
    lacks: the LM head tied to the embedding, and grouped-query attention (4 heads, 2 KV heads)."""
    from rl.tasks.tiny_model import TinyModelSpec, build_tiny_model

    spec = TinyModelSpec(
        hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, tie_word_embeddings=True, intermediate_size=128,
        sft_steps=150, n_train_rows=1024, n_test_rows=64,
    )
    return Path(build_tiny_model(spec, cache_dir=ROOT / ".cache" / "test-models", log=lambda s: None))


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        # A private local cluster: never attach to another process's Ray.
        ray.init(address="local", num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def quickstart_cli_run(tiny_model_root, tmp_path_factory):
    """One uninterrupted `rl train` on a pseudo-terminal (its own Ray), shared by the CLI and terminal tests and as
    the reference of the SIGKILL-resume test. Its torch-extensions cache holds the lock an interrupted DeepSpeed op
    build leaves behind: before, every later run waited on it forever; now no op is built at run time.
    Returns (run_dir, TerminalRun)."""
    from helpers import quickstart_cli_cmd, run_on_a_terminal  # tests/e2e: on sys.path once an e2e module is collected

    run_dir = tmp_path_factory.mktemp("cli") / "run"
    extensions = run_dir.parent / "torch_extensions"
    (extensions / "deepspeed_shm_comm").mkdir(parents=True)
    (extensions / "deepspeed_shm_comm" / "lock").touch()
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions)}  # the actors inherit it
    run = run_on_a_terminal(quickstart_cli_cmd(tiny_model_root, run_dir), env=env)
    assert run.returncode == 0, run.screen[-6000:]
    return run_dir, run


@pytest.fixture
def cut_and_resume(tmp_path):
    """Run a recipe uninterrupted (``ref``), saving a checkpoint every ``cut`` steps; then a second run (``cut``)
    whose directory holds only ref's step-``cut`` checkpoint, as if it had stopped there, resumed with
    ``resume=auto``. A checkpoint written while its run went on must hold everything the later steps depend on.
    ``recipe_for(run_dir, *overrides)`` builds the recipe. Returns both runs' train metrics rows as {step: row}."""
    import json
    import shutil

    def rows(run_dir: Path) -> dict:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r for r in map(json.loads, lines) if r["kind"] == "train"}

    def run(recipe_for, cut: int = 2) -> tuple[dict, dict]:
        from rl.online import OnlineRun as Trainer

        kept = (f"checkpoint.every={cut}", "checkpoint.keep_last=100")
        Trainer(recipe_for(tmp_path / "ref", *kept)).fit()
        name = f"step_{cut:06d}"
        shutil.copytree(tmp_path / "ref" / "checkpoints" / name, tmp_path / "cut" / "checkpoints" / name)
        Trainer(recipe_for(tmp_path / "cut", *kept, "resume=auto")).fit()
        return rows(tmp_path / "ref"), rows(tmp_path / "cut")

    return run


# ------------------------------------------------------------------------------------ parallel workers
# scripts/test.sh runs two pytest-xdist workers: a test run keeps the 2 cores only ~70% busy (the engine samples
# while the trainer waits, and the other way round). A module's tests share its module fixtures (one engine pair),
# so each module goes to one worker whole; modules that share a session fixture too costly to make twice go
# together.
def _pin_this_worker_to_its_cores() -> None:
    """Each worker, and everything it starts (Ray, engines, trainer ranks, `rl` subprocesses: children keep their
    parent's affinity), runs on its own share of the cores. Every test sizes its threads to the cores it sees
    (rl.resources.thread_counts); unpinned, two workers ran twice as many busy threads as cores and the slowest tests
    took three times as long as alone."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if worker.startswith("gw") and 1 < count <= len(cores):
        os.sched_setaffinity(0, cores[int(worker[2:]) % count::count])


_pin_this_worker_to_its_cores()
SHARED_SESSION_FIXTURE = {  # module -> the group it runs in
    "tests/e2e/test_cli_run.py": "quickstart_cli_run",
    "tests/e2e/test_terminal.py": "quickstart_cli_run",
    "tests/e2e/test_resume.py": "quickstart_cli_run",
}


def _scheduled_unit(nodeid: str) -> str:
    """What one worker runs whole: the test's module, or the group of modules sharing its session fixture."""
    module = nodeid.split("::")[0]
    return SHARED_SESSION_FIXTURE.get(module, module)


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ModuleGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _scheduled_unit(nodeid)

    # Units go out in collection order: the end-to-end modules (minutes each) first, the unit tests and doctests
    # (seconds) last, where they even out the two workers' finish. xdist's default order, most tests first, sent the
    # unit modules first and left one-test end-to-end modules of two minutes for the end.
    config.option.loadscopereorder = False
    return ModuleGroups(config, log)


# ---------------------------------------------------------------------------------------------- skips
# A skip that depends on the machine (no GPU, no namespaces, data not present) is allowed; any other skip
# fails the run, so a broken install or a test that quietly stopped running cannot pass as green.
MACHINE_SKIPS = (
    "this machine has CUDA",
    "no writable /dev/shm here",
    "user + network namespaces are not permitted here",
    "no network namespace here",
    "simulated nodes need root",
    "HH data not found",
    # Linux exempts uid 0 from RLIMIT_NPROC; as root the sandbox caps processes with a pids cgroup instead, where
    # the machine lets it make one.
    "RLIMIT_NPROC is not enforced for this user",
    "no writable pids cgroup here",
    "the sandbox jail needs root and mount + PID namespaces",
)
_UNEXPECTED_SKIPS: list[str] = []
_SECONDS: dict[str, float] = {}  # test id -> seconds (set-up, call and tear-down)


def pytest_runtest_logreport(report):
    _SECONDS[report.nodeid] = _SECONDS.get(report.nodeid, 0.0) + report.duration
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = str(report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr)
        if not any(allowed in reason for allowed in MACHINE_SKIPS):
            _UNEXPECTED_SKIPS.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session, exitstatus):
    if _UNEXPECTED_SKIPS and exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter):
    _time_per_module(terminalreporter)
    if _UNEXPECTED_SKIPS:
        terminalreporter.section("skipped tests that should have run here (each fails the run)", red=True)
        for line in _UNEXPECTED_SKIPS:
            terminalreporter.line(line)


# ---------------------------------------------------------------------------------------------- time
def _time_per_module(terminalreporter) -> None:
    """Where a run's time went, by the unit the workers schedule (a module, or its group): the 10 heaviest at the end of
    a long run; every test's seconds in .cache/test-durations.json (what to shorten when the suite grows)."""
    if os.environ.get("PYTEST_XDIST_WORKER") or sum(_SECONDS.values()) < 300:
        return
    import json

    per_unit: dict[str, float] = {}
    for nodeid, seconds in _SECONDS.items():
        unit = _scheduled_unit(nodeid)
        per_unit[unit] = per_unit.get(unit, 0.0) + seconds
    terminalreporter.section(f"seconds per scheduled module or group ({sum(_SECONDS.values()):.0f} s of tests in all)")
    for unit, seconds in sorted(per_unit.items(), key=lambda kv: -kv[1])[:10]:
        terminalreporter.line(f"{seconds:8.1f}s  {unit}")
    out = ROOT / ".cache" / "test-durations.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(sorted(_SECONDS.items(), key=lambda kv: -kv[1])), indent=1))
