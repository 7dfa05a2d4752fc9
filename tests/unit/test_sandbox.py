"""The code sandbox and the code reward against hostile programs, in every isolation mode the sandbox
can pick: each run ends within its limits with reward 0, and the host (files, processes, network, this
test process) is unharmed. A mode this machine cannot run fails its tests (it is not skipped): the
strong mode is expected wherever the project's tests run."""

import json
import logging
import os
import signal
import socket
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from r1mega.config import Config
from r1mega.rewards import ScoringPool, get_reward, sandbox
from r1mega.rewards.sandbox import _UID_BASE, MODES, Limits, SandboxRefused, run_python

FAST = Limits(cpu_s=2, wall_s=4.0, memory_bytes=512 << 20, max_procs=16, file_bytes=1 << 20, output_bytes=1 << 16,
              disk_bytes=8 << 20)
REPO = Path(__file__).resolve().parents[2]
code_accuracy, code_pass_rate = get_reward("code_accuracy"), get_reward("code_pass_rate")


def program(src: str) -> str:
    return textwrap.dedent(src).strip() + "\n"


def as_completion(src: str) -> str:
    return f"<think>plan</think>\n```python\n{program(src)}```"


def sandbox_processes(settle_s: float = 3.0) -> int:
    """Live processes owned by the sandbox's throwaway uids (root hosts; 0 elsewhere), after letting the
    kernel finish killing a run that just ended."""
    if os.geteuid() != 0:
        return 0
    deadline = time.monotonic() + settle_s
    while True:
        count = 0
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                status = open(f"/proc/{pid}/status").read()
            except OSError:
                continue
            uid = int(status.split("Uid:")[1].split()[0])
            state = status.split("State:")[1].split()[0]
            count += uid >= _UID_BASE and state != "Z"
        if count == 0 or time.monotonic() > deadline:
            return count
        time.sleep(0.1)


def escapes(action: str) -> str:
    """Program lines running the shell command `action` through os.system and through subprocess,
    printing what each gave."""
    return program(f"""
        import os, subprocess
        def attempt(route, fn):
            try:
                print(route, fn())
            except BaseException as e:
                print(route, "refused", type(e).__name__)
        attempt("system", lambda: os.system({action!r}))
        attempt("subprocess", lambda: subprocess.run(["sh", "-c", {action!r}], capture_output=True, text=True))
        """)


def test_isolation_in_force_is_the_strong_one(caplog):
    """On the machines the project's tests run on (root or user namespaces), the built-in namespace
    mode is what the sandbox picks, and it says so once."""
    sandbox.isolation.cache_clear()
    with caplog.at_level(logging.INFO, logger="r1mega.rewards.sandbox"):
        assert run_python("print(1)", "", FAST).ok and run_python("print(2)", "", FAST).ok
    assert sandbox.isolation()[0] == "namespace"
    said = [r.getMessage() for r in caplog.records if "isolation" in r.getMessage()]
    assert len(said) == 1 and "'namespace'" in said[0]


def test_weaker_mode_is_refused_unless_allowed(monkeypatch, caplog):
    real = sandbox._interpreter
    monkeypatch.setattr(sandbox, "_interpreter",
                        lambda mode: (None, "no namespaces") if mode == "namespace" else real(mode))
    monkeypatch.setenv(sandbox.ALLOW_ENV, "")  # and put back afterwards
    sandbox.isolation.cache_clear()
    try:
        with pytest.raises(SandboxRefused, match=r"reward\.sandbox\.allow=\[none\]"):
            run_python("print(1)")
        with pytest.raises(ValueError, match="unknown"):
            sandbox.allow_isolation(["bwrap"])
        sandbox.allow_isolation(["none"])
        with caplog.at_level(logging.WARNING, logger="r1mega.rewards.sandbox"):
            assert run_python("print(1)", "", FAST).stdout == "1\n"
        assert sandbox.isolation()[0] == "none" and "'none'" in caplog.text and "no namespaces" in caplog.text
    finally:
        sandbox.isolation.cache_clear()


