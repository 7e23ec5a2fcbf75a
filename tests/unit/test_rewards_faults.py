"""Reward faults: per-call time limits in RewardScorer, and the sandbox for rewards that run generated code."""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time

import pytest

from rewards import RewardScorer, RewardSpec, register_reward, registry, sandbox, sandbox_child, scoring
from rewards import builtin
from rewards.builtin import extract_python, python_tests
from rewards.sandbox import run_python

KINDS = {"exception", "nan", "timeout", "wrong_length", "wrong_type"}
LIMIT = 1  # seconds: the scorer's timeout in these tests
HANG = 20.0  # seconds: how long a "hung" reward would sleep if nobody released it
SLACK = 1.0  # seconds on top of what the limits add up to: the suite runs two workers on two cores


@pytest.fixture
def hung(monkeypatch):
    """Registers rewards that hang (until released at teardown, so no thread outlives the test by long)."""
    monkeypatch.setattr(registry.REWARDS, "_entries", dict(registry.REWARDS._entries))
    release = threading.Event()
    threads_seen: list[threading.Thread] = []

    @register_reward("ones")
    def ones(prompts, completions, **columns):
        return [1.0] * len(completions)

    @register_reward("hangs")
    def hangs(prompts, completions, **columns):
        release.wait(HANG)
        return [1.0] * len(completions)

    @register_reward("hangs_on_slow")  # only a batch or sample containing "slow" hangs
    def hangs_on_slow(prompts, completions, **columns):
        if "slow" in completions:
            release.wait(HANG)
        return [float(len(c)) for c in completions]

    @register_reward("raises_on_batch_hangs_on_slow")
    def raises_on_batch_hangs_on_slow(prompts, completions, **columns):
        if len(completions) > 1:
            raise RuntimeError("breaks on batches")
        if completions == ["slow"]:
            release.wait(HANG)
        return [2.0]

    @register_reward("records_thread")
    def records_thread(prompts, completions, **columns):
        threads_seen.append(threading.current_thread())
        return [0.5] * len(completions)

    @register_reward("exits")
    def exits(prompts, completions, **columns):
        raise SystemExit("a reward called sys.exit")

    yield threads_seen
    release.set()


def timed(fn, *args, **kwargs):
    start = time.monotonic()
    out = fn(*args, **kwargs)
    return out, time.monotonic() - start


# --- RewardScorer(timeout_seconds=...) --------------------------------------------------------------


def test_hung_reward_costs_only_its_samples_and_does_not_block(hung, caplog):
    scorer = RewardScorer([RewardSpec("hangs"), RewardSpec("ones", weight=10.0)], fallback=-1.0, timeout_seconds=LIMIT)
    with caplog.at_level(logging.WARNING, logger="rewards"):
        result, elapsed = timed(scorer.score, ["p"] * 4, ["a", "b", "c", "d"], {})
    # The batched call gets LIMIT, the concurrent per-sample retries share one more LIMIT.
    assert elapsed < 2 * LIMIT + SLACK < HANG
    assert result.per_reward["hangs"] == [-1.0] * 4
    assert result.per_reward["ones"] == [1.0] * 4
    assert result.total == [9.0] * 4
    assert result.failures == {**dict.fromkeys(KINDS, 0), "timeout": 4}
    assert set(result.first_tracebacks) == {"timeout"}
    assert f"timeout_seconds={LIMIT}" in result.first_tracebacks["timeout"]
    timeout_warnings = [r for r in caplog.records if "'timeout'" in r.getMessage()]
    assert len(timeout_warnings) == 1
    assert any(f"did not return within timeout_seconds={LIMIT}" in r.getMessage() for r in caplog.records)
    assert scorer.abandoned_threads >= 1  # they keep running: Python cannot stop a thread

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rewards"):
        again, elapsed = timed(scorer.score, ["p"], ["a"], {})
    assert elapsed < 2 * LIMIT + SLACK
    assert again.failures["timeout"] == 1 and caplog.records == []  # counted, not logged again
    assert scorer.total_failures == {**dict.fromkeys(KINDS, 0), "timeout": 5}


