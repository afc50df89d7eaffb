"""Run an untrusted Python program contained (the code examples of ``selfmoe eval``).

One job: :func:`run_python` runs a program a model wrote and says whether it ran to its end, such
that the program cannot harm the machine beyond the limits below, cannot outlive the call, and cannot
claim to have finished when it did not. Linux only (it relies on ``/proc``, ``prctl`` and namespaces).

How a run goes::

    evaluator --Popen--> supervisor (python -I -S this file; its own session; a child subreaper)
                           | unshare: pid, mount, ipc, network namespaces (root, or a user namespace)
                           | private tmpfs on /tmp, /var/tmp, /dev/shm; program.py in a fresh work dir
                           +--fork--> init (pid 1 of the new pid namespace; only with one)
                                        +--fork--> program: setsid, rlimits, uid/gid drop,
                                                   no_new_privs, exec python -I -B -c RUNNER

Why a supervisor process and not ``subprocess.Popen(preexec_fn=...)``: the evaluator runs programs
from a thread pool, and code between ``fork`` and ``exec`` in a threaded process may deadlock on a
lock another thread held at fork time (CPython documents ``preexec_fn`` as unsafe with threads).
``unshare(CLONE_NEWUSER)`` also refuses multi-threaded callers. So the evaluator only starts a fresh,
single-threaded interpreter (``Popen`` without ``preexec_fn`` is thread-safe), and that interpreter
sets everything up with plain ``fork``, where nothing else can hold a lock.

What is contained, for every run:

- a fresh work directory as the current directory, ``HOME`` and ``TMPDIR``; a minimal environment
  (``PATH``, ``LANG``, ``HOME``, ``TMPDIR``): never the evaluator's;
- resource limits, set before the program starts (hard = soft, so it cannot raise them):
  ``RLIMIT_AS`` (memory), ``RLIMIT_CPU``, ``RLIMIT_FSIZE`` (any file it writes, stdout and stderr
  included: they are files, so printing forever stops at the limit), ``RLIMIT_NPROC``,
  ``RLIMIT_NOFILE``, ``RLIMIT_CORE`` 0; a wall-clock timeout; ``no_new_privs`` (set-uid programs
  gain nothing); only a bounded tail of its output is ever read back;
- nothing outlives the run: the supervisor is a child subreaper (``PR_SET_CHILD_SUBREAPER``), so
  every descendant of the program stays in its subtree, ``setsid()``/double-fork or not; after the
  program ends (passed, failed or timed out) it kills every descendant it finds in ``/proc`` and
  reaps until it has no child left. With a pid namespace the kernel already does that: when the
  namespace's init exits, every process in it is killed;
- the verdict cannot be forged by output, exit status, files, argv or the environment (see below).

Where the evaluator is root (with ``CAP_SYS_ADMIN``, as in CI), also:

- no network: a new network namespace with no interface up (even 127.0.0.1 is unreachable; abstract
  Unix sockets and SysV IPC are private too);
- not root: each run gets its own unused uid/gid (from the top of the id range, checked free in
  ``/proc`` and locked against concurrent runs), no supplementary groups. It cannot read
  ``/proc/<pid>/environ`` or memory of the evaluator (or of another run), cannot signal them, and can
  write only where anyone may write;
- private ``/tmp``, ``/var/tmp``, ``/dev/shm`` (size-limited tmpfs, gone after the run), so those
  writes land nowhere. A Python installation in a directory others cannot enter (say ``/root/.pyenv``)
  is made reachable by mounting a tmpfs over that directory (``/root``) in the run's mount namespace
  with only the installation bind-mounted back: the rest of that directory is hidden.

As a non-root user with unprivileged user namespaces, the namespaces above still apply (no network,
private tmp dirs, pid namespace), but the program runs as the same user (a user namespace has no
other uid to switch to without setuid helpers): it can read and write whatever that user can, e.g.
delete files in the home directory or read the evaluator's ``/proc/<pid>/environ``. Without user
namespaces only the limits, the work directory, the process cleanup and the verdict remain, and a
program that kills its own supervisor (same uid) can leave processes behind. :func:`check_sandbox`
reports what applies on this machine; run untrusted models in a disposable VM or container then.

Not contained even as root: reading world-readable files (datasets, the source tree), seeing the
process list (not other processes' environments), using CPU and memory up to the limits.

The verdict. The program file holds the solution and its tests and nothing secret. A small trusted
runner (``RUNNER``) reads a per-run random token from an inherited pipe, closes it, and only then
executes ``program.py`` in-process; if that returns normally it flushes output, writes the token to a
second inherited pipe and exits with ``os._exit(0)``. The evaluator counts the run as completed only
if that pipe holds exactly the token and the program exited with status 0 within the limits. The
token is in no file, argument, environment variable or output the program can read, so reading its
own source and printing anything before ``os._exit(0)`` (or ``sys.exit(0)``) gives nothing. Residual
risk, stated plainly: the program shares the interpreter with the runner, so code that deliberately
walks the interpreter's frames or memory (``sys._getframe(1).f_locals``, ``gc``, ``ctypes``) can find
the token, and code can make ``assert f(x) == y`` pass without a correct ``f`` (an object whose
``__eq__`` is always true). This guards against accidents and against the simple forgeries seen in
practice, not against a model adversarially targeting this harness.
"""
from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import stat
import struct
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["SandboxConfig", "SandboxResult", "Containment", "SandboxError", "run_python", "check_sandbox", "RUNNER"]

