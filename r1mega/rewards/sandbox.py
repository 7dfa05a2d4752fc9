"""Run untrusted Python (model-written code) in a sandbox and capture its output, within limits.

Each run gets a fresh host directory (removed afterwards) holding the program as `main.py`; stdin comes
from a file; a third pipe (the program's fd 3) is a channel for a driver's results (code.py's
function-call tests), read apart from stdout. The run starts under a supervisor (`_launcher.py`) that
isolates it, starts the program's process and kills every process of the run when it ends. The host
enforces a wall-clock limit and an output limit (at most `output_bytes` read from each pipe; more
stops the run). The program's process has RLIMIT_CPU, RLIMIT_AS (memory per process), RLIMIT_NPROC,
RLIMIT_FSIZE (largest file), RLIMIT_NOFILE, RLIMIT_CORE, RLIMIT_MSGQUEUE and RLIMIT_MEMLOCK set with
soft = hard (it cannot raise them again); when the host runs as root it runs as a throwaway uid of its
own (so RLIMIT_NPROC, which never applies to root, counts the run's processes only).

Isolation modes, strongest first (the strongest that runs a trivial program is used; see `isolation()`):
- `namespace` (built in: Linux namespaces through ctypes, nothing to install; root, or unprivileged
  user namespaces): new mount, PID, network, IPC and UTS namespaces, plus a user namespace when the
  host is not root. The program sees a read-only root holding only /usr, /bin, /sbin, /lib*, the
  interpreter's prefix and /etc/ld.so.cache (read-only), null/zero/full/random/urandom and a /proc of
  its own PID namespace: no other host file (no home, /tmp, repository or dataset) exists for it. Its
  only writable storage is one tmpfs of `disk_bytes` holding /sandbox (the run directory, its cwd and
  HOME), /tmp and /dev/shm: nothing it writes reaches the host's disk or the host's /tmp or /dev/shm.
  No network interface but a loopback that is down (connecting anywhere, 127.0.0.1 included, fails).
  No capabilities, no_new_privs, and a seccomp filter refusing new namespaces, mounts, ptrace, SysV
  shared memory and message queues, memfds, keyrings, bpf, perf, userfaultfd and io_uring (x86_64 and
  aarch64: elsewhere this mode does not run). Every process of the run is killed when the program's
  first process ends or the run is stopped (the PID namespace ends with its init, which dies with the
  supervisor). Memory: at most max_procs x memory_bytes of address space, plus the disk_bytes tmpfs,
  plus the kernel's own per-user bounds on pipe and socket buffers.
- `none` (last resort; refused unless `reward.sandbox.allow` names it): the limits, the throwaway uid
  on root hosts (files and processes of other users out of reach), the supervisor as a child subreaper
  that kills every process left below it, and an audit hook (`_guest.py`) refusing to Python code
  sockets, reading outside the run directory and the interpreter, writing outside the run directory,
  more than disk_bytes // file_bytes new files per process (so at most max_procs x disk_bytes on
  disk), starting programs, signalling other processes and ctypes. An audit hook is not a security
  boundary (code written to get around it can), and on a non-root host the program runs as the host's
  user: use it for trusted code only.

Deliberately left out: cgroups (memory is bounded per process, see above), languages other than
Python, and keeping an interpreter warm between runs.
"""

from __future__ import annotations

import json
import logging
import os
import random
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

MIB = 1 << 20
MODES = ("namespace", "none")  # strongest first
ALLOW_ENV = "R1MEGA_SANDBOX_ALLOW"  # weaker modes accepted (comma-separated), from reward.sandbox.allow
_HERE = Path(__file__).parent
_UID_BASE, _UID_SPAN = 2_000_000_000, 100_000_000  # throwaway uids, far above any real account's
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    cpu_s: int = 5                 # RLIMIT_CPU, seconds of CPU time
    wall_s: float = 10.0           # wall-clock, enforced by the host
    memory_bytes: int = 1024 * MIB  # RLIMIT_AS, address space per process
    max_procs: int = 32            # RLIMIT_NPROC (per throwaway uid when the host is root)
    file_bytes: int = 16 * MIB     # RLIMIT_FSIZE, largest file the program may write
    open_files: int = 64           # RLIMIT_NOFILE
    output_bytes: int = 1 * MIB    # read from stdout, stderr and the results pipe at most, stop beyond
    disk_bytes: int = 64 * MIB     # all the program may store (namespace: its tmpfs; none: see above)
    inodes: int = 4096             # files and directories on that tmpfs