def test_timeout_on_one_sample_costs_only_that_sample(hung):
    # "slow" first: with sequential retries it would eat the budget of the samples after it.
    scorer = RewardScorer([RewardSpec("hangs_on_slow")], timeout_seconds=LIMIT)
    result, elapsed = timed(scorer.score, ["p"] * 4, ["slow", "a", "bb", "ccc"], {})
    assert elapsed < 2 * LIMIT + SLACK
    assert result.per_reward["hangs_on_slow"] == [0.0, 1.0, 2.0, 3.0]
    assert result.failures == {**dict.fromkeys(KINDS, 0), "timeout": 1}
    assert "sample 0 did not return" in result.first_tracebacks["timeout"]


def test_hung_sample_after_a_raising_batch(hung):
    scorer = RewardScorer([RewardSpec("raises_on_batch_hangs_on_slow")], timeout_seconds=LIMIT)
    result, elapsed = timed(scorer.score, ["p"] * 3, ["a", "slow", "b"], {})
    assert elapsed < LIMIT + SLACK  # the batch raised at once; only the retries waited
    assert result.per_reward["raises_on_batch_hangs_on_slow"] == [2.0, 0.0, 2.0]
    assert result.failures == {**dict.fromkeys(KINDS, 0), "timeout": 1}


def test_retries_share_one_budget_even_when_threads_run_out(hung, monkeypatch):
    monkeypatch.setattr(scoring, "MAX_RETRY_THREADS", 1)
    scorer = RewardScorer([RewardSpec("hangs_on_slow")], timeout_seconds=LIMIT)
    result, elapsed = timed(scorer.score, ["p"] * 3, ["slow", "a", "b"], {})
    assert elapsed < 2 * LIMIT + SLACK  # not one LIMIT per sample
    assert result.per_reward["hangs_on_slow"] == [0.0, 0.0, 0.0]
    assert result.failures["timeout"] == 3
    assert "sample 0 did not return" in result.first_tracebacks["timeout"]


def test_a_reward_that_keeps_hanging_stops_being_called(hung, monkeypatch):
    monkeypatch.setattr(scoring, "MAX_ABANDONED_THREADS", 2)
    scorer = RewardScorer([RewardSpec("hangs"), RewardSpec("ones")], timeout_seconds=LIMIT)
    scorer.score(["p"] * 2, ["a", "b"], {})  # the batch + 2 retries abandoned: 3 threads still running
    assert scorer.abandoned_threads == 3
    result, elapsed = timed(scorer.score, ["p"] * 2, ["a", "b"], {})
    assert elapsed < LIMIT  # not called at all: no new thread, no waiting
    assert scorer.abandoned_threads == 3
    assert result.per_reward == {"hangs": [0.0, 0.0], "ones": [1.0, 1.0]}
    assert result.failures["timeout"] == 2 and "still running" in result.first_tracebacks["timeout"]


def test_without_timeout_no_threads_and_same_results(hung):
    specs = [RewardSpec("records_thread"), RewardSpec("arithmetic_exact"), RewardSpec("ones", weight=0.5)]
    args = (["1+1=", "2+2="], ["2", "5"], {"answer": ["2", "4"]})
    direct = RewardScorer(specs).score(*args)
    assert hung == [threading.main_thread()]
    threaded = RewardScorer(specs, timeout_seconds=10.0).score(*args)
    assert hung[1] is not threading.main_thread()
    assert direct == threaded
    assert direct.failures == dict.fromkeys(KINDS, 0)


def test_exceptions_and_bad_values_behave_the_same_with_a_timeout(hung):
    scorer = RewardScorer([RewardSpec("raises_on_batch_hangs_on_slow"), RewardSpec("arithmetic_exact")],
                          timeout_seconds=5.0)
    result = scorer.score(["p"] * 2, ["a", "b"], {})  # no 'answer' column: arithmetic_exact raises
    assert result.per_reward == {"raises_on_batch_hangs_on_slow": [2.0, 2.0], "arithmetic_exact": [0.0, 0.0]}
    assert result.failures == {**dict.fromkeys(KINDS, 0), "exception": 2}
    assert "answer" in result.first_tracebacks["exception"]


