"""A uid/gid of its own for each sandbox run when the evaluator is root (:mod:`selfmoe.sandbox`).

Why: a program running as an unused, unprivileged uid cannot read the evaluator's (or another run's)
``/proc/<pid>/environ`` or memory, cannot signal them, and can write only where anyone may. The ids
come from the top of the range this process's user namespace maps (far from real users), skip any uid
a running process or ``/etc/passwd`` uses, and are locked for the run twice over: in this process (a
set, for the evaluator's thread pool) and across processes (an ``flock`` on a file per uid, in a
directory under the temp dir that only the evaluator's uid may write, for two evaluations at once).
"""
from __future__ import annotations

import os
import stat
import threading
from typing import Tuple

from .sandbox import SandboxError

__all__ = ["acquire_ids", "release_ids"]

_ID_COUNT = 1024  # ids to choose from: more than runs at once, few enough to scan
_ids_lock = threading.Lock()
_ids_in_use: set = set()


def _id_base(map_file: str) -> int:
    """The first of ``_ID_COUNT`` ids at the top of the largest range mapped in ``map_file`` (below 2**31)."""
    best = (0, 0)
    with open(map_file) as f:
        for line in f:
            inside, _outside, count = (int(x) for x in line.split())
            if count > best[1]:
                best = (inside, count)
    top = min(best[0] + best[1], 2 ** 31 - 1)
    if top - best[0] < _ID_COUNT + 2:
        raise SandboxError(f"{map_file}: too few ids mapped to give each run its own uid")
    return top - 1 - _ID_COUNT


def _uids_running() -> set:
    """Every uid (real, effective, saved, filesystem) of a process alive now."""
    out = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/status") as f:
                    for line in f:
                        if line.startswith("Uid:"):
                            out.update(int(x) for x in line.split()[1:])
                            break
            except OSError:
                pass
    return out


def acquire_ids() -> Tuple[int, int, int]:
    """A uid/gid pair no process uses, locked for this run: ``(uid, gid, lock_fd)``."""
    import fcntl
    import tempfile

    ubase, gbase = _id_base("/proc/self/uid_map"), _id_base("/proc/self/gid_map")
    lock_dir = os.path.join(tempfile.gettempdir(), "selfmoe-sandbox-ids")
    os.makedirs(lock_dir, mode=0o700, exist_ok=True)
    st = os.lstat(lock_dir)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise SandboxError(f"{lock_dir}: must be a directory owned by uid {os.geteuid()} that others cannot write")
    try:
        with open("/etc/passwd") as f:
            known = {int(p[2]) for p in (line.split(":") for line in f) if len(p) > 2 and p[2].isdigit()}
    except OSError:
        known = set()
    with _ids_lock:
        busy = _uids_running() | known
        for k in range(_ID_COUNT):
            uid, gid = ubase + k, gbase + k
            if uid in _ids_in_use or uid in busy:
                continue
            fd = os.open(os.path.join(lock_dir, f"{uid}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            _ids_in_use.add(uid)
            return uid, gid, fd
    raise SandboxError(f"no free sandbox uid in {ubase}..{ubase + _ID_COUNT - 1}")


def release_ids(uid: int, fd: int) -> None:
    """Give back what :func:`acquire_ids` returned, once the run's processes are gone."""
    with _ids_lock:
        _ids_in_use.discard(uid)
        os.close(fd)  # closing drops the flock