# Linux constants (sched.h, prctl.h, mount.h); stable ABI.
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x8000000, 0x10000000, 0x20000000, 0x40000000
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 4096, 16384, 1 << 18

#: The trusted runner, run as ``python -I -B -c RUNNER`` in the work directory. fd 3: the token
#: (read, then closed, before any untrusted code runs); fd 4: where the token goes once ``program.py``
#: has run to its end. It executes the program in ``__main__``'s namespace, emptied of its own names.
#: ``SIGXFSZ`` gets its default action back (Python ignores it): writing past the file size limit ends
#: the program, so catching the error cannot hide that a limit was hit.
RUNNER = """\
import os as _os, signal as _signal, sys as _sys


def _selfmoe_runner(os, sys):
    _signal.signal(_signal.SIGXFSZ, _signal.SIG_DFL)  # past the file size limit the program ends
    with open(3, "rb") as pipe:
        token = pipe.read(256)
    namespace = sys.modules["__main__"].__dict__
    for name in [k for k in namespace if k not in ("__name__", "__builtins__", "__doc__", "__spec__",
                                                   "__loader__", "__package__")]:
        del namespace[name]
    namespace["__file__"] = "program.py"
    sys.argv[:] = ["program.py"]
    try:
        with open("program.py", "rb") as f:
            code = compile(f.read(), "program.py", "exec", dont_inherit=True)
        exec(code, namespace)
    except SystemExit:
        raise
    except BaseException as exc:  # the traceback without this runner's frame, exit status 1
        import traceback
        traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(4, token)
    os._exit(0)


_selfmoe_runner(_os, _sys)
"""


class SandboxError(RuntimeError):
    """The sandbox itself could not run a program (setup failed: not the program's doing)."""