def test_non_exception_base_exceptions_still_propagate(hung):
    with pytest.raises(SystemExit):
        RewardScorer([RewardSpec("exits")]).score(["p"], ["c"], {})
    with pytest.raises(SystemExit):  # raised in a worker thread, re-raised in the caller
        RewardScorer([RewardSpec("exits")], timeout_seconds=5.0).score(["p"], ["c"], {})


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf, "soon"])
def test_timeout_seconds_must_be_positive(bad):
    with pytest.raises(ValueError):
        RewardScorer([RewardSpec("length_penalty")], timeout_seconds=bad)


def test_failure_kinds_include_timeout():
    assert set(scoring.FAILURE_KINDS) == KINDS
    assert set(RewardScorer([RewardSpec("length_penalty")]).score(["p"], ["c"]).failures) == KINDS


# --- the sandbox --------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie is dead, just not yet reaped by init


def _wait_dead(pids, within=3.0) -> list[int]:
    """The run's processes still alive after ``within`` seconds: ``pids`` as the program printed them, or, in
    the jail (where a program sees its own PID namespace's numbers), every process of the jail's user."""
    if sandbox.jail_isolation():
        uid = sandbox.jail_user()[0]
        alive = lambda: _processes_of_uid(uid)  # noqa: E731
    else:
        alive = lambda: [p for p in pids if _alive(p)]  # noqa: E731
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and alive():
        time.sleep(0.02)
    return alive()


