"""Run generated Python in a separate, resource-limited process: for rewards that execute model output.

:func:`run_python` runs ``code`` in a fresh ``python -I`` subprocess and returns a
:class:`SandboxResult`; it never lets the code run past its limits or print without bound:

=================  ==============================================================================
limit              how
=================  ==============================================================================
wall clock         ``timeout_seconds``; then the whole process group is killed (``SIGKILL``)
CPU time           ``RLIMIT_CPU`` = ``cpu_seconds`` (``SIGXCPU``), ``SIGKILL`` one second later
memory             ``RLIMIT_AS`` = ``memory_mb`` MiB of address space (allocations raise ``MemoryError``)
files              ``RLIMIT_FSIZE`` (:data:`FILE_SIZE_LIMIT_BYTES` per file), ``RLIMIT_CORE`` = 0,
                   a fresh temporary directory as cwd (deleted afterwards), a minimal environment
processes          at most ``max_processes`` tasks (processes and threads) for the run: a pids cgroup
                   where one can be made (root included), else ``RLIMIT_NPROC`` (not for root), see
                   :func:`nproc_limit_enforced`
output             the first ``max_output_bytes`` of stdout and of stderr are kept; the rest is
                   read and dropped (``truncated``), so a chatty program cannot fill memory
network            see below
=================  ==============================================================================

Limits are set in ``preexec_fn`` (after ``fork``, before ``exec``) as hard limits, which the
child cannot raise back: it has no ``CAP_SYS_RESOURCE`` (see the capabilities below). Every descendant inherits them (per process,
except ``RLIMIT_NPROC``, which counts the user's tasks), and every descendant that stays in
the process group is killed when the run ends, even when the main program exited normally.

Network
-------
Two layers, the first only where the kernel allows it (probed once, :func:`network_isolation`):

1. ``"namespace"``: the child enters a new, empty network namespace (``unshare(CLONE_NEWNET)``,
   the system call behind ``unshare --net``; as an unprivileged user together with a new user
   namespace, like ``unshare -rn``). It has only a loopback interface, which is down: no
   connection to anything, the host's own ``127.0.0.1`` included, from the program or from any
   process it starts. This is a kernel guarantee, with one caveat: it holds against a program
   that cannot re-enter the host namespace with ``setns``, which needs ``CAP_SYS_ADMIN``, so the
   child also drops every capability from its bounding set (a root parent's child then runs as
   ``nobody`` in the jail, see below) and sets ``no_new_privs``. Unix-domain sockets bound to file
   paths are not scoped by network namespaces: code that gets past the guard below can still
   reach a local service listening on such a path (a Docker or D-Bus socket, say) if file
   permissions let it.
2. ``"guard"`` (always installed, and all there is when the namespace is unavailable): a
   bootstrap run before the user code replaces ``socket.socket``, ``socket.create_connection``,
   ``socket.create_server`` and the resolver functions (``getaddrinfo``, ...) with ones that
   raise ``PermissionError``. This is a best-effort, in-process guard against *accidental*
   network use (``urllib``, ``requests``, ``http.client``, ``asyncio`` connections), not a
   sandbox: code that starts another program (``subprocess``, ``os.system``), calls libc through
   ``ctypes``, or digs the original socket type out of an object gets past it.
   ``socket.socketpair()`` keeps working (it is local), so ``asyncio`` event loops still start.

Who it runs as
--------------
A root trainer (CI, most containers) runs the program in a jail (``rewards.sandbox_jail``, probed once by
:func:`jail_isolation`): as ``nobody``, in its own PID and mount namespaces, seeing only read-only system and
Python files and its scratch directory. It cannot read or delete the run's files or signal the trainer, and
every process it starts dies with it.

Where the trainer is not root, the jail cannot be built and the child runs as the trainer's user: it can
then read and write that user's files and signal that user's processes (the trainer included), and a process
that calls ``setsid`` leaves the process group and survives the end-of-run kill where no pids cgroup could
be made (it keeps its CPU, memory and file limits). This mode guards against accidents and runaway generated
code (infinite loops, memory blow-ups, fork loops where ``RLIMIT_NPROC`` works, stray network calls), not
against a hostile program. Even the jail shares the kernel with the trainer: for hostile code at scale, run
the sandbox inside a VM.

``preexec_fn`` is documented as unsafe with threads in the parent (the child could deadlock
before ``exec``); the function here only makes system calls through objects created
beforehand -- no imports, no allocation-heavy work, no locks -- which keeps that risk small.

>>> result = run_python("import sys; print(sum(int(x) for x in sys.stdin.read().split()))", stdin="1 2 3")
>>> result.returncode, result.stdout, result.timed_out, result.killed_reason
(0, '6\\n', False, None)
"""