@dataclass(frozen=True)
class SandboxConfig:
    """Limits and isolation for :func:`run_python`.

    timeout: wall-clock seconds. cpu_seconds: CPU time (default ``ceil(timeout) + 1``).
    memory_mb: address space (``RLIMIT_AS``). file_size_mb: largest file the program may write,
    stdout and stderr included. max_processes: processes and threads of the run (``RLIMIT_NPROC``).
    max_open_files: ``RLIMIT_NOFILE``. tmp_size_mb: size of each private tmpfs.
    isolate_network / drop_privileges / private_tmp / pid_namespace: ask for each containment where
    the machine allows it (where it does not, the run goes on without it and
    :attr:`SandboxResult.containment` says so).
    """

    timeout: float = 10.0
    cpu_seconds: Optional[int] = None
    memory_mb: int = 2048
    file_size_mb: int = 4
    max_processes: int = 16
    max_open_files: int = 64
    tmp_size_mb: int = 64
    isolate_network: bool = True
    drop_privileges: bool = True
    private_tmp: bool = True
    pid_namespace: bool = True

    def __post_init__(self) -> None:
        if not (isinstance(self.timeout, (int, float)) and self.timeout > 0):
            raise ValueError(f"SandboxConfig.timeout must be > 0 seconds, got {self.timeout!r}")
        if self.cpu_seconds is not None and self.cpu_seconds < 1:
            raise ValueError(f"SandboxConfig.cpu_seconds must be >= 1, got {self.cpu_seconds!r}")
        for name, least in (("memory_mb", 64), ("file_size_mb", 1), ("max_processes", 1),
                            ("max_open_files", 16), ("tmp_size_mb", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < least:
                raise ValueError(f"SandboxConfig.{name} must be an integer >= {least}, got {value!r}")

    @property
    def cpu_limit(self) -> int:
        return self.cpu_seconds if self.cpu_seconds is not None else int(-(-self.timeout // 1)) + 1

    def replace(self, **changes: Any) -> "SandboxConfig":
        return replace(self, **changes)


@dataclass(frozen=True)
class Containment:
    """What applied to a run. ``uid``: the unprivileged uid it ran as (None: the caller's own uid)."""

    network: bool = False
    uid: Optional[int] = None
    pid_namespace: bool = False
    private_tmp: bool = False
    user_namespace: bool = False
    notes: Tuple[str, ...] = ()

    @property
    def full(self) -> bool:
        """No network, another uid, private tmp dirs and a pid namespace."""
        return self.network and self.uid is not None and self.private_tmp and self.pid_namespace

    def describe(self) -> str:
        parts = ["no network" if self.network else "network NOT isolated",
                 f"uid {self.uid}" if self.uid is not None else "the caller's uid (can reach its files and processes)",
                 "private /tmp" if self.private_tmp else "shared /tmp",
                 "pid namespace" if self.pid_namespace else "no pid namespace"]
        if self.user_namespace:
            parts.append("user namespace")
        return ", ".join(parts) + ("" if not self.notes else " (" + "; ".join(self.notes) + ")")


@dataclass(frozen=True)
class SandboxResult:
    """How a run ended.

    completed: the program ran to its end: the trusted runner reported with this run's token and the
        process exited with status 0 within every limit.
    status: ``"completed"``, ``"failed"`` (exception, exit, signal, a limit) or ``"timeout"``.
    limit: the limit that ended it, if known: ``"timeout"``, ``"cpu"``, ``"output"`` (a file reached
        ``file_size_mb``: stdout, stderr or another), else None.
    stdout / stderr: the last 64 KiB / 16 KiB of each.
    """

    completed: bool
    status: str
    exit_code: Optional[int]
    signal: Optional[int]
    limit: Optional[str]
    stdout: str
    stderr: str
    duration: float
    containment: Containment = field(default_factory=Containment)

    @property
    def reason(self) -> str:
        """One line: why it did not complete ("" if it did)."""
        if self.completed:
            return ""
        if self.limit == "timeout":
            return "timed out"
        if self.limit == "cpu":
            return "CPU time limit exceeded"
        if self.limit == "output":
            return "output limit exceeded (a file or stdout/stderr reached the size limit)"
        if self.signal is not None:
            try:
                return f"killed by {signal.Signals(self.signal).name}"
            except ValueError:
                return f"killed by signal {self.signal}"
        if self.exit_code:
            return f"exit status {self.exit_code}"
        return "exited before the end of the program"


# ----------------------------------------------------------------------------------------------------
# Evaluator side


def _libc() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    libc.unshare.argtypes = [ctypes.c_int]
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    return libc


_ID_COUNT = 1024
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


def _acquire_ids() -> Tuple[int, int, int]:
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


def _release_ids(uid: int, fd: int) -> None:
    with _ids_lock:
        _ids_in_use.discard(uid)
        os.close(fd)  # closing drops the flock


def _tail(path: str, n: int) -> str:
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - n))
        return f.read().decode("utf-8", errors="replace")


def _read_available(fd: int, limit: int) -> bytes:
    """What a pipe holds now, at most ``limit`` bytes, never blocking (a stray writer may keep it open)."""
    os.set_blocking(fd, False)
    chunks, total = [], 0
    while total < limit:
        try:
            b = os.read(fd, min(65536, limit - total))
        except BlockingIOError:
            break
        if not b:
            break
        chunks.append(b)
        total += len(b)
    return b"".join(chunks)


def _rmtree(path: str) -> None:
    """Remove a run's directory even if the program left unwritable directories in it."""
    import shutil

    def retry(func: Any, p: str, _exc: Any) -> None:
        try:
            os.chmod(os.path.dirname(p), 0o700)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=retry)


def run_python(source: str, config: Optional[SandboxConfig] = None) -> SandboxResult:
    """Run the Python program ``source`` contained (see the module docstring) and say how it ended.

    A program that fails, hits a limit or times out is a result, never an exception; ``SandboxError``
    means the sandbox could not be set up (e.g. the Python installation is unreachable by the
    sandbox uid), ``ValueError`` a bad argument.
    """
    import secrets
    import subprocess
    import tempfile

    if not isinstance(source, str):
        raise ValueError(f"source must be a string, got {type(source).__name__}")
    cfg = config if config is not None else SandboxConfig()
    if not isinstance(cfg, SandboxConfig):
        raise ValueError(f"config must be a SandboxConfig, got {type(cfg).__name__}")
    if not sys.platform.startswith("linux"):
        raise SandboxError(f"the code sandbox needs Linux, this is {sys.platform}")
    ids: Optional[Tuple[int, int, int]] = None
    if cfg.drop_privileges and os.geteuid() == 0:
        ids = _acquire_ids()
    tmp = tempfile.mkdtemp(prefix="selfmoe-sandbox-")
    pipes: List[int] = []
    try:
        work = os.path.join(tmp, "work")
        os.mkdir(work, 0o700)
        if ids is not None:
            os.chown(work, ids[0], ids[1])
            os.chmod(tmp, 0o711)  # the run's uid may enter (to work/) but not list or open stdout/stderr
        token = secrets.token_hex(16)
        report_r, report_w = os.pipe()
        verdict_r, verdict_w = os.pipe()
        pipes = [report_r, report_w, verdict_r, verdict_w]
        request = {
            "source": source, "token": token, "workdir": work, "report_fd": report_w, "verdict_fd": verdict_w,
            "uid": ids[0] if ids else None, "gid": ids[1] if ids else None,
            "timeout": float(cfg.timeout), "cpu": cfg.cpu_limit, "memory": cfg.memory_mb << 20,
            "fsize": cfg.file_size_mb << 20, "nproc": cfg.max_processes, "nofile": cfg.max_open_files,
            "tmp_size_mb": cfg.tmp_size_mb, "network": cfg.isolate_network, "private_tmp": cfg.private_tmp,
            "pid_ns": cfg.pid_namespace,
        }
        out_path, err_path = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        start = time.monotonic()
        with open(os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out, \
                open(os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", os.path.abspath(__file__)], stdin=subprocess.PIPE, stdout=out,
                stderr=err, pass_fds=(report_w, verdict_w), close_fds=True, start_new_session=True,
                env={"PATH": os.defpath, "LANG": "C.UTF-8"}, cwd=tmp)
        os.close(report_w)
        os.close(verdict_w)
        pipes = [report_r, verdict_r]
        try:
            proc.communicate(json.dumps(request).encode(), timeout=cfg.timeout + 20)
        except BaseException as exc:
            # KeyboardInterrupt, or a stuck supervisor (it enforces cfg.timeout itself): SIGTERM makes it
            # kill the program and its descendants and report; SIGKILL if it does not end soon.
            proc.terminate()
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except OSError:
                    pass
                proc.kill()
                proc.wait()
            if isinstance(exc, subprocess.TimeoutExpired):
                raise SandboxError(f"the sandbox supervisor did not finish within {cfg.timeout + 20:g} s") from None
            raise
        duration = time.monotonic() - start
        raw_report = _read_available(report_r, 1 << 20)
        verdict = _read_available(verdict_r, 4096)
        stdout, stderr = _tail(out_path, 65536), _tail(err_path, 16384)
        sizes = [os.path.getsize(out_path), os.path.getsize(err_path)]
    finally:
        for fd in pipes:
            os.close(fd)
        if ids is not None:
            _release_ids(ids[0], ids[2])
        _rmtree(tmp)
    try:
        report = json.loads(raw_report.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        report = None
    if not isinstance(report, dict):
        # Only a program running as the evaluator's own uid can kill its supervisor: its failure.
        return SandboxResult(False, "failed", None, None, None, stdout,
                             (stderr + "\nselfmoe sandbox: the supervisor ended without a report").strip(), duration)
    if report.get("error"):
        raise SandboxError(f"the sandbox could not run the program: {report['error']}")
    if report.get("exec_error"):
        raise SandboxError(f"the sandbox could not start Python ({sys.executable}) for the program: "
                           f"{report['exec_error']}")
    if report.get("leftover"):
        import warnings

        warnings.warn("selfmoe sandbox: some processes of a program could not be killed", RuntimeWarning, stacklevel=2)
    c = report.get("containment") or {}
    containment = Containment(network=bool(c.get("network")), uid=c.get("uid"), pid_namespace=bool(c.get("pid_ns")),
                              private_tmp=bool(c.get("private_tmp")), user_namespace=bool(c.get("userns")),
                              notes=tuple(report.get("notes") or ()))
    code, sig = report.get("exit_code"), report.get("signal")
    limit: Optional[str] = None
    if report.get("timed_out"):
        limit = "timeout"
    elif sig == signal.SIGXCPU or (sig == signal.SIGKILL and report.get("cpu_used", 0) >= cfg.cpu_limit):
        limit = "cpu"
    elif sig == signal.SIGXFSZ or max(sizes) >= cfg.file_size_mb << 20:
        limit = "output"
    completed = limit is None and code == 0 and sig is None and verdict == token.encode()
    status = "completed" if completed else ("timeout" if limit == "timeout" else "failed")
    return SandboxResult(completed, status, code, sig, limit, stdout, stderr, duration, containment)


_checked: Dict[Tuple[bool, bool, bool, bool], Containment] = {}


def check_sandbox(config: Optional[SandboxConfig] = None) -> Containment:
    """Run a trivial program in the sandbox (once per process and isolation setting) and return what
    contains it here. Raises :class:`SandboxError` if even that program cannot run to completion."""
    cfg = config if config is not None else SandboxConfig()
    key = (cfg.isolate_network, cfg.drop_privileges, cfg.private_tmp, cfg.pid_namespace)
    if key not in _checked:
        res = run_python("pass\n", cfg.replace(timeout=max(cfg.timeout, 30.0)))
        if not res.completed:
            raise SandboxError(f"the sandbox could not run a trivial program ({res.reason}): {res.stderr[-2000:]}")
        _checked[key] = res.containment
    return _checked[key]


# ----------------------------------------------------------------------------------------------------
# Supervisor side: everything below runs in the supervisor process (python -I -S this file).


class _SetupError(Exception):
    pass


def _check(libc: Any, ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _try_unshare(libc: Any, flags: int) -> bool:
    return libc.unshare(flags) == 0


def _mount(libc: Any, src: Optional[str], target: str, fstype: Optional[str], flags: int, data: Optional[str] = None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(libc, libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _python_dirs() -> List[str]:
    """The directories the program's interpreter must reach (outermost only)."""
    import sysconfig

    cands = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, os.path.dirname(sys.executable),
             os.path.dirname(os.path.realpath(sys.executable))]
    cands += [sysconfig.get_path(n) for n in ("stdlib", "platstdlib", "purelib", "platlib")]
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        cands.append(sysconfig.get_config_var("LIBDIR"))
    dirs = sorted({os.path.realpath(c) for c in cands if c and os.path.isdir(c)})
    return [d for d in dirs if not any(o != d and _under(d, o) for o in dirs)]


def _closed_ancestor(path: str) -> Optional[str]:
    """The outermost directory on the way to ``path`` (``path`` included) that others cannot enter."""
    parts = path.strip("/").split("/")
    for i in range(len(parts) + 1):
        d = "/" + "/".join(parts[:i])
        if not os.stat(d).st_mode & 0o001:
            return d
    return None


def _setup_mounts(libc: Any, req: Dict[str, Any], fix: List[str], notes: List[str]) -> Tuple[bool, Optional[str]]:
    """Private tmp dirs and reachable Python dirs in the new mount namespace: ``(private_tmp, workdir)``."""
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)
    needed = _python_dirs()
    covers: Dict[str, str] = {}
    if req["private_tmp"]:
        blocked = [d for d in ("/tmp", "/var/tmp", "/dev/shm") if any(_under(p, d) for p in needed)]
        if blocked:
            notes.append(f"Python lives under {blocked[0]}: not made private")
        for d in ("/tmp", "/var/tmp", "/dev/shm"):
            if d not in blocked and os.path.isdir(d) and not os.path.islink(d):
                covers[d] = "1777"
    for d in fix:
        covers.setdefault(d, "755")
    tops = [d for d in covers if not any(o != d and _under(d, o) for o in covers)]
    keep = {p: os.open(p, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) for p in needed if any(_under(p, d) for d in tops)}
    for d in sorted(tops):
        size = req["tmp_size_mb"] if covers[d] == "1777" else 1
        _mount(libc, "tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size}m,mode={covers[d]}")
    for p, fd in sorted(keep.items()):
        os.makedirs(p, mode=0o755, exist_ok=True)
        _mount(libc, f"/proc/self/fd/{fd}", p, None, MS_BIND | MS_REC)
        os.close(fd)
    private = "/tmp" in covers
    return private, ("/tmp/selfmoe-work" if private else None)


def _count_tasks(uid: int) -> int:
    total = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/status") as f:
                    fields = dict(line.split(":", 1) for line in f if ":" in line)
                if int(fields["Uid"].split()[0]) == uid:
                    total += int(fields["Threads"])
            except (OSError, KeyError, ValueError):
                pass
    return total


def _descendants(root: int) -> List[int]:
    children: Dict[int, List[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    data = f.read()
                children.setdefault(int(data[data.rfind(b")") + 2:].split()[1]), []).append(int(name))
            except (OSError, IndexError, ValueError):
                pass
    out, stack = [], [root]
    while stack:
        for c in children.get(stack.pop(), ()):
            out.append(c)
            stack.append(c)
    return out


def _kill_descendants(limit_s: float = 10.0) -> bool:
    """SIGKILL every descendant and reap until this process has no child left (True), or give up."""
    end = time.monotonic() + limit_s
    me = os.getpid()
    while True:
        for pid in _descendants(me):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return True  # no child: as a subreaper, that means no descendant at all
            if pid == 0:
                break
        if time.monotonic() > end:
            return False
        time.sleep(0.002)


def _exec_program(req: Dict[str, Any], workdir: str, uid: Optional[int], gid: Optional[int], nproc: int,
                  token_r: int, err_w: int, libc: Any) -> None:
    """In the forked program process: drop everything, then exec the runner. Never returns."""
    import fcntl

    errfd = err_w
    parent = os.getppid()
    try:
        os.setsid()
        for s in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGTERM, signal.SIGCHLD):
            signal.signal(s, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        hi = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in (token_r, req["verdict_fd"], err_w)]
        os.dup2(hi[0], 3)
        os.dup2(hi[1], 4)
        os.dup2(hi[2], 5, inheritable=False)
        errfd = 5
        os.closerange(6, max(1024, os.sysconf("SC_OPEN_MAX")))
        cpu = req["cpu"]
        for res, soft, hard in ((resource.RLIMIT_CORE, 0, 0), (resource.RLIMIT_CPU, cpu, cpu + 1),
                                (resource.RLIMIT_AS, req["memory"], req["memory"]),
                                (resource.RLIMIT_FSIZE, req["fsize"], req["fsize"]),
                                (resource.RLIMIT_NOFILE, req["nofile"], req["nofile"]),
                                (resource.RLIMIT_NPROC, nproc, nproc)):
            old_hard = resource.getrlimit(res)[1]
            if old_hard != resource.RLIM_INFINITY:
                soft, hard = min(soft, old_hard), min(hard, old_hard)
            resource.setrlimit(res, (soft, hard))
        if uid is not None:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
        _check(libc, libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # after setuid, which clears it
        if os.getppid() != parent:  # the parent died before PDEATHSIG was armed
            os._exit(127)
        os.chdir(workdir)
        os.umask(0o077)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
        os.execve(sys.executable, [sys.executable, "-I", "-B", "-c", RUNNER], env)
    except BaseException as exc:  # noqa: BLE001 - report anything, then leave
        try:
            os.write(errfd, f"{type(exc).__name__}: {exc}".encode()[:2000])
        finally:
            os._exit(127)


def _supervise(req: Dict[str, Any]) -> Dict[str, Any]:
    libc = _libc()
    notes: List[str] = []
    uid, gid = req["uid"], req["gid"]
    root = os.geteuid() == 0
    _check(libc, libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(CHILD_SUBREAPER)")

    fix: List[str] = []
    if uid is not None:
        for p in _python_dirs():
            closed = _closed_ancestor(p)
            if closed == p:
                raise _SetupError(f"programs run as uid {uid}, but {p} (part of the Python installation) is not "
                                  "readable by other users: make it so (chmod o+rx), or use "
                                  "SandboxConfig(drop_privileges=False)")
            if closed is not None:
                fix.append(closed)
    flags = ((CLONE_NEWNET if req["network"] else 0) | (CLONE_NEWPID if req["pid_ns"] else 0)
             | (CLONE_NEWNS if req["private_tmp"] or fix else 0))
    flags |= CLONE_NEWIPC if flags else 0
    unshared = userns = False
    if flags and root:
        unshared = _try_unshare(libc, flags)
    elif flags:
        euid, egid = os.geteuid(), os.getegid()
        unshared = userns = _try_unshare(libc, flags | CLONE_NEWUSER)
        if userns:
            for name, text in (("setgroups", "deny"), ("uid_map", f"{euid} {euid} 1"), ("gid_map", f"{egid} {egid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
    if flags and not unshared:
        notes.append(("no namespaces: " if root else "no user namespaces: ") + os.strerror(ctypes.get_errno()))
    if fix and not (unshared and flags & CLONE_NEWNS):
        raise _SetupError(f"programs run as uid {uid}, but other users cannot enter {fix[0]} on the way to the "
                          "Python installation, and without a mount namespace it cannot be exposed: make it "
                          "enterable (chmod o+x), or use SandboxConfig(drop_privileges=False)")
    private, workdir = False, None
    if unshared and flags & CLONE_NEWNS:
        private, workdir = _setup_mounts(libc, req, fix, notes)
    if workdir is None:
        workdir = req["workdir"]
    else:
        os.mkdir(workdir, 0o700)
        if uid is not None:
            os.chown(workdir, uid, gid)
    prog = os.path.join(workdir, "program.py")
    with open(prog, "w", encoding="utf-8") as f:
        f.write(req["source"])
    if uid is not None:
        os.chown(prog, uid, gid)

    if uid is not None or userns:
        nproc = req["nproc"] + (1 if userns and flags & CLONE_NEWPID else 0)
    else:  # RLIMIT_NPROC counts every process of the caller's uid
        nproc = _count_tasks(os.getuid()) + req["nproc"]
        notes.append("no process limit: root ignores RLIMIT_NPROC" if root
                     else "process limit shared with the caller's other processes")
    pid_ns = unshared and bool(flags & CLONE_NEWPID)

    token_r, token_w = os.pipe()
    os.write(token_w, req["token"].encode())
    os.close(token_w)
    err_r, err_w = os.pipe()
    status_r, status_w = os.pipe()
    start = time.monotonic()
    main = os.fork()
    if main == 0:
        if not pid_ns:
            _exec_program(req, workdir, uid, gid, nproc, token_r, err_w, libc)
        # init of the pid namespace: start the program, reap orphans, report the program's status.
        try:
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            child = os.fork()
            if child == 0:
                _exec_program(req, workdir, uid, gid, nproc, token_r, err_w, libc)
            for fd in (token_r, err_w, req["verdict_fd"], req["report_fd"], status_r):
                os.close(fd)
            while True:
                pid, status = os.waitpid(-1, 0)
                if pid == child:
                    os.write(status_w, struct.pack("i", status))
                    break
        finally:
            os._exit(0)
    for fd in (token_r, err_w, status_w, req["verdict_fd"]):
        os.close(fd)

    timed_out = interrupted = False
    status: Optional[int] = None
    deadline = start + req["timeout"]
    while True:
        pid, st = os.waitpid(main, os.WNOHANG)
        if pid:
            status = st
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            break
        info = signal.sigtimedwait({signal.SIGCHLD, signal.SIGTERM}, min(remaining, 1.0))
        if info is not None and info.si_signo == signal.SIGTERM:
            interrupted = True
            break
    if status is None:
        os.kill(main, signal.SIGKILL)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    clean = _kill_descendants()
    cpu_used = usage.ru_utime + usage.ru_stime
    if pid_ns:
        raw = _read_status(status_r)
        status = None if raw is None else raw
    exec_error = _drain(err_r).decode("utf-8", errors="replace")
    out: Dict[str, Any] = {
        "timed_out": timed_out, "interrupted": interrupted, "exec_error": exec_error or None,
        "exit_code": os.WEXITSTATUS(status) if status is not None and os.WIFEXITED(status) else None,
        "signal": os.WTERMSIG(status) if status is not None and os.WIFSIGNALED(status) else None,
        "cpu_used": cpu_used, "leftover": not clean, "notes": notes,
        "containment": {"network": unshared and bool(flags & CLONE_NEWNET), "uid": uid, "pid_ns": pid_ns,
                        "private_tmp": private, "userns": userns},
    }
    if not clean:
        notes.append("some processes of the program could not be killed")
    return out


def _drain(fd: int) -> bytes:
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            b = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not b:
            break
        chunks.append(b)
    os.close(fd)
    return b"".join(chunks)


def _read_status(fd: int) -> Optional[int]:
    data = _drain(fd)
    return struct.unpack("i", data[:4])[0] if len(data) >= 4 else None


def _supervisor_main() -> int:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD, signal.SIGTERM})
    os.umask(0o022)  # not the evaluator's: directories made for the sandbox uid must be enterable
    raw = sys.stdin.buffer.read()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    req = json.loads(raw.decode("utf-8"))
    try:
        report = _supervise(req)
    except BaseException as exc:  # noqa: BLE001 - the evaluator turns this into SandboxError
        try:
            _kill_descendants()
        except Exception:  # noqa: BLE001
            pass
        report = {"error": f"{type(exc).__name__}: {exc}" if not isinstance(exc, _SetupError) else str(exc)}
    data = json.dumps(report).encode()
    while data:
        data = data[os.write(req["report_fd"], data):]
    return 0


if __name__ == "__main__":
    sys.exit(_supervisor_main())