def _processes_of_uid(uid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/status") as f:
                if any(line.split()[1] == str(uid) for line in f if line.startswith("Uid:")):
                    found.append(int(entry))
        except (OSError, ValueError):
            continue
    return found


@pytest.fixture
def listener():
    """A TCP server on the host's loopback: a connection from the sandbox would show up here."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.05)
    yield server
    server.close()


def _assert_no_connection(server):
    with pytest.raises(TimeoutError):
        server.accept()


def test_normal_code_runs_with_stdin_in_a_fresh_directory():
    code = "import os, sys\nprint(sys.stdin.read().upper())\nprint(os.getcwd())\nprint(sorted(os.environ))"
    result = run_python(code, stdin="hello")
    assert (result.returncode, result.timed_out, result.killed_reason, result.truncated) == (0, False, None, False)
    out, cwd, env = result.stdout.splitlines()
    assert out == "HELLO"
    assert os.path.basename(cwd).startswith("rl-sandbox-") and not os.path.exists(cwd)  # deleted afterwards
    assert env == "['HOME', 'LANG', 'PATH', 'TMPDIR']"

    failed = run_python("import sys\nprint('partial')\nraise ValueError('bad')")
    assert failed.returncode == 1 and failed.stdout == "partial\n" and "ValueError: bad" in failed.stderr
    assert failed.killed_reason is None and not failed.timed_out
    assert run_python("raise SystemExit(3)").returncode == 3


def test_limits_cannot_be_raised_from_inside():
    code = "import resource\nresource.setrlimit(resource.RLIMIT_CPU, (resource.RLIM_INFINITY,) * 2)"
    result = run_python(code)
    assert result.returncode == 1 and "ValueError: not allowed to raise maximum limit" in result.stderr
    caps = run_python("print(open('/proc/self/status').read())").stdout
    assert "CapEff:\t0000000000000000" in caps  # no capabilities, even with a root parent
    if os.geteuid() == 0 and sandbox_child.LIBC is not None:
        assert "CapBnd:\t0000000000000000" in caps  # and no way back to any by exec


def test_big_stdin_and_output_do_not_deadlock():
    result = run_python("import sys\ndata = sys.stdin.read()\nprint(data[::-1])", stdin="ab" * 300_000,
                        max_output_bytes=1_000_000)
    assert result.returncode == 0 and result.stdout == "ba" * 300_000 + "\n"


def test_infinite_loop_is_killed_at_the_wall_clock_limit():
    result, elapsed = timed(run_python, "while True:\n    pass", timeout_seconds=0.3, cpu_seconds=30)
    assert result.timed_out and result.killed_reason == "wall_timeout"
    assert result.returncode == -9
    assert elapsed < 5.0  # not the CPU limit's 30 s


def test_sleeping_forever_is_killed_at_the_wall_clock_limit():
    result, elapsed = timed(run_python, "import time\ntime.sleep(60)", timeout_seconds=0.3)
    assert result.timed_out and result.killed_reason == "wall_timeout" and elapsed < 5.0  # not the 60 s sleep


def test_infinite_loop_is_killed_by_the_cpu_limit():
    result, elapsed = timed(run_python, "while True:\n    pass", timeout_seconds=30, cpu_seconds=1)
    assert result.timed_out and result.killed_reason == "cpu_limit"
    assert result.returncode in (-24, -9)  # SIGXCPU at the soft limit (SIGKILL at the hard one)
    assert elapsed < 20.0  # 1 s of CPU (longer on the wall when the cores are shared), not the 30 s wall limit


def test_memory_bomb_is_stopped_by_rlimit_as():
    code = "blocks = []\nwhile True:\n    blocks.append(bytearray(10 ** 7))"
    result = run_python(code, memory_mb=256)
    assert result.returncode == 1 and result.killed_reason == "memory_limit"
    assert "MemoryError" in result.stderr and not result.timed_out
    one_huge = run_python("x = bytearray(2 ** 40)")
    assert one_huge.killed_reason == "memory_limit"


def test_network_attempt_fails_inside_the_sandbox(listener):
    port = listener.getsockname()[1]
    code = f"""
import socket
for address in [("127.0.0.1", 9), ("127.0.0.1", {port}), ("example.com", 80)]:
    try:
        socket.create_connection(address, timeout=2)
        print("connected", address)
    except OSError as e:
        print("failed", type(e).__name__)
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["failed PermissionError"] * 3  # the in-process guard answers first
    _assert_no_connection(listener)


BYPASS = """
import subprocess, sys
child = 'import socket; socket.create_connection(("127.0.0.1", {port}), timeout=2); print("connected")'
run = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True)
print(run.stdout.strip() or run.stderr.strip().splitlines()[-1])
"""


@pytest.mark.skipif(sandbox.network_isolation() != "namespace",
                    reason="no network namespace here (unshare(CLONE_NEWNET) refused): only the in-process guard")
def test_kernel_namespace_stops_what_the_guard_cannot(listener):
    # A fresh interpreter started by the sandboxed code has no guard; the namespace still holds.
    result = run_python(BYPASS.format(port=listener.getsockname()[1]))
    assert result.returncode == 0, result.stderr
    assert "Network is unreachable" in result.stdout
    _assert_no_connection(listener)


def test_user_namespace_variant(listener, monkeypatch):
    flags = sandbox_child.CLONE_NEWUSER | sandbox_child.CLONE_NEWNET
    if sandbox_child.LIBC is None or not sandbox_child.namespace_works(flags):
        pytest.skip("user + network namespaces are not permitted here")
    monkeypatch.setattr(sandbox_child, "_NET_FLAGS", flags)
    result = run_python(BYPASS.format(port=listener.getsockname()[1]) + "\nimport os\nprint(os.getuid())")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["OSError: [Errno 101] Network is unreachable", "65534"]
    _assert_no_connection(listener)


def test_guard_alone_is_in_process_only(listener, monkeypatch):
    """Without a namespace, the guard stops the program's own sockets -- and nothing else."""
    monkeypatch.setattr(sandbox_child, "_NET_FLAGS", 0)
    assert sandbox.network_isolation() == "guard"
    port = listener.getsockname()[1]
    own = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}))")
    assert own.returncode == 1 and "PermissionError" in own.stderr
    assert "network access is disabled" in own.stderr
    _assert_no_connection(listener)
    local = run_python("import asyncio, socket\na, b = socket.socketpair()\nasyncio.run(asyncio.sleep(0))\nprint('ok')")
    assert local.stdout == "ok\n"  # local socket pairs (asyncio's self-pipe) still work

    escaped = run_python(BYPASS.format(port=port))
    assert escaped.stdout.strip() == "connected"  # a child process is not guarded: documented
    listener.accept()[0].close()


def test_output_is_truncated():
    code = "import sys\nprint('x' * 200_000)\nprint('e' * 5000, file=sys.stderr)\nprint('done', file=sys.stderr)"
    result = run_python(code, max_output_bytes=1000)
    assert result.returncode == 0 and result.truncated
    assert result.stdout == "x" * 1000 and result.stderr == "e" * 1000