def test_a_pool_with_a_code_reward_refuses_a_weaker_sandbox_before_scoring(monkeypatch, capsys):
    real = sandbox._interpreter
    monkeypatch.setattr(sandbox, "_interpreter",
                        lambda mode: (None, "no namespaces") if mode == "namespace" else real(mode))
    monkeypatch.setenv(sandbox.ALLOW_ENV, "")
    sandbox.isolation.cache_clear()
    try:
        ScoringPool({"math_accuracy": 1.0})  # no program to run: no sandbox needed
        with pytest.raises(SandboxRefused, match=r"reward\.sandbox\.allow=\[none\]"):
            ScoringPool({"math_accuracy": 1.0, "code_accuracy": 1.0})
        sandbox.allow_isolation(["none"])
        ScoringPool({"code_pass_rate": 1.0})
        assert "code sandbox: none isolation" in capsys.readouterr().out
    finally:
        sandbox.isolation.cache_clear()


def test_code_reward_io_and_call_tests():
    sample = {"tests": [{"input": "2 3\n", "output": "5"}, {"input": "10 -4", "output": "6\n"}]}
    good = as_completion("a, b = map(int, input().split())\nprint(a + b)")
    assert code_accuracy(good, sample).score == 1.0
    half = as_completion("a, b = map(int, input().split())\nprint(a + b if a < 5 else 0)")
    assert code_accuracy(half, sample).score == 0.0
    assert code_pass_rate(half, sample).score == 0.5
    assert code_accuracy(half, {**sample, "code_reward": "pass_rate"}).score == 0.5

    calls = {"tests": [{"call": "add(1, 2)", "expected": 3}, {"call": "add(0.1, 0.2)", "expected": "0.3"},
                       {"call": "pair('a')", "expected": "('a', 'a')"}, {"call": "pair('1')", "expected": "'1'"}]}
    solution = as_completion("""
        def add(a, b):
            return a + b
        def pair(x):
            print("noise without newline", end="")
            return (x, x) if x == 'a' else x
        if __name__ == "__main__":
            raise SystemExit("must not run")
        """)
    assert code_accuracy(solution, calls).score == 1.0
    wrong = as_completion("def add(a, b):\n    return a - b\ndef pair(x):\n    return [x, x]")
    out = code_pass_rate(wrong, calls)
    assert out.score == 0.25 and out.reason.startswith("call 0")  # pair('a') passes: lists ~ tuples
    assert code_accuracy("no code here", calls).score == 0.0


def test_call_results_cannot_be_forged_from_stdout():
    """A wrong solution printing, behind every string it can find in the driver, a passing result
    line: none of it counts (the driver's results do not travel on stdout, and nothing keys them)."""
    forger = as_completion("""
        import __main__, json, sys
        line = json.dumps({"ok": True, "repr": "3"})
        for value in list(vars(__main__).values()) + list(sys._getframe(0).f_globals.values()):
            for text in (value if isinstance(value, (list, tuple)) else [value]):
                if isinstance(text, str):
                    print("\\n" + text + line, flush=True)
        def add(a, b):
            return 0
        """)
    assert code_pass_rate(forger, {"tests": [{"call": "add(1, 2)", "expected": 3}] * 2}).score == 0.0