from __future__ import annotations

import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

# The parent's side of a run (stdin/output, the deadline kill, reaping) is in rewards.sandbox_process.
from rewards.sandbox_cgroup import PidsCgroup
from rewards.sandbox_child import PROBE_LOCK, make_preexec, net_flags
from rewards.sandbox_jail import jail_user, plan
from rewards.sandbox_process import communicate, killed_reason, reap

__all__ = [
    "SandboxResult",
    "run_python",
    "network_isolation",
    "jail_isolation",
    "nproc_limit_enforced",
    "FILE_SIZE_LIMIT_BYTES",
]

FILE_SIZE_LIMIT_BYTES = 16 * 1024 * 1024
"""``RLIMIT_FSIZE`` of the child: no single file it writes grows past this (pipes are not files)."""



@dataclass
class SandboxResult:
    """What happened to one :func:`run_python` call.

    Attributes:
        returncode: the exit status; negative ``-N`` when the process died of signal ``N``.
        stdout, stderr: decoded as UTF-8 (undecodable bytes replaced), each cut to
            ``max_output_bytes`` bytes.
        timed_out: the run was stopped by a time limit: the wall clock or ``RLIMIT_CPU``.
        killed_reason: why the program did not finish on its own, or None:
            ``"wall_timeout"`` (killed by :func:`run_python` at ``timeout_seconds``),
            ``"cpu_limit"`` (``SIGXCPU``/``SIGKILL`` from ``RLIMIT_CPU``),
            ``"memory_limit"`` (it exited on a ``MemoryError``, the usual effect of
            ``RLIMIT_AS``; recognised from stderr), or ``"signal:SIGxxx"`` (another signal).
        truncated: stdout or stderr was longer than ``max_output_bytes``.
    """

    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    killed_reason: str | None
    truncated: bool = False


def run_python(
    code: str,
    stdin: str = "",
    *,
    timeout_seconds: float = 5.0,
    cpu_seconds: int = 5,
    memory_mb: int = 512,
    max_output_bytes: int = 65536,
    max_processes: int = 64,
) -> SandboxResult:
    """Run ``code`` as a Python program in a fresh, limited subprocess (see the module docstring).

    The program is ``main.py`` in a new temporary directory that is its working directory,
    run by this interpreter (``sys.executable``, so the same installed packages) in isolated
    mode (``-I``: no ``PYTHON*`` variables, no user site, no script directory on ``sys.path``),
    with an environment of only ``PATH``, ``HOME``/``TMPDIR`` (the temporary directory) and
    ``LANG``. ``stdin`` is its standard input.

    Args:
        code: the program's source.
        stdin: its standard input (UTF-8).
        timeout_seconds: wall-clock limit; the process group is killed at this time.
        cpu_seconds: CPU-time limit of each process (``RLIMIT_CPU``, rounded up to whole seconds).
        memory_mb: address-space limit of each process (``RLIMIT_AS``). A Python process
            starts at about 30 MiB; each thread reserves stack and a malloc arena, so
            threaded programs need more.
        max_output_bytes: bytes kept of stdout and of stderr each.
        max_processes: tasks (processes + threads) the run may have at once, itself
            included, where ``RLIMIT_NPROC`` is enforced (see :func:`nproc_limit_enforced`).

    Raises:
        ValueError: a limit is not positive.
        OSError: the subprocess could not be started (an infrastructure problem, not a
            property of ``code``).
    """
    if not timeout_seconds > 0 or not cpu_seconds > 0 or not memory_mb > 0 or max_output_bytes < 0 or max_processes < 1:
        raise ValueError(
            f"run_python limits must be positive: timeout_seconds={timeout_seconds!r}, cpu_seconds={cpu_seconds!r}, "
            f"memory_mb={memory_mb!r}, max_output_bytes={max_output_bytes!r}, max_processes={max_processes!r}"
        )
    return _run(code, stdin, timeout_seconds, cpu_seconds, memory_mb, max_output_bytes, max_processes, jailed=jail_isolation())


