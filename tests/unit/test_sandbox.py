"""The code sandbox and the code reward against hostile programs: each run ends within its limits
with reward 0, and the host (files, processes, network, this test process) is unharmed."""

import os
import socket
import textwrap
import time

import pytest

from r1mega.rewards import get_reward
from r1mega.rewards.sandbox import _UID_BASE, Limits, isolation_report, run_python

FAST = Limits(cpu_s=2, wall_s=4.0, memory_bytes=512 << 20, max_procs=16, file_bytes=1 << 20, output_bytes=1 << 16)
code_accuracy, code_pass_rate = get_reward("code_accuracy"), get_reward("code_pass_rate")
ISOLATED = isolation_report()["network_namespace"]


def program(src: str) -> str:
    return textwrap.dedent(src).strip() + "\n"


def as_completion(src: str) -> str:
    return f"<think>plan</think>\n```python\n{program(src)}```"


def sandbox_processes(settle_s: float = 3.0) -> int:
    """Live processes owned by the sandbox's throwaway uids (root hosts only), after letting the
    kernel finish killing a run that just ended."""
    if os.geteuid() != 0:
        pytest.skip("throwaway uids need a root host")
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


def test_isolation_report_names_a_mode():
    report = isolation_report()
    assert report["mode"] in ("bwrap", "unshare", "none")
    print(report)


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


HOSTILE = {
    "infinite loop": "while True:\n    pass",
    "sleep forever": "import time\ntime.sleep(10**6)",
    "memory bomb": "x = []\nwhile True:\n    x.append(bytearray(50 << 20))",
    "huge file": "with open('big', 'wb') as f:\n    while True:\n        f.write(b'x' * (1 << 20))",
    "prints gigabytes": "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)",
    "kills its parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nprint('ok')",
    "closes stdout": "import os, time\nos.close(1)\ntime.sleep(0.2)",
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_program_scores_zero(name):
    result = run_python(program(HOSTILE[name]), "", FAST)
    # A program that closes its stdout may well exit 0: it ends, with nothing to show for it.
    assert (result.ok and result.stdout == "") if name == "closes stdout" else not result.ok
    assert code_accuracy(as_completion(HOSTILE[name]), {"tests": [{"input": "", "output": "ok"}], "time_limit_s": 2}).score == 0.0
    assert sandbox_processes() == 0  # nothing left behind
    if name in ("infinite loop", "sleep forever"):
        assert result.timed_out or result.returncode in (-9, -24)  # wall clock or SIGXCPU/SIGKILL
    if name == "prints gigabytes":
        assert result.output_exceeded and len(result.stdout) <= FAST.output_bytes


def test_fork_many_is_bounded():
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
                time.sleep(30)
                os._exit(0)
            n += 1
        print(n)
        """
    result = run_python(program(src), "", FAST)
    assert result.returncode == 0 and int(result.stdout) < FAST.max_procs
    assert sandbox_processes() == 0  # the sleeping children are gone with the run


def test_fork_bomb_ends_and_leaves_nothing():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    result = run_python(program(bomb), "", Limits(cpu_s=2, wall_s=2.0, max_procs=16))
    assert not result.ok
    assert sandbox_processes() == 0


def test_files_outside_the_run_directory_are_untouched(tmp_path):
    canary = tmp_path / "canary.txt"
    canary.write_text("secret-canary")
    src = f"""
        import os, shutil
        for action in (lambda: print(open({str(canary)!r}).read()), lambda: os.remove({str(canary)!r}),
                       lambda: shutil.rmtree({str(tmp_path)!r}), lambda: open({str(canary)!r}, 'w').write('x')):
            try:
                action()
            except OSError as e:
                print(type(e).__name__)
        open('inside.txt', 'w').write('fine')
        print(open('inside.txt').read())
        """
    result = run_python(program(src), "", FAST)
    assert canary.read_text() == "secret-canary"
    assert "secret-canary" not in result.stdout and "fine" in result.stdout


def test_network_is_unreachable():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    src = f"""
        import socket
        for host in ("127.0.0.1", "1.1.1.1"):
            s = socket.socket()
            s.settimeout(1.0)
            try:
                s.connect((host, {port} if host == "127.0.0.1" else 80))
                s.sendall(b"hello")
                print(host, "connected")
            except OSError as e:
                print(host, type(e).__name__, getattr(e, "errno", None))
        """
    result = run_python(program(src), "", FAST)
    with pytest.raises(socket.timeout):
        listener.accept()  # nothing from the sandbox ever reached the host's loopback
    listener.close()
    assert "connected" not in result.stdout
    if ISOLATED:
        # An empty network namespace refuses at once (no route): no packet can leave, no timeout.
        assert "1.1.1.1 OSError 101" in result.stdout and "timeout" not in result.stdout
