"""The sandbox's supervisor: the process :func:`selfmoe.sandbox.run_python` starts for each run.

It runs as a script (``python -I -S -B sandbox_supervisor.py``), reads the run's request as JSON on
stdin, and, single-threaded so that ``fork`` and ``unshare`` are safe (see :mod:`selfmoe.sandbox` for
why): becomes a child subreaper, enters new namespaces where the machine allows, makes private tmp
dirs and exposes the Python installation to the sandbox uid, writes ``program.py``, forks the program
(under a pid namespace's init when there is one), which drops to its limits and uid and execs the
trusted :data:`RUNNER`, waits for it within the timeout, kills and reaps every descendant, and writes
a JSON report to an inherited pipe. It judges nothing: the evaluator reads the verdict pipe itself.

Because ``-I -S`` leaves site-packages (and so ``selfmoe``) off ``sys.path``, this file imports only
the standard library, and the evaluator imports from it (:data:`RUNNER`, :func:`read_available`)
rather than the other way round. What is and is not contained is documented in :mod:`selfmoe.sandbox`.
"""
from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import struct
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

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


# ----------------------------------------------------------------------------------------------------
# System calls and namespaces


def _libc() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    libc.unshare.argtypes = [ctypes.c_int]
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    return libc


class _SetupError(Exception):
    """The machine cannot run the sandbox as asked; the message is meant for the user as it is."""


def _check(libc: Any, ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _try_unshare(libc: Any, flags: int) -> bool:
    return libc.unshare(flags) == 0


def _mount(libc: Any, src: Optional[str], target: str, fstype: Optional[str], flags: int, data: Optional[str] = None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(libc, libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def _unshare(libc: Any, flags: int, root: bool, notes: List[str]) -> Tuple[bool, bool]:
    """Enter the namespaces in ``flags`` (as non-root inside a new user namespace that maps only the
    caller's ids): ``(unshared, user_namespace)``. Failing is not an error: the run goes on without
    them and ``notes`` says why."""
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
    return unshared, userns


# ----------------------------------------------------------------------------------------------------
# Mounts: private tmp dirs, and the Python installation reachable by the sandbox uid


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


def _closed_python_ancestors(uid: int) -> List[str]:
    """The directories on the way to the Python installation that ``uid`` cannot enter (to be exposed by
    :func:`_setup_mounts`); an installation directory it cannot read itself is a setup error."""
    fix: List[str] = []
    for p in _python_dirs():
        closed = _closed_ancestor(p)
        if closed == p:
            raise _SetupError(f"programs run as uid {uid}, but {p} (part of the Python installation) is not "
                              "readable by other users: make it so (chmod o+rx), or use "
                              "SandboxConfig(drop_privileges=False)")
        if closed is not None:
            fix.append(closed)
    return fix


def _setup_mounts(libc: Any, req: Dict[str, Any], fix: List[str]) -> Tuple[bool, Optional[str]]:
    """Private tmp dirs and reachable Python dirs in the new mount namespace: ``(private_tmp, workdir)``."""
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)
    needed = _python_dirs()
    covers: Dict[str, str] = {}
    if req["private_tmp"]:
        # A Python that lives under one of these (a venv in /tmp, as CI clones may have) is bound back
        # into the fresh tmpfs below, like the closed directories on the way to it.
        for d in ("/tmp", "/var/tmp", "/dev/shm"):
            if os.path.isdir(d) and not os.path.islink(d):
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


# ----------------------------------------------------------------------------------------------------
# Processes: counting, finding and killing the program's descendants


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


# ----------------------------------------------------------------------------------------------------
# Pipes


def read_available(fd: int, limit: Optional[int] = None) -> bytes:
    """What a pipe holds now (at most ``limit`` bytes), never blocking: a stray writer (a program's
    leftover descendant) may keep the pipe open, so waiting for its end could wait forever. Used on
    both sides: here for the program's status and exec error, by the evaluator for the report and the
    verdict."""
    os.set_blocking(fd, False)
    chunks, total = [], 0
    while limit is None or total < limit:
        try:
            b = os.read(fd, 65536 if limit is None else min(65536, limit - total))
        except BlockingIOError:
            break
        if not b:
            break
        chunks.append(b)
        total += len(b)
    return b"".join(chunks)


def _drain(fd: int) -> bytes:
    data = read_available(fd)
    os.close(fd)
    return data


def _read_status(fd: int) -> Optional[int]:
    data = _drain(fd)
    return struct.unpack("i", data[:4])[0] if len(data) >= 4 else None


# ----------------------------------------------------------------------------------------------------
# The run: program process, supervision, report


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


def _wait(main: int, deadline: float) -> Tuple[Optional[int], bool, bool]:
    """Wait for the process ``main`` until ``deadline`` (monotonic) or a SIGTERM from the evaluator
    (both blocked, so they arrive through ``sigtimedwait`` only): ``(wait status or None, timed_out,
    interrupted)``."""
    timed_out = interrupted = False
    status: Optional[int] = None
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
    return status, timed_out, interrupted


def _supervise(req: Dict[str, Any]) -> Dict[str, Any]:
    """One run, from entering the namespaces to the report (see the module docstring). Raises on a
    setup failure, which :func:`_supervisor_main` reports as ``{"error": ...}``."""
    libc = _libc()
    notes: List[str] = []
    uid, gid = req["uid"], req["gid"]
    root = os.geteuid() == 0
    _check(libc, libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(CHILD_SUBREAPER)")

    fix = _closed_python_ancestors(uid) if uid is not None else []
    flags = ((CLONE_NEWNET if req["network"] else 0) | (CLONE_NEWPID if req["pid_ns"] else 0)
             | (CLONE_NEWNS if req["private_tmp"] or fix else 0))
    flags |= CLONE_NEWIPC if flags else 0
    unshared, userns = _unshare(libc, flags, root, notes)
    if fix and not (unshared and flags & CLONE_NEWNS):
        raise _SetupError(f"programs run as uid {uid}, but other users cannot enter {fix[0]} on the way to the "
                          "Python installation, and without a mount namespace it cannot be exposed: make it "
                          "enterable (chmod o+x), or use SandboxConfig(drop_privileges=False)")
    private, workdir = False, None
    if unshared and flags & CLONE_NEWNS:
        private, workdir = _setup_mounts(libc, req, fix)
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

    status, timed_out, interrupted = _wait(main, start + req["timeout"])
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


def _supervisor_main() -> int:
    """Read the request on stdin, run it, write the report to ``report_fd``; always exits 0 (the report,
    not the exit status, says how the run went)."""
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