def _run(code: str, stdin: str, timeout_seconds: float, cpu_seconds: float, memory_mb: int, max_output_bytes: int,
         max_processes: int, jailed: bool) -> SandboxResult:
    cpu = max(1, math.ceil(cpu_seconds))  # RLIMIT_CPU counts whole seconds
    namespace_flags = net_flags()
    workdir = tempfile.mkdtemp(prefix="rl-sandbox-")
    jail_root = tempfile.mkdtemp(prefix="rl-sandbox-root-") if jailed else None
    cgroup = PidsCgroup.create(max_processes)  # caps tasks where RLIMIT_NPROC cannot (root); None where unavailable
    try:
        with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8", errors="replace") as f:
            f.write(code)
        jail = plan(jail_root, workdir) if jailed else None
        if jail is not None:  # the scratch directory is the jail user's
            for path in (workdir, os.path.join(workdir, "main.py")):
                os.chown(path, jail.uid, jail.gid)
        limits = [
            (resource.RLIMIT_CPU, cpu, cpu + 1),
            (resource.RLIMIT_AS, int(memory_mb) * 1024 * 1024, None),
            (resource.RLIMIT_FSIZE, FILE_SIZE_LIMIT_BYTES, None),
            (resource.RLIMIT_CORE, 0, None),
            # RLIMIT_NPROC counts every task of the real user, not just this run's: allow
            # what the user already has plus max_processes.
            (resource.RLIMIT_NPROC, _tasks_of_user(jail.uid if jail else os.getuid()) + int(max_processes), None),
        ]
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-c", _BOOTSTRAP],
                cwd=workdir,
                env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"},
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,  # its own process group: killed as a whole
                close_fds=True,
                preexec_fn=make_preexec(limits, namespace_flags, cgroup.procs if cgroup else None, jail),
            )
        except subprocess.SubprocessError as e:  # preexec_fn failed: no namespace or limits -> do not run
            raise OSError(f"could not start the sandboxed process (namespace or limits refused): {e}") from e
        deadline = time.monotonic() + timeout_seconds
        stdout, stderr, truncated, wall_killed = communicate(
            proc, stdin.encode("utf-8", errors="replace"), deadline, max_output_bytes
        )
        cpu_used = reap(proc)
    finally:
        if cgroup is not None:
            cgroup.remove()  # every process the run started, those that left its process group too
        shutil.rmtree(workdir, ignore_errors=True)
        if jail_root is not None:
            os.rmdir(jail_root)  # the jail's tmpfs lived in the child's mount namespace: empty here

    out_text = stdout.decode("utf-8", errors="replace")
    err_text = stderr.decode("utf-8", errors="replace")
    reason = killed_reason(proc.returncode, err_text, wall_killed, cpu_used, cpu)
    return SandboxResult(
        returncode=proc.returncode,
        stdout=out_text,
        stderr=err_text,
        timed_out=reason in ("wall_timeout", "cpu_limit"),
        killed_reason=reason,
        truncated=truncated,
    )


def jail_isolation() -> bool:
    """Whether :func:`run_python` runs programs in the jail (``rewards.sandbox_jail``: an unprivileged user in
    its own PID and mount namespaces, seeing only the system's read-only files and its scratch directory).
    Only a root process can build it; probed once by running a program in it."""
    global _JAIL
    with PROBE_LOCK:
        if _JAIL is None:
            _JAIL = False
            if os.geteuid() == 0 and sys.platform.startswith("linux"):
                try:
                    probe = _run(_JAIL_PROBE, "", 10.0, 5, 512, 4096, 8, jailed=True)
                except OSError:
                    probe = None
                _JAIL = probe is not None and probe.stdout.split() == [str(jail_user()[0]), "1", "False"]
        return _JAIL


