"""Where a root process can: run sandboxed code as an unprivileged user, in its own PID and mount namespaces,
seeing only a read-only view of the system and the Python installation plus its scratch directory.

Most training runs as root (CI, containers), and without this the program a model wrote would run as root
too: it could delete the run's checkpoints, kill the trainer or read any file. In the jail:

- **user**: ``nobody`` (uid/gid 65534, or that name's entry), no supplementary groups, every capability
  dropped from the bounding set and ``no_new_privs`` set: it cannot signal the trainer's processes, write a
  file it does not own, or regain privileges through a setuid program.
- **files**: a new mount namespace whose root is an empty tmpfs holding, at their usual paths, read-only
  binds of ``/usr`` (and the ``/bin``, ``/lib*`` links into it), of this interpreter's installation and
  virtual environment, four character devices (``null``, ``zero``, ``random``, ``urandom``), a ``/proc`` of
  its own PID namespace, and the scratch directory, the only writable place (owned by the jail's user).
  Nothing else exists there: not the run directory, not ``/root``, not ``/tmp``, not ``/etc``.
- **processes**: a new PID namespace whose init is the program: it sees only its own processes, and when
  it ends the kernel kills every process it started (``setsid`` escapers included). As a namespace's init it
  ignores signals it has no handler for that come from inside (``RLIMIT_CPU``'s ``SIGXCPU`` among them; the
  hard limit's ``SIGKILL`` one second later still ends it).

The child of ``Popen`` sets this up between fork and exec (``enter``), as root: ``unshare`` of the mount, PID
(and network) namespaces, then a ``fork``: the new process is the namespace's init and goes on to exec the
program; the first one stays outside, waits for it and exits as it did (its exit status, or the same signal).

Where the process is not root, or the kernel refuses a step (probed once by ``rewards.sandbox``), the
sandbox runs without the jail, as described in ``rewards.sandbox``.
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass

# sched.h, sys/mount.h
CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x20, 0x1000, 0x4000, 0x40000

SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")
NOBODY = 65534


@dataclass(frozen=True)
class Jail:
    """What the child builds. ``root``: an empty directory the tmpfs is mounted on (outside, it stays empty);
    ``links``: (path, target) symlinks; ``binds``: (path, source, is_dir) read-only binds, path as the
    program sees it and source what it resolves to here; ``scratch``: bound writable at its own path."""

    uid: int
    gid: int
    root: str
    scratch: str
    links: tuple[tuple[str, str], ...]
    binds: tuple[tuple[str, str, bool], ...]


def jail_user() -> tuple[int, int]:
    import pwd

    try:
        entry = pwd.getpwnam("nobody")
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return NOBODY, NOBODY


def plan(root: str, scratch: str) -> Jail:
    """The jail of one run: system paths (symlinks kept as symlinks), the interpreter's prefixes and
    directory, the devices; each read-only at the path the program uses."""
    uid, gid = jail_user()
    links, binds, seen = [], [], []
    for path in SYSTEM_PATHS:
        if os.path.islink(path):
            links.append((path, os.readlink(path)))
        elif os.path.isdir(path):
            binds.append((path, path, True))
            seen.append(path)
    python_dirs = {os.path.dirname(sys.executable), sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix,
                   os.path.dirname(os.path.realpath(sys.executable))}
    for path in sorted(python_dirs, key=len):
        if not any(path == s or path.startswith(s.rstrip("/") + "/") for s in seen):
            binds.append((path, os.path.realpath(path), True))
            seen.append(path)
    binds += [(dev, dev, False) for dev in DEVICES if os.path.exists(dev)]
    return Jail(uid, gid, root, scratch, tuple(links), tuple(binds))


def libc_mount():
    """The C library's ``mount``, looked up in the parent (the child only calls it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    return libc.mount


def enter(jail: Jail, unshare, mount, extra_flags: int, after_fork=None) -> None:
    """In the child, as root, between fork and exec: new namespaces, the init fork (``after_fork`` runs in the
    init first), the file view, chroot. The caller then sets limits, drops capabilities and becomes
    ``jail.uid`` (``drop_to_user``)."""

    def check(result: int, what: str) -> None:
        if result != 0:
            raise OSError(ctypes.get_errno(), f"sandbox jail: {what} failed")

    check(unshare(CLONE_NEWNS | CLONE_NEWPID | extra_flags), "unshare")
    pid = os.fork()
    if pid != 0:
        _wait_and_exit_as(pid)  # never returns
    # The namespace's init from here on.
    if after_fork is not None:
        after_fork()
    check(mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "making / private")
    root = jail.root.encode()
    check(mount(b"tmpfs", root, b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=755,size=1m"), "tmpfs root")
    for path, target in jail.links:
        os.makedirs(os.path.dirname(jail.root + path), exist_ok=True)
        os.symlink(target, jail.root + path)
    for path, source, is_dir in jail.binds + ((jail.scratch, jail.scratch, True),):
        inside = jail.root + path
        if is_dir:
            os.makedirs(inside, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(inside), exist_ok=True)
            os.close(os.open(inside, os.O_CREAT | os.O_WRONLY, 0o644))
        check(mount(source.encode(), inside.encode(), None, MS_BIND | MS_REC, None), f"binding {path}")
        if path != jail.scratch:  # read-only: a bind's flags change only on a remount
            check(mount(None, inside.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID, None), f"read-only {path}")
    os.makedirs(jail.root + "/proc", exist_ok=True)
    check(mount(b"proc", (jail.root + "/proc").encode(), b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None), "proc")
    check(mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, b"mode=755"), "read-only root")
    os.chroot(jail.root)
    os.chdir(jail.scratch)


def drop_to_user(jail: Jail) -> None:
    """Become the jail's user (after the capability bounding set is dropped: that needs root)."""
    os.setgroups([])
    os.setgid(jail.gid)
    os.setuid(jail.uid)


def _wait_and_exit_as(pid: int) -> None:
    """The process left outside the namespaces: hold no descriptor (``Popen`` waits for the exec-status pipe
    to close, which the init's exec does), wait for the init and end as it ended."""
    os.closerange(0, 65536)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(status):
        os.kill(os.getpid(), os.WTERMSIG(status))
        os._exit(128 + os.WTERMSIG(status))  # the signal was caught here: the closest exit status
    os._exit(os.waitstatus_to_exitcode(status))
