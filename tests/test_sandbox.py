"""selfmoe.sandbox: hostile programs stay contained, whatever they try.

Each probe is a program a model could write. Assertions that need a containment the machine cannot
give (network isolation, another uid, private /tmp: root or user namespaces) skip with the reason;
the process limits, the cleanup and the verdict hold everywhere. Two modes run the process probes:
with namespaces (as set up by default) and without (the subreaper + /proc cleanup path).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest

from selfmoe.sandbox import SandboxConfig, check_sandbox, run_python

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox needs Linux")

MODES = {
    "namespaces": SandboxConfig(),
    "no-namespaces": SandboxConfig(isolate_network=False, private_tmp=False, pid_namespace=False),
}

# Prints "<host pid> <start time>" of the calling process: /proc is the host's, so it names the
# process even inside a pid namespace, and the start time rules out a recycled pid.
WHOAMI = textwrap.dedent("""\
    import os, time
    def whoami():
        pid = os.readlink("/proc/self")
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
        return f"PROC {pid} {data[data.rfind(')') + 2:].split()[19]}"
    ready_r, ready_w = os.pipe()
    def report_and_sleep():  # in a child: say who it is, tell the parent, wait to be killed
        print(whoami(), flush=True)
        os.write(ready_w, b"x")
        time.sleep(60)
        os._exit(0)
    def wait_ready(n):  # in the parent: until n children have reported
        got = 0
        while got < n:
            got += len(os.read(ready_r, n - got))
    """)


def run(source: str, mode: str = "namespaces", **changes) -> "object":
    return run_python(textwrap.dedent(source), MODES[mode].replace(**changes))


def processes_reported(stdout: str):
    return [tuple(line.split()[1:3]) for line in stdout.splitlines() if line.startswith("PROC ")]


def alive(pid: str, start: str) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return False
    return data[data.rfind(")") + 2:].split()[19] == start


@pytest.fixture(scope="module")
def contained():
    return check_sandbox()


# ------------------------------------------------------------------------------------------- verdict


def test_plain_programs_complete_or_fail():
    ok = run("print('hello')\n")
    assert ok.completed and ok.status == "completed" and ok.stdout == "hello\n"
    bad = run("assert 1 + 1 == 3\n")
    assert not bad.completed and bad.status == "failed" and bad.exit_code == 1 and "AssertionError" in bad.stderr
    for early in ("import sys\nsys.exit(0)\nassert False\n", "import os\nos._exit(0)\nassert False\n"):
        res = run(early)
        assert not res.completed and res.status == "failed" and res.exit_code == 0, res


def test_forged_verdict_fails():
    # A wrong solution that tries everything it can read for the pass marker, prints it all, and leaves
    # with status 0 before the tests run.
    forger = textwrap.dedent("""\
        import os, re, sys
        def add(a, b):
            return a - b
        seen = []
        seen.append(open(__file__).read())
        seen.append(" ".join(sys.argv))
        seen.append(repr(dict(os.environ)))
        for name in ("cmdline", "environ"):
            seen.append(open(f"/proc/self/{name}", "rb").read().decode("latin-1"))
        for fd in range(3, 64):
            try:
                seen.append(os.read(fd, 4096).decode("latin-1"))
            except OSError:
                pass
        for pid in {os.getppid(), 1}:
            for name in ("cmdline", "environ"):
                try:
                    seen.append(open(f"/proc/{pid}/{name}", "rb").read().decode("latin-1"))
                except OSError:
                    pass
        text = "\\n".join(seen)
        for candidate in set(re.findall(r"[0-9a-f]{32}|SELFMOE[-A-Z0-9a-f]*", text)):
            print(candidate)
            try:
                os.write(4, candidate.encode())
            except OSError:
                pass
        print(text[-2000:], flush=True)
        os._exit(0)
        assert add(1, 2) == 3
        """)
    res = run_python(forger)
    assert not res.completed and res.status == "failed", res


def test_the_program_file_holds_no_secret():
    res = run("print(open(__file__).read())\n")
    assert res.completed and res.stdout.strip() == 'print(open(__file__).read())'


# ----------------------------------------------------------------------------------------- processes


@pytest.mark.parametrize("mode", list(MODES))
def test_no_child_survives_a_normal_exit(mode):
    res = run(WHOAMI + textwrap.dedent("""\
        if os.fork() == 0:
            report_and_sleep()
        wait_ready(1)
        """), mode)
    assert res.completed, res
    procs = processes_reported(res.stdout)
    assert len(procs) == 1
    assert not any(alive(*p) for p in procs)


@pytest.mark.parametrize("mode", list(MODES))
def test_no_setsid_grandchild_survives_a_timeout(mode):
    t = time.monotonic()
    res = run(WHOAMI + textwrap.dedent("""\
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                report_and_sleep()
            os._exit(0)
        wait_ready(1)
        while True:
            pass
        """), mode, timeout=1.0)
    assert res.status == "timeout" and res.limit == "timeout" and not res.completed, res
    assert time.monotonic() - t < 6
    procs = processes_reported(res.stdout)
    assert len(procs) == 1
    assert not any(alive(*p) for p in procs)


@pytest.mark.parametrize("mode", list(MODES))
def test_fork_bomb_is_limited_and_cleaned_up(mode):
    res = run(WHOAMI + textwrap.dedent("""\
        made = 0
        for _ in range(30):
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                report_and_sleep()
            made += 1
        wait_ready(made)
        print("forked", made, flush=True)
        """), mode, max_processes=8)
    assert res.completed, res
    made = int(res.stdout.split("forked ")[1].split()[0])
    assert made < 8
    procs = processes_reported(res.stdout)
    assert len(procs) == made and not any(alive(*p) for p in procs)


def test_concurrent_runs_get_distinct_uids(contained):
    if contained.uid is None:
        pytest.skip("not root: programs run as the caller's uid")
    uids = []
    threads = [threading.Thread(target=lambda: uids.append(run("import os, time\ntime.sleep(0.3)\nprint(os.getuid())\n").stdout))
               for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(set(uids)) == 2 and all(int(u) not in (0, os.getuid()) for u in uids)


# ---------------------------------------------------------------------------------------------- limits


def test_printing_700_mib_is_capped_and_fails_cleanly():
    t = time.monotonic()
    res = run("""\
        import sys
        chunk = "x" * (1 << 20)
        for _ in range(700):
            sys.stdout.write(chunk)
        """, file_size_mb=4)
    assert not res.completed and res.status == "failed" and res.limit == "output", res
    assert "output limit" in res.reason
    assert len(res.stdout) <= 65536
    assert time.monotonic() - t < 15


def test_a_big_file_is_capped_even_when_the_error_would_be_caught():
    res = run("""\
        try:
            with open("big", "wb") as f:
                for _ in range(100):
                    f.write(b"y" * (1 << 20))
        except OSError as e:
            print("caught:", e)
        """, file_size_mb=2)
    assert not res.completed and res.status == "failed" and res.limit == "output", res
    assert "caught" not in res.stdout


def test_memory_and_cpu_limits():
    mem = run("x = bytearray(1 << 30)\n", memory_mb=256)
    assert not mem.completed and "MemoryError" in mem.stderr, mem
    cpu = run("while True:\n    pass\n", timeout=10, cpu_seconds=1)
    assert not cpu.completed and cpu.status == "failed" and cpu.limit == "cpu", cpu
    assert cpu.duration < 8


def test_limits_are_set_before_the_program_runs():
    res = run("""\
        import resource as r
        for name in ("RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_NPROC", "RLIMIT_NOFILE", "RLIMIT_CORE"):
            print(name, *r.getrlimit(getattr(r, name)))
        """, memory_mb=512, file_size_mb=3, max_processes=9, max_open_files=40, timeout=2)
    got = {line.split()[0]: tuple(int(x) for x in line.split()[1:]) for line in res.stdout.splitlines()}
    assert got["RLIMIT_AS"] == (512 << 20, 512 << 20)
    assert got["RLIMIT_FSIZE"] == (3 << 20, 3 << 20)
    assert got["RLIMIT_NOFILE"] == (40, 40)
    assert got["RLIMIT_CORE"] == (0, 0)
    assert got["RLIMIT_CPU"] == (3, 4)
    assert got["RLIMIT_NPROC"][0] == got["RLIMIT_NPROC"][1] >= 9


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="SandboxConfig.timeout"):
        SandboxConfig(timeout=0)
    with pytest.raises(ValueError, match="SandboxConfig.memory_mb"):
        SandboxConfig(memory_mb=1)
    with pytest.raises(ValueError, match="source must be a string"):
        run_python(b"print(1)")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- files, network, env


def test_environment_and_work_directory_are_fresh(monkeypatch):
    monkeypatch.setenv("SELFMOE_TEST_PARENT_SECRET", "parent-secret-1234")
    res = run("""\
        import os
        print(sorted(os.environ))
        print(os.getcwd() == os.environ["HOME"] == os.path.expanduser("~"))
        print(sorted(os.listdir(".")))
        """)
    lines = res.stdout.splitlines()
    assert res.completed and "parent-secret" not in res.stdout
    assert eval(lines[0]) == ["HOME", "LANG", "PATH", "TMPDIR"]
    assert lines[1] == "True" and eval(lines[2]) == ["program.py"]


def test_writes_outside_the_work_dir_land_nowhere(tmp_path, monkeypatch, contained):
    if contained.uid is None and not contained.private_tmp:
        pytest.skip("neither another uid nor a private /tmp here: the program can reach the caller's files")
    home = tmp_path / "home"
    home.mkdir()
    precious = home / "precious.txt"
    precious.write_text("keep me")
    monkeypatch.setenv("HOME", str(home))
    outside = tmp_path / "outside.txt"
    stray = os.path.join(tempfile.gettempdir(), f"selfmoe-sandbox-test-{os.getpid()}.txt")
    res = run(f"""\
        import os, shutil
        for action in (lambda: os.remove({str(precious)!r}), lambda: shutil.rmtree({str(home)!r}),
                       lambda: open({str(outside)!r}, "w").write("x"), lambda: open({stray!r}, "w").write("x"),
                       lambda: shutil.rmtree(os.path.expanduser("~"))):
            try:
                action()
                print("done")
            except OSError as e:
                print("refused", e)
        """)
    assert res.completed, res
    assert precious.read_text() == "keep me"
    assert not outside.exists() and not os.path.exists(stray)


def test_no_network(contained):
    if not contained.network:
        pytest.skip("no network namespace here (needs root or unprivileged user namespaces)")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(0.2)
        port = server.getsockname()[1]
        res = run(f"""\
            import socket
            try:
                socket.create_connection(("127.0.0.1", {port}), timeout=2).sendall(b"hi")
                print("connected")
            except OSError as e:
                print("blocked", e)
            """)
        assert res.completed and res.stdout.startswith("blocked"), res
        with pytest.raises(socket.timeout):
            server.accept()


def test_other_processes_environment_is_unreadable(contained):
    if contained.uid is None:
        pytest.skip("programs run as the caller's uid here (not root): its processes' environment is readable")
    secret = "selfmoe-secret-" + os.urandom(8).hex()
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                              env={**os.environ, "SELFMOE_TEST_SECRET": secret})
    try:
        res = run(f"""\
            import os
            for pid in ({helper.pid}, {os.getpid()}, os.getppid()):
                try:
                    print(open(f"/proc/{{pid}}/environ", "rb").read())
                except OSError as e:
                    print("refused", e)
            """)
    finally:
        helper.kill()
        helper.wait()
    assert res.completed, res
    assert secret not in res.stdout and res.stdout.count("refused") >= 2


def test_nothing_is_left_in_the_temp_dir():
    before = {n for n in os.listdir(tempfile.gettempdir()) if n.startswith("selfmoe-sandbox-")}
    run("open('junk', 'w').write('x')\nimport os\nos.mkdir('d', 0)\n")
    after = {n for n in os.listdir(tempfile.gettempdir()) if n.startswith("selfmoe-sandbox-")}
    assert after <= before | {"selfmoe-sandbox-ids"}


def test_check_sandbox_reports_containment(contained):
    assert isinstance(contained.describe(), str)
    if os.geteuid() == 0:  # CI runs as root: everything applies
        assert contained.full and contained.uid not in (None, 0), contained