def network_isolation() -> str:
    """How :func:`run_python` cuts the network here: ``"namespace"`` (a kernel network
    namespace, plus the in-process guard) or ``"guard"`` (the in-process guard only).
    Probed once per process by starting a child in a new namespace."""
    return "namespace" if net_flags() else "guard"


def nproc_limit_enforced() -> bool:
    """Whether :func:`run_python`'s ``max_processes`` holds here, probed once: a sandboxed program with
    ``max_processes=1`` tries to fork.

    Two mechanisms: ``RLIMIT_NPROC``, which Linux does not apply to uid 0 (nor to holders of
    ``CAP_SYS_RESOURCE``/``CAP_SYS_ADMIN`` at fork time), and a pids cgroup per run
    (``rewards/sandbox_cgroup.py``), which binds root too where this process can create one. False when
    neither works (root without a writable pids cgroup): a fork loop is then bounded only by the wall-clock
    kill of the process group, the per-process CPU and memory limits, and the machine's ``pid_max``.
    """
    global _NPROC_ENFORCED
    with PROBE_LOCK:
        if _NPROC_ENFORCED is None:
            probe = run_python(_NPROC_PROBE, timeout_seconds=10.0, max_processes=1)
            _NPROC_ENFORCED = probe.stdout.strip() == "limited"
        return _NPROC_ENFORCED


# --- the child: bootstrap and preexec ------------------------------------------------------------

# Run with `python -I -c`: install the network guard, then run main.py as __main__.
_BOOTSTRAP = r'''
def _rl_sandbox_prepare():
    globals().pop("_rl_sandbox_prepare")
    import os, socket, _socket, sys

    def blocked(*args, **kwargs):
        raise PermissionError(1, "network access is disabled in the reward sandbox")

    class socket_(socket.socket):
        __slots__ = ()

        def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
            if fileno is None:  # wrapping an existing descriptor (socketpair) is not network access
                blocked()
            super().__init__(family, type, proto, fileno)

    socket_.__name__ = socket_.__qualname__ = "socket"
    socket.socket = socket.SocketType = socket_  # not _socket.socket: socket.socket.__init__ calls it
    for name in ("create_connection", "create_server", "getaddrinfo", "gethostbyname", "gethostbyname_ex",
                 "gethostbyaddr", "getnameinfo"):
        setattr(socket, name, blocked)
        if hasattr(_socket, name):
            setattr(_socket, name, blocked)
    path = os.path.abspath("main.py")
    sys.argv[:] = [path]
    globals()["__file__"] = path
    with open(path, encoding="utf-8") as f:
        return compile(f.read(), path, "exec")
exec(_rl_sandbox_prepare())
'''

_NPROC_PROBE = """
import os
try:
    pid = os.fork()
except OSError:
    print("limited")
else:
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    print("unlimited")
"""

# --- probes -------------------------------------------------------------------------------------

_NPROC_ENFORCED: bool | None = None
_JAIL: bool | None = None
# uid, pid (1: its namespace's init) and whether anything beside the scratch directory shows in its parent
_JAIL_PROBE = "import os; print(os.getuid(), os.getpid(), os.listdir('..') != [os.path.basename(os.getcwd())])"


def _tasks_of_user(uid: int) -> int:
    """Tasks (threads) whose real uid is ``uid``: what ``RLIMIT_NPROC`` counts. 0 without /proc."""
    total = 0
    try:
        entries = os.scandir("/proc")
    except OSError:
        return 0
    with entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/status", "rb") as f:
                    status = f.read()
            except OSError:
                continue  # gone meanwhile
            uid_field = threads = None
            for line in status.splitlines():
                if line.startswith(b"Uid:"):
                    uid_field = line.split()[1]
                elif line.startswith(b"Threads:"):
                    threads = line.split()[1]
            if uid_field is not None and int(uid_field) == uid:
                total += int(threads) if threads is not None else 1
    return total
