"""What the sandbox's child process does between fork and exec, and which of it the kernel allows here: a
network namespace (plain, or with a user namespace for unprivileged users), for a root parent the jail
(``rewards.sandbox_jail``), resource limits, every capability dropped and no new privileges.
``rewards.sandbox`` runs programs with it (``rewards.sandbox_process`` is the parent's side)."""

from __future__ import annotations

import ctypes
import os
import resource
import subprocess
import sys
import threading
from typing import Callable

from rewards.sandbox_jail import Jail, drop_to_user, enter, libc_mount

# Linux constants (sched.h, linux/prctl.h); the network namespace is Linux-only.
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38

LIBC = None
if sys.platform.startswith("linux"):
    try:
        LIBC = ctypes.CDLL(None, use_errno=True)  # the C library this interpreter is linked with
        LIBC.unshare, LIBC.prctl  # noqa: B018 -- both must exist
    except (OSError, AttributeError):
        LIBC = None


def _cap_last() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 40


_CAPS = tuple(range(_cap_last() + 1))


def make_preexec(limits: list[tuple[int, int, int | None]], net_flags: int,
                  cgroup_procs: str | None = None, jail: "Jail | None" = None) -> Callable[[], None]:
    """The function run in the child between fork and exec. Everything it uses exists already. With a
    ``jail`` (root only), the program runs in it (``rewards.sandbox_jail``) as its unprivileged user."""
    hard_limits = []
    for res, soft, hard in limits:
        _, current_hard = resource.getrlimit(res)
        hard = soft if hard is None else hard
        if current_hard != resource.RLIM_INFINITY:  # lowering only: never ask for more than allowed
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        hard_limits.append((res, (soft, hard)))
    # Looked up here, in the parent: the child should only make calls.
    unshare = LIBC.unshare if LIBC is not None and (net_flags or jail) else None
    prctl = LIBC.prctl if LIBC is not None else None
    mount = libc_mount() if jail is not None else None

    def join_cgroup(fd: int) -> None:
        try:
            os.write(fd, b"0")  # "0": the writing process itself
        finally:
            os.close(fd)

    def preexec() -> None:
        # First: every task the program starts is counted against pids.max. In the jail, opened now (the
        # path is outside it) and joined by the namespace's init, so the process left outside is not counted.
        fd = os.open(cgroup_procs, os.O_WRONLY) if cgroup_procs is not None else None
        if jail is None and fd is not None:
            join_cgroup(fd)
        if jail is not None:  # namespaces, the init fork and the file view; needs CAP_SYS_ADMIN, so first
            enter(jail, unshare, mount, net_flags & ~CLONE_NEWUSER, after_fork=(lambda: join_cgroup(fd)) if fd is not None else None)
        elif unshare is not None:
            if unshare(net_flags) != 0:  # before dropping capabilities: it needs CAP_SYS_ADMIN
                raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET) failed")
        for res, value in hard_limits:
            try:
                resource.setrlimit(res, value)
            except (ValueError, OSError):
                if res != resource.RLIMIT_NPROC:  # NPROC "where it works"; the others must hold
                    raise
        if prctl is not None:
            for cap in _CAPS:  # fails harmlessly (EPERM/EINVAL) where there is nothing to drop
                prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)
            prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        if jail is not None:  # last: setuid clears the capabilities the steps above used
            drop_to_user(jail)

    return preexec


PROBE_LOCK = threading.RLock()  # nproc_limit_enforced -> run_python -> _net_flags
_NET_FLAGS: int | None = None  # 0: no namespace available


def net_flags() -> int:
    """The ``unshare`` flags that work here, tried once: a network namespace, else a user +
    network namespace (unprivileged users, where allowed), else 0 (guard only)."""
    global _NET_FLAGS
    with PROBE_LOCK:
        if _NET_FLAGS is None:
            _NET_FLAGS = 0
            if LIBC is not None:
                for flags in (CLONE_NEWNET, CLONE_NEWUSER | CLONE_NEWNET):
                    if namespace_works(flags):
                        _NET_FLAGS = flags
                        break
        return _NET_FLAGS


def namespace_works(flags: int) -> bool:
    try:
        probe = subprocess.run(
            [sys.executable, "-I", "-c", "import socket; print(len(socket.if_nameindex()))"],
            preexec_fn=make_preexec([], flags), stdin=subprocess.DEVNULL, capture_output=True,
            timeout=30, env={"PATH": "/usr/bin:/bin"},
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.returncode == 0 and probe.stdout.strip() == b"1"  # only the loopback interface
