"""Run an untrusted Python program contained (the code examples of ``selfmoe eval``).

One job: :func:`run_python` runs a program a model wrote and says whether it ran to its end, such
that the program cannot harm the machine beyond the limits below, cannot outlive the call, and cannot
claim to have finished when it did not. Linux only (it relies on ``/proc``, ``prctl`` and namespaces).

How a run goes::

    evaluator --Popen--> supervisor (python -I -S sandbox_supervisor.py; its own session; a child subreaper)
                           | unshare: pid, mount, ipc, network namespaces (root, or a user namespace)
                           | private tmpfs on /tmp, /var/tmp, /dev/shm; program.py in a fresh work dir
                           +--fork--> init (pid 1 of the new pid namespace; only with one)
                                        +--fork--> program: setsid, rlimits, uid/gid drop,
                                                   no_new_privs, exec python -I -B -c RUNNER

The code: this module holds the API, its types and the evaluator's side of a run (start the
supervisor, send it the request, read its report and the verdict); :mod:`selfmoe.sandbox_supervisor`
everything right of the first arrow (and ``RUNNER``); :mod:`selfmoe.sandbox_ids` the per-run uid
given to programs when the evaluator is root. This docstring is the one place that says what is and
is not contained.

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

import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Tuple

# The supervisor is a stdlib-only script (it runs with -I -S): this side imports from it, never the reverse.
from . import sandbox_supervisor
from .sandbox_supervisor import RUNNER, read_available

__all__ = ["SandboxConfig", "SandboxResult", "Containment", "SandboxError", "run_python", "check_sandbox", "RUNNER"]


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
# Running a program: the evaluator's side (the supervisor's is selfmoe.sandbox_supervisor)


def _tail(path: str, n: int) -> str:
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - n))
        return f.read().decode("utf-8", errors="replace")


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
        from .sandbox_ids import acquire_ids  # here, not at the top: sandbox_ids imports SandboxError from this module

        ids = acquire_ids()
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
            supervisor = os.path.abspath(sandbox_supervisor.__file__)
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", supervisor], stdin=subprocess.PIPE, stdout=out, stderr=err,
                pass_fds=(report_w, verdict_w), close_fds=True, start_new_session=True,
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
        raw_report = read_available(report_r, 1 << 20)
        verdict = read_available(verdict_r, 4096)
        stdout, stderr = _tail(out_path, 65536), _tail(err_path, 16384)
        sizes = [os.path.getsize(out_path), os.path.getsize(err_path)]
    finally:
        for fd in pipes:
            os.close(fd)
        if ids is not None:
            from .sandbox_ids import release_ids

            release_ids(ids[0], ids[2])
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
