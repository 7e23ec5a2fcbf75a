"""The parent's side of one sandboxed run (see :mod:`rewards.sandbox`): feed its stdin, keep a bounded
part of its output, kill its process group at the deadline, reap it, and name why it ended.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import time

_KILL_GRACE_SECONDS = 0.5  # after the main process ended: how long to wait for its pipes to close
_POLL_SECONDS = 0.1  # how often the reader checks whether the main process ended


def _write_some(sel: selectors.BaseSelector, stream, pending: memoryview) -> memoryview:
    """Write what the stdin pipe takes now; close it once all is written (or the program stopped reading).
    Returns what is left to write."""
    try:
        written = os.write(stream.fileno(), pending[:65536])
    except BrokenPipeError:
        written = len(pending)  # it stopped reading: drop the rest
    except BlockingIOError:
        return pending
    pending = pending[written:]
    if not pending:
        sel.unregister(stream)
        stream.close()
    return pending


def _read_some(sel: selectors.BaseSelector, stream, buffer: bytearray, limit: int) -> bool:
    """Read what an output pipe holds into ``buffer``, keeping at most ``limit`` bytes; True if some were dropped."""
    chunk = os.read(stream.fileno(), 65536)
    if not chunk:
        sel.unregister(stream)
        return False
    room = limit - len(buffer)
    buffer += chunk[: max(room, 0)]
    return len(chunk) > room


def communicate(proc: subprocess.Popen, data: bytes, deadline: float, limit: int) -> tuple[bytes, bytes, bool, bool]:
    """Feed stdin and read stdout/stderr until the program ends or ``deadline``; then kill
    whatever is left of its process group. Returns (stdout, stderr, truncated, wall_killed)."""
    buffers = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    truncated = False
    wall_killed = False
    sel = selectors.DefaultSelector()
    for stream in buffers:
        sel.register(stream, selectors.EVENT_READ)
    pending = memoryview(data)
    if proc.stdin is not None:
        os.set_blocking(proc.stdin.fileno(), False)
        sel.register(proc.stdin, selectors.EVENT_WRITE)
    kill_deadline = None  # set once the group is killed: pipes get this long to close
    try:
        # 1. Until stdout and stderr close (normally: the program exited), the deadline passes,
        #    or the main process ends while a descendant still holds a pipe.
        while sel.get_map():
            now = time.monotonic()
            if kill_deadline is None and (now >= deadline or _has_exited(proc.pid)):
                wall_killed = now >= deadline and not _has_exited(proc.pid)
                _kill_group(proc.pid)
                kill_deadline = now + _KILL_GRACE_SECONDS
            if kill_deadline is not None and now >= kill_deadline:
                break  # a process that left the group still holds a pipe: stop reading
            wait = (kill_deadline if kill_deadline is not None else deadline) - now
            for key, _ in sel.select(timeout=max(0.0, min(wait, _POLL_SECONDS))):
                stream = key.fileobj
                if stream is proc.stdin:
                    pending = _write_some(sel, stream, pending)
                else:
                    truncated |= _read_some(sel, stream, buffers[stream], limit)
        # 2. Pipes closed on their own: wait for the exit itself (it follows the close at
        #    once, unless the program closed its output and runs on), up to the deadline.
        delay = 0.001
        while kill_deadline is None and not _has_exited(proc.pid):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                wall_killed = True
                break
            time.sleep(min(delay, remaining))
            delay = min(2 * delay, _POLL_SECONDS)
    finally:
        sel.close()
        _kill_group(proc.pid)  # descendants left in the group (or everything, on an error here)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None and not stream.closed:
                stream.close()
    return bytes(buffers[proc.stdout]), bytes(buffers[proc.stderr]), truncated, wall_killed


def _has_exited(pid: int) -> bool:
    """True once the main process has exited; it is left unreaped (WNOWAIT), so its pid -- and
    with it the process-group id -- cannot be reused before :func:`_kill_group`."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def reap(proc: subprocess.Popen) -> float:
    """Wait for the main process; set ``proc.returncode``; return its CPU seconds."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_utime + usage.ru_stime


def killed_reason(returncode: int, stderr: str, wall_killed: bool, cpu_used: float, cpu_seconds: float) -> str | None:
    """``SandboxResult.killed_reason`` of a finished run (see :class:`rewards.sandbox.SandboxResult`), or None."""
    if wall_killed:
        return "wall_timeout"
    if returncode == -signal.SIGXCPU or (returncode == -signal.SIGKILL and cpu_used >= cpu_seconds - 0.05):
        return "cpu_limit"
    if returncode < 0:
        try:
            return f"signal:{signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal:{-returncode}"
    if returncode != 0 and "MemoryError" in stderr[-2000:]:
        return "memory_limit"
    return None
