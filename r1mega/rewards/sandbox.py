"""Run untrusted Python (model-written code) in a sandbox and capture its output, within limits.

Each run gets a fresh temporary directory (removed afterwards) holding the program as `main.py`; stdin
comes from a file. The program runs under a small launcher (`_launcher.py`, the child's first code)
that lowers its own resource limits for good (soft = hard) before running it: RLIMIT_CPU, RLIMIT_AS
(memory), RLIMIT_NPROC (processes), RLIMIT_FSIZE (file size), RLIMIT_NOFILE and no core dumps.
The host enforces a wall-clock limit and an output limit (at most `output_bytes` read from stdout and
stderr each; more kills the run) and kills the run's whole process group on either.

Isolation, the strongest this machine allows (chosen once per process, see `isolation_report()`; the
environment variable R1MEGA_SANDBOX=bwrap|unshare|none forces one):
- `bwrap` (bubblewrap): new user, PID, network, IPC and UTS namespaces; `/` bound read-only with
  private tmpfs over /tmp, /var/tmp, /home, /root and /run (the Python installation bound back
  read-only), the run directory the only writable place; the sandbox dies with its parent.
- `unshare`: new PID, network, IPC and UTS namespaces (util-linux `unshare`), no filesystem isolation.
- `none`: resource limits only, plus an audit hook in the launcher that refuses sockets, writes and
  deletions outside the run directory and signals to the parent. Audit hooks can be bypassed (ctypes),
  so this is a last resort.
In every mode, when the host runs as root the program runs as a throwaway uid of its own: it then
cannot touch the host's files or processes, and RLIMIT_NPROC (which never applies to root) bounds a
fork bomb. The PID namespace (bwrap, unshare) ends every process of the run when the run ends.

Deliberately left out: seccomp filters, cgroups (memory is bounded by RLIMIT_AS per process), languages
other than Python, and keeping an interpreter warm between runs.
"""

from __future__ import annotations

import json
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
_LAUNCHER = Path(__file__).with_name("_launcher.py")
_UID_BASE, _UID_SPAN = 2_000_000_000, 100_000_000  # throwaway uids, far above any real account's
_HIDDEN_DIRS = ("/tmp", "/var/tmp", "/home", "/root", "/run")
_SANDBOX_DIR = "/tmp/run"  # on the private /tmp


@dataclass(frozen=True)
class Limits:
    cpu_s: int = 5                 # RLIMIT_CPU, seconds of CPU time
    wall_s: float = 10.0           # wall-clock, enforced by the host
    memory_bytes: int = 1024 * MIB  # RLIMIT_AS, address space per process
    max_procs: int = 32            # RLIMIT_NPROC (per throwaway uid when the host is root)
    file_bytes: int = 16 * MIB     # RLIMIT_FSIZE, largest file the program may write
    open_files: int = 64           # RLIMIT_NOFILE
    output_bytes: int = 1 * MIB    # read from stdout and from stderr at most, kill beyond


@dataclass
class SandboxResult:
    returncode: int | None  # None when the host killed the run; negative: killed by that signal
    stdout: str
    stderr: str
    timed_out: bool = False
    output_exceeded: bool = False
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.output_exceeded


def _is_root() -> bool:
    return os.geteuid() == 0


def _pick_uid() -> int | None:
    return _UID_BASE + random.randrange(_UID_SPAN) if _is_root() else None


def _bwrap_argv(workdir: str, python: str) -> list[str]:
    argv = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--ro-bind", "/", "/",
            "--dev", "/dev", "--proc", "/proc"]
    for hidden in _HIDDEN_DIRS:
        if os.path.isdir(hidden):
            argv += ["--tmpfs", hidden]
    # The interpreter may live under a hidden directory (pyenv in /root): bind its prefix back.
    prefix = str(Path(python).resolve().parent.parent)
    if any(prefix == h or prefix.startswith(h + "/") for h in _HIDDEN_DIRS):
        argv += ["--ro-bind", prefix, prefix]
    return argv + ["--bind", workdir, _SANDBOX_DIR, "--chdir", _SANDBOX_DIR, "--setenv", "HOME", _SANDBOX_DIR]


def _unshare_argv(uid: int | None) -> list[str]:
    argv = ["unshare", "--net", "--pid", "--fork", "--kill-child", "--mount-proc", "--ipc", "--uts"]
    if uid is None:
        return argv[:1] + ["--map-root-user"] + argv[1:]
    return argv + ["--setgid", str(uid), "--setuid", str(uid)]


def _command(mode: str, workdir: str, python: str, uid: int | None, config: dict) -> list[str]:
    """The argv of a run in `mode` (inside bwrap the run directory is seen at _SANDBOX_DIR)."""
    inner_dir = _SANDBOX_DIR if mode == "bwrap" else workdir
    run = [python, "-I", "-B", os.path.join(inner_dir, "_launcher.py"), json.dumps({**config, "dir": inner_dir})]
    if mode == "bwrap":
        return _bwrap_argv(workdir, python) + ["--"] + run
    if mode == "unshare":
        return _unshare_argv(uid) + ["--"] + run
    return run