@dataclass
class SandboxResult:
    returncode: int | None  # None when the host stopped the run; negative: killed by that signal
    stdout: str
    stderr: str
    timed_out: bool = False
    output_exceeded: bool = False
    wall_s: float = 0.0
    results: str = ""  # what the program wrote to fd 3

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.output_exceeded


class SandboxRefused(RuntimeError):
    """The machine offers only a weaker isolation than required, and the config does not allow it."""


def allow_isolation(modes) -> None:
    """Accept the weaker modes named (reward.sandbox.allow) in this process and the scoring workers
    it starts afterwards (they inherit the environment)."""
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise ValueError(f"reward.sandbox.allow: unknown isolation modes {unknown} (modes: {list(MODES)})")
    os.environ[ALLOW_ENV] = ",".join(modes)
    isolation.cache_clear()


def _is_root() -> bool:
    return os.geteuid() == 0


def _pick_uid() -> int | None:
    return _UID_BASE + random.randrange(_UID_SPAN) if _is_root() else None


def _remove_tree(path: str) -> None:
    def retry(func, target, _exc):  # a hostile program may have chmod-ed its files to 000
        os.chmod(os.path.dirname(target), 0o700)
        os.chmod(target, 0o700)
        func(target)

    shutil.rmtree(path, onexc=retry) if sys.version_info >= (3, 12) else shutil.rmtree(path, onerror=retry)


def _stop(proc: subprocess.Popen) -> None:
    """Stop the run: SIGTERM lets the supervisor kill what is below it, SIGKILL to the group follows."""
    try:
        proc.terminate()
        proc.wait(timeout=2)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_bounded(proc: subprocess.Popen, fds: list[int], limits: Limits,
                  deadline: float) -> tuple[list[bytes], bool, bool]:
    """Drain the pipes until all close or the process ends, with the wall and output limits."""
    selector = selectors.DefaultSelector()
    buffers = {fd: bytearray() for fd in fds}
    for fd in fds:
        os.set_blocking(fd, False)
        selector.register(fd, selectors.EVENT_READ)
    timed_out = exceeded = False
    while selector.get_map() and not exceeded:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        events = selector.select(timeout=min(left, 0.05))
        for key, _ in events:
            chunk = os.read(key.fd, 65536)
            if not chunk:
                selector.unregister(key.fd)
            buffers[key.fd] += chunk
            exceeded = exceeded or len(buffers[key.fd]) > limits.output_bytes
        if not events and proc.poll() is not None:
            break  # exited; in mode none a leftover process could still hold a pipe open
    selector.close()
    return [bytes(buffers[fd][: limits.output_bytes]) for fd in fds], timed_out, exceeded


def _prepare(workdir: str, code: str, stdin: str, uid: int | None) -> None:
    Path(workdir, "main.py").write_text(code)
    Path(workdir, "stdin.txt").write_text(stdin)
    for name in ("_launcher.py", "_guest.py"):  # the throwaway uid may not reach the package's files
        shutil.copyfile(_HERE / name, os.path.join(workdir, name))
    os.chmod(workdir, 0o755)
    if uid is not None:
        os.chown(workdir, uid, uid)


