"""Model-written code run by a root trainer cannot touch the run: in the sandbox's jail it is an unprivileged
user in its own PID and mount namespaces (``rewards/sandbox_jail.py``). Each attack fails, the files and the
process it aimed at are still there, and the next sandboxed program runs as before."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from rewards import sandbox
from rewards.sandbox import run_python

pytestmark = pytest.mark.skipif(not sandbox.jail_isolation(),
                                reason="the sandbox jail needs root and mount + PID namespaces")


@pytest.fixture
def run_dir(tmp_path):
    """A run directory as the trainer leaves it: a checkpoint and a secret, world-readable like most files."""
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "secret.txt").write_text("api-key")
    os.chmod(tmp_path, 0o755)
    os.chmod(tmp_path / "secret.txt", 0o644)
    return tmp_path


def attempt(action: str) -> str:
    """The program's verdict on ``action``: 'done', or the error it met."""
    code = f"""
import os, shutil, signal
try:
    {action}
    print("done")
except Exception as e:
    print(type(e).__name__)
"""
    result = run_python(code, timeout_seconds=10)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_it_runs_as_an_unprivileged_user_as_its_own_namespaces_init():
    result = run_python("import os; print(os.getuid(), os.geteuid(), os.getgid(), os.getpid(), len(os.listdir('/proc')))")
    uid, euid, gid, pid, _ = result.stdout.split()
    assert (int(uid), int(euid), int(gid)) == (sandbox.jail_user()[0], sandbox.jail_user()[0], sandbox.jail_user()[1])
    assert pid == "1"  # it sees no process but its own


def test_deleting_the_run_directory_fails_and_the_files_stay(run_dir):
    assert attempt(f"shutil.rmtree({str(run_dir)!r})") == "FileNotFoundError"  # not even visible
    assert attempt(f"os.remove({str(run_dir / 'checkpoint' / 'model.safetensors')!r})") == "FileNotFoundError"
    assert (run_dir / "checkpoint" / "model.safetensors").read_bytes() == b"weights"


def test_reading_a_file_outside_the_scratch_directory_fails(run_dir):
    assert attempt(f"open({str(run_dir / 'secret.txt')!r}).read()") == "FileNotFoundError"
    assert attempt("open('/etc/hostname').read()") == "FileNotFoundError"  # /etc is not in the jail
    assert attempt("open('/root/.bashrc').read()") in ("FileNotFoundError", "PermissionError")
    # The system and Python files it may read are read-only, and so is the jail's own root.
    assert attempt("open('/usr/lib/planted', 'w').write('x')") in ("OSError", "PermissionError")
    assert attempt("open('/planted', 'w').write('x')") in ("OSError", "PermissionError")
    assert attempt("open('scratch.txt', 'w').write('x')") == "done"  # its working directory is its own


def test_killing_the_trainer_fails_and_the_trainer_goes_on():
    # A stand-in for the trainer: a root process that is not the sandbox's parent.
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert attempt(f"os.kill({victim.pid}, signal.SIGKILL)") in ("ProcessLookupError", "PermissionError")
        assert attempt(f"os.kill({os.getpid()}, signal.SIGKILL)") in ("ProcessLookupError", "PermissionError")
        # Every process it may signal: none but its own (ESRCH: no other process to signal)
        assert attempt("os.kill(-1, signal.SIGKILL)") in ("done", "ProcessLookupError")
        assert victim.poll() is None  # still running, and so is this test process
    finally:
        victim.kill()
        victim.wait()
    assert run_python("print(6 * 7)").stdout == "42\n"  # the next program runs as before