def _remove_tree(path: str) -> None:
    def retry(func, target, _exc):  # a hostile program may have chmod-ed its files to 000
        os.chmod(os.path.dirname(target), 0o700)
        os.chmod(target, 0o700)
        func(target)

    shutil.rmtree(path, onexc=retry) if sys.version_info >= (3, 12) else shutil.rmtree(path, onerror=retry)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_bounded(proc: subprocess.Popen, limits: Limits, deadline: float) -> tuple[bytes, bytes, bool, bool]:
    """Drain stdout/stderr until both close or the process ends, with the wall and output limits."""
    selector = selectors.DefaultSelector()
    buffers = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    for fd in buffers:
        os.set_blocking(fd, False)
        selector.register(fd, selectors.EVENT_READ)
    timed_out = exceeded = False
    while selector.get_map():
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        events = selector.select(timeout=min(left, 0.05))
        for key, _ in events:
            chunk = os.read(key.fd, 65536)
            if not chunk:
                selector.unregister(key.fd)
                continue
            buffers[key.fd] += chunk
            if len(buffers[key.fd]) > limits.output_bytes:
                exceeded = True
        if exceeded:
            break
        if not events and proc.poll() is not None:
            # Exited; a grandchild in the background may still hold the pipes open: stop reading.
            break
    selector.close()
    out, err = (bytes(buffers[f.fileno()][: limits.output_bytes]) for f in (proc.stdout, proc.stderr))
    return out, err, timed_out, exceeded


def _run(mode: str, python: str, code: str, stdin: str, limits: Limits) -> SandboxResult:
    uid = _pick_uid()
    workdir = tempfile.mkdtemp(prefix="r1mega-sandbox-")
    try:
        Path(workdir, "main.py").write_text(code)
        Path(workdir, "stdin.txt").write_text(stdin)
        shutil.copyfile(_LAUNCHER, os.path.join(workdir, "_launcher.py"))
        os.chmod(workdir, 0o755)
        if uid is not None:
            os.chown(workdir, uid, uid)
        config = {k: v for k, v in asdict(limits).items() if k not in ("wall_s", "output_bytes")}
        argv = _command(mode, workdir, python, uid, {**config, "audit": mode == "none"})
        # unshare switches to the uid itself, after creating the namespaces (which needs root).
        ids = {"user": uid, "group": uid, "extra_groups": []} if uid is not None and mode != "unshare" else {}
        started = time.monotonic()
        with open(os.path.join(workdir, "stdin.txt"), "rb") as stdin_file:
            proc = subprocess.Popen(argv, stdin=stdin_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    start_new_session=True, close_fds=True, cwd=workdir,
                                    env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, **ids)
        try:
            out, err, timed_out, exceeded = _read_bounded(proc, limits, started + limits.wall_s)
        finally:
            if proc.poll() is None:
                _kill_group(proc)
            proc.stdout.close()
            proc.stderr.close()
            returncode = proc.wait()
            _kill_group(proc)  # background children left in the group (the PID namespace ends the rest)
            if mode == "none" and uid is not None:
                # Without a PID namespace a child may have left the group: end every process of the uid.
                subprocess.run(["kill", "-9", "-1"], user=uid, group=uid, extra_groups=[],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        killed = timed_out or exceeded
        if mode != "none" and returncode > 128:
            returncode = 128 - returncode  # bwrap and unshare exit with 128 + the signal that ended the program
        return SandboxResult(None if killed else returncode, out.decode("utf-8", "replace"),
                             err.decode("utf-8", "replace"), timed_out, exceeded, time.monotonic() - started)
    finally:
        _remove_tree(workdir)


def _probe(mode: str, python: str) -> bool:
    if mode != "none" and shutil.which(mode) is None:
        return False
    try:
        result = _run(mode, python, "print('ok')", "", Limits(wall_s=20))
    except OSError:
        return False
    return result.ok and result.stdout.strip() == "ok"


@lru_cache(maxsize=None)
def _isolation() -> tuple[str, str]:
    """(mode, interpreter) in force: the strongest mode that runs a trivial program."""
    forced = os.environ.get("R1MEGA_SANDBOX")
    modes = [forced] if forced else ["bwrap", "unshare", "none"]
    # The throwaway uid may not reach this interpreter (pyenv under /root): any Python 3 with its
    # standard library will do for the programs.
    pythons = list(dict.fromkeys([os.path.realpath(sys.executable), "/usr/bin/python3", "/usr/local/bin/python3"]))
    for mode in modes:
        for python in filter(os.path.exists, pythons):
            if _probe(mode, python):
                return mode, python
    raise RuntimeError(f"the sandbox cannot run Python in any of the modes {modes} with {pythons}")


def isolation_report() -> dict[str, object]:
    """Which isolation is in force on this machine (see the module docstring)."""
    mode, python = _isolation()
    return {
        "mode": mode, "python": python,
        "network_namespace": mode in ("bwrap", "unshare"),
        "pid_namespace": mode in ("bwrap", "unshare"),
        "filesystem": "read-only root, private /tmp and home" if mode == "bwrap" else "host filesystem",
        "throwaway_uid": _is_root(),
        "audit_hook": mode == "none",
        "rlimits": ["CPU", "AS", "NPROC", "FSIZE", "NOFILE", "CORE"],
    }


def run_python(code: str, stdin: str = "", limits: Limits = Limits()) -> SandboxResult:
    """Run `code` as a Python program with `stdin`, in the sandbox, within `limits`."""
    mode, python = _isolation()
    return _run(mode, python, code, stdin, limits)