def _run(mode: str, python: str, code: str, stdin: str, limits: Limits) -> SandboxResult:
    uid = _pick_uid()
    workdir = tempfile.mkdtemp(prefix="r1mega-sandbox-")
    results_r, results_w = os.pipe()
    try:
        _prepare(workdir, code, stdin, uid)
        config = {**asdict(limits), "mode": mode, "dir": workdir, "uid": uid, "results_fd": results_w}
        argv = [python, "-I", "-B", os.path.join(workdir, "_launcher.py"), json.dumps(config)]
        started = time.monotonic()
        with open(os.path.join(workdir, "stdin.txt"), "rb") as stdin_file:
            proc = subprocess.Popen(argv, stdin=stdin_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    pass_fds=(results_w,), start_new_session=True, cwd=workdir,
                                    env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
        os.close(results_w)
        results_w = None
        try:
            fds = [proc.stdout.fileno(), proc.stderr.fileno(), results_r]
            (out, err, results), timed_out, exceeded = _read_bounded(proc, fds, limits, started + limits.wall_s)
        finally:
            if proc.poll() is None:
                _stop(proc)
            proc.stdout.close()
            proc.stderr.close()
            returncode = proc.wait()
            if mode == "none" and uid is not None:  # the supervisor itself may have been stopped by SIGKILL
                subprocess.run(["kill", "-9", "-1"], user=uid, group=uid, extra_groups=[],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        killed = timed_out or exceeded
        decode = lambda data: data.decode("utf-8", "replace")  # noqa: E731
        return SandboxResult(None if killed else returncode, decode(out), decode(err), timed_out, exceeded,
                             time.monotonic() - started, decode(results))
    finally:
        os.close(results_r)
        if results_w is not None:
            os.close(results_w)
        _remove_tree(workdir)


@lru_cache(maxsize=None)
def _interpreter(mode: str) -> tuple[str | None, str]:
    """(a Python that runs a trivial program in `mode`, or None; why not). The throwaway uid of mode
    none may not reach this interpreter (pyenv under /root): any Python 3 with its standard library
    will do for the programs."""
    pythons = dict.fromkeys([os.path.realpath(sys.executable), "/usr/bin/python3", "/usr/local/bin/python3"])
    why = "no interpreter"
    for python in filter(os.path.exists, pythons):
        try:
            result = _run(mode, python, "print('ok')", "", Limits(wall_s=20))
        except OSError as exc:
            why = str(exc)
            continue
        if result.ok and result.stdout.strip() == "ok":
            return python, ""
        why = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
    return None, why


@lru_cache(maxsize=None)
def isolation() -> tuple[str, str]:
    """(mode, interpreter) in force: the strongest mode that runs here, said once per process; a weaker
    one than `namespace` is refused unless allowed by name (reward.sandbox.allow, see allow_isolation)."""
    allowed = set(filter(None, os.environ.get(ALLOW_ENV, "").split(",")))
    strongest_failure = None
    for mode in MODES:
        python, why = _interpreter(mode)
        if python is None:
            strongest_failure = strongest_failure or f"{mode}: {why}"
            continue
        if mode != MODES[0] and mode not in allowed:
            raise SandboxRefused(
                f"the code sandbox can only run in mode {mode!r} here ({strongest_failure}), weaker than "
                f"{MODES[0]!r}; set reward.sandbox.allow=[{mode}] (r1mega-eval: sandbox.allow=[{mode}]) to accept it")
        (log.warning if mode != MODES[0] else log.info)(
            "code sandbox: isolation %r with %s%s", mode, python,
            f" (allowed by reward.sandbox.allow; {strongest_failure})" if strongest_failure else "")
        return mode, python
    raise SandboxRefused(f"the code sandbox cannot run Python here ({strongest_failure})")


def isolation_report() -> dict[str, object]:
    """Which isolation is in force on this machine (see the module docstring for what each guarantees)."""
    mode, python = isolation()
    return {"mode": mode, "python": python, "throwaway_uid": _is_root(), "user_namespace": mode == "namespace"
            and not _is_root(), "allowed_weaker": os.environ.get(ALLOW_ENV, "")}


def run_python(code: str, stdin: str = "", limits: Limits = Limits(), mode: str | None = None) -> SandboxResult:
    """Run `code` as a Python program with `stdin`, in the sandbox, within `limits`. `mode` forces an
    isolation mode (it must run here); None takes the one in force (`isolation()`)."""
    if mode is None:
        mode, python = isolation()
    else:
        python, why = _interpreter(mode)
        if python is None:
            raise SandboxRefused(f"the code sandbox cannot run in mode {mode!r} here: {why}")
    return _run(mode, python, code, stdin, limits)