def test_leftover_processes_are_killed_when_the_program_ends():
    code = """
import os, time
for _ in range(5):
    pid = os.fork()
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    print(pid, flush=True)
"""
    result, elapsed = timed(run_python, code, timeout_seconds=10)
    pids = [int(line) for line in result.stdout.split()]
    assert result.returncode == 0 and len(pids) == 5 and not result.timed_out
    assert elapsed < 6.0  # the children hold stdout open; they do not make the run wait for the 10 s deadline
    assert _wait_dead(pids) == []


def test_fork_bomb_is_contained():
    if not sandbox.nproc_limit_enforced():
        pytest.skip("RLIMIT_NPROC is not enforced for this user (running as root: Linux exempts uid 0 and "
                    "CAP_SYS_ADMIN/CAP_SYS_RESOURCE holders), so the sandbox cannot cap the number of processes; "
                    "a fork bomb is bounded only by the wall-clock kill of the process group")
    code = """
import os, time
n = 0
try:
    while n < 10_000:
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        n += 1
except OSError as e:
    print(n, type(e).__name__, flush=True)
"""
    result = run_python(code, max_processes=8, timeout_seconds=10)
    forks, error = result.stdout.split()
    assert error == "BlockingIOError" and int(forks) <= 7  # 8 tasks at most, the program included


def test_bad_limits_are_refused():
    for bad in [{"timeout_seconds": 0}, {"cpu_seconds": 0}, {"memory_mb": -1}, {"max_processes": 0}]:
        with pytest.raises(ValueError):
            run_python("pass", **bad)


# --- the python_tests reward ----------------------------------------------------------------------------

GOOD = "Here you go:\n```python\ndef fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n```\nDone."
TESTS = "assert fib(0) == 0\nassert fib(10) == 55"


def test_python_tests_reward(monkeypatch):
    monkeypatch.setitem(builtin.PYTHON_TESTS_LIMITS, "timeout_seconds", 0.3)
    completions = [
        GOOD,
        "def fib(n):\n    return n",  # no fence: the whole text is the code; wrong answer
        "```python\ndef fib(n) return 1\n```",  # syntax error
        "```python\ndef fib(n):\n    while True:\n        pass\n```",  # never returns: killed, 0.0
        "```python\nimport urllib.request\nurllib.request.urlopen('http://example.com')\ndef fib(n): return 0\n```",
        GOOD,
        GOOD,
        None,
    ]
    tests = [TESTS, TESTS, TESTS, TESTS, TESTS, ["assert fib(1) == 1", "assert fib(2) == 1"], "  ", TESTS]
    scores = python_tests(["Write fib."] * len(completions), completions, tests=tests)
    assert scores == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]


def test_python_tests_through_the_scorer():
    scorer = RewardScorer([RewardSpec("python_tests")], timeout_seconds=30.0)
    result = scorer.score(["q", "q"], [GOOD, GOOD.replace("n - 2", "n - 3")], {"tests": [TESTS, TESTS]})
    assert result.total == [1.0, 0.0] and result.failures == dict.fromkeys(KINDS, 0)


def test_extract_python():
    assert extract_python("```py\na = 1\n```") == "a = 1\n"
    assert extract_python("```\nplain = 1\n```") == "plain = 1\n"
    assert extract_python("```\nbare\n```\n```python\ntagged\n```") == "tagged\n"
    assert extract_python("no fence") == "no fence"


def test_a_process_that_left_the_process_group_is_killed_too():
    """setsid() takes a process out of the group the end-of-run kill reaches; the run's pids cgroup still holds it."""
    from rewards.sandbox_cgroup import PidsCgroup

    probe = PidsCgroup.create(4)
    if probe is None:
        pytest.skip("no writable pids cgroup here (not root, no delegated cgroup): setsid escapers outlive the run")
    probe.remove()
    code = """
import os, time
pid = os.fork()
if pid == 0:
    os.setsid()
    time.sleep(60)
    os._exit(0)
print(pid, flush=True)
"""
    result = run_python(code, timeout_seconds=10)
    [pid] = [int(line) for line in result.stdout.split()]
    assert result.returncode == 0 and _wait_dead([pid]) == []