HOSTILE = {
    "infinite loop": "while True:\n    pass",
    "sleep forever": "import time\ntime.sleep(10**6)",
    "memory bomb": "x = []\nwhile True:\n    x.append(bytearray(50 << 20))",
    "huge file": "with open('big', 'wb') as f:\n    while True:\n        f.write(b'x' * (1 << 20))",
    "prints gigabytes": "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)",
    "closes stdout": "import os, time\nos.close(1)\ntime.sleep(0.2)",
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_program_scores_zero(name, mode, monkeypatch):
    monkeypatch.setattr(sandbox, "isolation", lambda: (mode, sandbox._interpreter(mode)[0]))
    result = run_python(program(HOSTILE[name]), "", FAST, mode=mode)
    # A program that closes its stdout may well exit 0: it ends, with nothing to show for it.
    assert (result.ok and result.stdout == "") if name == "closes stdout" else not result.ok
    sample = {"tests": [{"input": "", "output": "ok"}], "time_limit_s": 2}
    assert code_accuracy(as_completion(HOSTILE[name]), sample).score == 0.0
    assert sandbox_processes() == 0  # nothing left behind
    if name in ("infinite loop", "sleep forever"):
        assert result.timed_out or result.returncode in (-9, -24)  # wall clock or SIGXCPU/SIGKILL
    if name == "prints gigabytes":
        assert result.output_exceeded and len(result.stdout) <= FAST.output_bytes


@pytest.mark.parametrize("mode", MODES)
def test_signals_never_reach_the_host(mode):
    """The program signals this test process, its supervisor and PID 1, directly and through a shell;
    the run still ends normally (the supervisor relays its status) and nothing arrives here."""
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: received.append(1))
    try:
        src = f"""
            import os, signal
            for target in ({os.getpid()}, os.getppid(), 1):
                try:
                    os.kill(target, signal.SIGUSR1)
                except Exception as e:
                    print(type(e).__name__)
            """
        result = run_python(program(src) + escapes(f"kill -USR1 {os.getpid()}") + "print('survived')\n", "", FAST,
                            mode=mode)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert received == [] and result.ok and "survived" in result.stdout, result


@pytest.mark.parametrize("mode", MODES)
def test_fork_many_is_bounded(mode):
    # Bounded first: try 200 forks, each child sleeping; the process limit must stop it early.
    src = """
        import os, time
        n = 0
        for _ in range(200):
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                os.setsid()  # out of the run's session and group: the supervisor must still end it
                time.sleep(30)
                os._exit(0)
            n += 1
        print(n)
        """
    result = run_python(program(src), "", FAST, mode=mode)
    assert result.returncode == 0 and int(result.stdout) < FAST.max_procs
    assert sandbox_processes() == 0  # the sleeping children are gone with the run


@pytest.mark.parametrize("mode", MODES)
def test_fork_bomb_ends_and_leaves_nothing(mode):
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    result = run_python(program(bomb), "", Limits(cpu_s=2, wall_s=2.0, max_procs=16), mode=mode)
    assert not result.ok
    assert sandbox_processes() == 0


@pytest.mark.parametrize("mode", MODES)
def test_disk_use_is_bounded(mode):
    """Files of file_bytes each, in the run directory, /tmp and /dev/shm, until refused: the total
    stored never exceeds disk_bytes, and the host's directories get none of it."""
    tag = uuid.uuid4().hex
    src = f"""
        import os
        total, dirs = 0, [".", "/tmp", "/dev/shm"]
        for i in range(100):
            try:
                with open(os.path.join(dirs[i % 3], "{tag}-%d" % i), "wb") as f:
                    f.write(b"x" * {FAST.file_bytes})
                total += {FAST.file_bytes}
            except OSError:
                pass
        print(total)
        """
    result = run_python(program(src), "", FAST, mode=mode)
    assert result.ok and 0 < int(result.stdout) <= FAST.disk_bytes, result
    assert not list(Path("/tmp").glob(f"{tag}*")) and not list(Path("/dev/shm").glob(f"{tag}*"))


@pytest.fixture
def planted():
    """A world-readable file holding 'expected outputs' (as a dataset would) in a world-readable host
    directory, so that only the sandbox, not file permissions, keeps it from the program."""
    directory = tempfile.mkdtemp(prefix="r1mega-test-dataset-")
    os.chmod(directory, 0o755)
    path = Path(directory, "tests.jsonl")
    path.write_text(json.dumps({"input": "1 2", "output": "expected-" + uuid.uuid4().hex}) + "\n")
    path.chmod(0o644)
    yield path
    path.unlink()
    os.rmdir(directory)


@pytest.mark.parametrize("mode", MODES)
def test_host_files_cannot_be_read(mode, planted):
    secret = json.loads(planted.read_text())["output"]
    readme = (REPO / "README.md").read_text().splitlines()[2]
    src = f"""
        for path in ({str(planted)!r}, {str(REPO / "README.md")!r}):
            try:
                print(open(path).read())
            except OSError as e:
                print("refused", type(e).__name__)
        """
    src = program(src) + "".join(escapes(f"cat {path}") for path in (planted, REPO / "README.md"))
    result = run_python(src, "", FAST, mode=mode)
    seen = result.stdout + result.stderr + result.results
    assert "refused" in result.stdout and secret not in seen and readme not in seen, result


@pytest.mark.parametrize("mode", MODES)
def test_nothing_is_written_outside(mode):
    tag = uuid.uuid4().hex
    targets = [Path("/tmp", tag), Path("/dev/shm", tag), Path.home() / tag, REPO / tag]
    src = "import os\n"
    for target in targets:
        src += f"""
try:
    open({str(target)!r}, "w").write("x")
    print("wrote", {str(target)!r})
except OSError as e:
    print("refused", type(e).__name__)
"""
    body = program(src) + "".join(escapes(f"echo x > {target}") for target in targets)
    try:
        result = run_python(body, "", FAST, mode=mode)
        assert [t for t in targets if t.exists()] == [], result
    finally:
        for target in targets:
            target.unlink(missing_ok=True)


@pytest.mark.parametrize("mode", MODES)
def test_network_is_unreachable(mode):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    connect = f"import socket; s = socket.create_connection(('127.0.0.1', {port}), timeout=1); s.sendall(b'hi')"
    src = f"""
        import socket
        try:
            {connect}
            print("connected")
        except OSError as e:
            print("refused", type(e).__name__, e.errno)
        """
    result = run_python(program(src) + escapes(f"python3 -c \"{connect}\""), "", FAST, mode=mode)
    listener.setblocking(False)
    with pytest.raises(BlockingIOError):
        listener.accept()  # no connection from the sandbox is waiting on the host's loopback
    listener.close()
    assert "connected" not in result.stdout
    if mode == "namespace":  # an empty network namespace: no route, refused at once
        assert "refused OSError 101" in result.stdout, result


def test_namespace_mode_view():
    """What the program sees in the strong mode: a read-only root holding only the listed host paths
    and the interpreter's prefix, its own PID namespace, no capabilities, and a seccomp filter."""
    src = """
        import ctypes, errno, os
        print(sorted(os.listdir("/")))
        print(sorted(p for p in os.listdir("/proc") if p.isdigit()))
        status = dict(line.split(":\\t", 1) for line in open("/proc/self/status").read().splitlines() if ":\\t" in line)
        print(status["CapEff"].strip(), status["Seccomp"].strip(), os.getcwd())
        try:
            open("/evil", "w")
        except OSError as e:
            print(errno.errorcode[e.errno])
        libc = ctypes.CDLL(None, use_errno=True)
        for call in (lambda: libc.unshare(0x10000000), lambda: libc.memfd_create(b"x", 0),
                     lambda: libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)):
            print(call(), errno.errorcode[ctypes.get_errno()])
        """
    result = run_python(program(src), "", FAST, mode="namespace")
    assert result.ok, result
    lines = result.stdout.splitlines()
    prefix_top = Path(os.path.realpath(sandbox.isolation()[1])).parts[1]
    assert set(eval(lines[0])) <= {"bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "sandbox", "sbin",
                                   "tmp", "usr", prefix_top}
    assert eval(lines[1]) == ["1", "2"]  # init and the program only
    assert lines[2] == "0000000000000000 2 /sandbox"  # no capabilities, a seccomp filter
    assert lines[3:] == ["EROFS", "-1 EPERM", "-1 EPERM", "-1 EPERM"]


def test_config_declares_the_allow_list():
    assert Config().reward.sandbox.allow == []


def test_eval_cli_passes_its_allow_list_on(monkeypatch, tmp_path):
    from r1mega.cli.eval import run as run_eval
    from r1mega.config import SandboxConfig
    from r1mega.eval.config import EvalConfig

    monkeypatch.setenv(sandbox.ALLOW_ENV, "")
    with pytest.raises(Exception):  # no checkpoint there: it fails after accepting the allow list
        run_eval(EvalConfig(model_path=str(tmp_path / "missing"), sandbox=SandboxConfig(allow=["none"])))
    assert os.environ[sandbox.ALLOW_ENV] == "none"
