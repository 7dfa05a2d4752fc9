"""The sandbox's supervisor: it isolates the run, starts the program and ends every process of the run
(standard library only; sandbox.py copies this file into the run's host directory and runs it there,
it is not imported by the package).

`python _launcher.py CONFIG` is the supervisor; CONFIG (JSON) holds the mode, the limits, the host
directory (`dir`, holding main.py), the throwaway uid (root hosts) and the results pipe's fd.
- mode "namespace": the supervisor enters new mount, PID, network, IPC and UTS namespaces (and a new
  user namespace, mapping its own uid to 1000, when not root), then forks the namespace's init (PID
  1), which builds the new root (`build_root`), and forks the program's process: limits, then the
  throwaway uid (root hosts) or no capabilities (user namespace), no_new_privs, the seccomp filter,
  then exec of `python main.py` in /sandbox. When the program's process ends, init reports its status
  and exits, and the kernel kills whatever else runs in the namespace; init dies with the supervisor
  (PR_SET_PDEATHSIG), so killing the supervisor ends the run too.
- mode "none": the supervisor becomes a child subreaper and forks the program's process: limits, the
  throwaway uid (root hosts), then exec of `python _guest.py CONFIG`, which installs an audit hook and
  runs main.py. When the program's process ends, or on SIGTERM (the host stopping the run), the
  supervisor kills every process left below it (orphans are re-parented to it, so none is missed).
The supervisor exits as the program's process did (same code, or killed by the same signal). Neither
supervisor nor init can be traced or read by the program (PR_SET_DUMPABLE 0).
"""

import ctypes
import json
import os
import resource
import select
import signal
import sys

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
RESULTS_FD = 3  # the program's end of the results pipe (code.py's function-call driver writes there)
GUEST_UID = 1000  # the program's uid inside a user namespace
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, PR_SET_CHILD_SUBREAPER = 1, 4, 38, 22, 36
CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC = 0x20000, 0x2000000, 0x4000000, 0x8000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 8, 32, 4096, 16384
MS_PRIVATE, MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1 << 18, 1024, 2048, 1 << 21
MNT_DETACH = 2

# What the program sees of the host, read-only (plus the interpreter's prefix); anything else
# (/home, /root, /tmp, /var, /opt, /srv, /mnt, the repository, the datasets) does not exist in it.
HOST_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache")
DEVICES = ("null", "zero", "full", "random", "urandom")

# Syscalls the program may not make (EPERM): new namespaces (a nested user namespace would give it
# capabilities to mount an unbounded tmpfs), mounts, tracing, SysV shared memory and message queues and
# memfds (memory outside RLIMIT_AS), kernel keyrings, bpf, perf, userfaultfd and io_uring.
DENIED = ("unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "open_tree", "move_mount", "fsopen",
          "fsmount", "fspick", "mount_setattr", "ptrace", "process_vm_readv", "process_vm_writev", "shmget",
          "msgget", "memfd_create", "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd",
          "io_uring_setup")
# (AUDIT_ARCH, syscall numbers); clone3's flags sit in memory a filter cannot read: it gets ENOSYS, so
# that the C library falls back to clone, whose flags are checked.
ARCHES = {
    "x86_64": (0xC000003E, dict(unshare=272, setns=308, mount=165, umount2=166, pivot_root=155, chroot=161,
                                open_tree=428, move_mount=429, fsopen=430, fsmount=432, fspick=433,
                                mount_setattr=442, ptrace=101, process_vm_readv=310, process_vm_writev=311,
                                shmget=29, msgget=68, memfd_create=319, keyctl=250, add_key=248,
                                request_key=249, bpf=321, perf_event_open=298, userfaultfd=323,
                                io_uring_setup=425, clone=56, clone3=435)),
    "aarch64": (0xC00000B7, dict(unshare=97, setns=268, mount=40, umount2=39, pivot_root=41, chroot=51,
                                 open_tree=428, move_mount=429, fsopen=430, fsmount=432, fspick=433,
                                 mount_setattr=442, ptrace=117, process_vm_readv=270, process_vm_writev=271,
                                 shmget=194, msgget=186, memfd_create=279, keyctl=219, add_key=217,
                                 request_key=218, bpf=280, perf_event_open=241, userfaultfd=282,
                                 io_uring_setup=425, clone=220, clone3=435)),
}
NEW_NAMESPACES = (CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID
                  | CLONE_NEWNET)


def check(result, what):
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def prctl(option, value):
    check(libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0), f"prctl({option})")


def mount(source, target, fstype, flags, data=None):
    encode = lambda s: s.encode() if s is not None else None  # noqa: E731
    check(libc.mount(encode(source), encode(target), encode(fstype), flags, encode(data)), f"mount {target}")


# ---------------------------------------------------------------- the program's process, both modes

def set_limits(config):
    for limit, value in ((resource.RLIMIT_CPU, config["cpu_s"]), (resource.RLIMIT_AS, config["memory_bytes"]),
                         (resource.RLIMIT_NPROC, config["max_procs"]), (resource.RLIMIT_FSIZE, config["file_bytes"]),
                         (resource.RLIMIT_NOFILE, config["open_files"]), (resource.RLIMIT_CORE, 0),
                         (resource.RLIMIT_MSGQUEUE, 0), (resource.RLIMIT_MEMLOCK, 0)):
        resource.setrlimit(limit, (value, value))  # soft = hard: the program cannot raise them again


def become_throwaway_uid(uid):
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)  # from root to a non-zero uid: the kernel clears every capability


def drop_capabilities():
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    check(libc.capset(header, (ctypes.c_uint32 * 6)()), "capset")  # effective, permitted, inheritable = 0


def seccomp_program(arch, numbers):
    """The BPF filter: DENIED -> EPERM, clone with a CLONE_NEW* flag -> EPERM, clone3 -> ENOSYS, other
    architectures (x32 included) -> kill; everything else allowed. Jumps are resolved from labels."""
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, eperm, enosys, kill = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38, 0x80000000
    code = [(ld, 0, 0, 4), (jeq, 0, "kill", arch), (ld, 0, 0, 0), (jge, "eperm", 0, 0x40000000)]
    code += [(jeq, "eperm", 0, numbers[name]) for name in DENIED]
    code += [(jeq, "enosys", 0, numbers["clone3"]), (jeq, 0, "allow", numbers["clone"]),
             (ld, 0, 0, 16), (jset, "eperm", 0, NEW_NAMESPACES)]  # clone's flags: low half of args[0]
    labels = {"allow": len(code), "eperm": len(code) + 1, "enosys": len(code) + 2, "kill": len(code) + 3}
    code += [(ret, 0, 0, allow), (ret, 0, 0, eperm), (ret, 0, 0, enosys), (ret, 0, 0, kill)]
    offset = lambda jump, at: labels[jump] - at - 1 if isinstance(jump, str) else jump  # noqa: E731
    return [(op, offset(jt, i), offset(jf, i), k) for i, (op, jt, jf, k) in enumerate(code)]


def install_seccomp():
    arch, numbers = ARCHES[os.uname().machine]
    program = seccomp_program(arch, numbers)

    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(Filter))]

    filters = (Filter * len(program))(*[Filter(*ins) for ins in program])
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    check(libc.prctl(PR_SET_SECCOMP, 2, ctypes.byref(Program(len(program), filters)), 0, 0), "seccomp")


def start_program(config, argv, env):
    """In the forked child: results pipe on fd 3, limits, privileges dropped, then exec."""
    os.dup2(config["results_fd"], RESULTS_FD)
    set_limits(config)
    if config["uid"] is not None:
        become_throwaway_uid(config["uid"])
    elif config["mode"] == "namespace":
        drop_capabilities()
    if config["mode"] == "namespace":
        install_seccomp()
    os.execve(sys.executable, argv, env)


def run_child(fn, *args):
    """In a forked child: `fn` never returns into the parent's code; an error ends the child (its
    traceback on stderr)."""
    try:
        fn(*args)
    finally:
        os._exit(1)


def exit_like(status):
    """Exit as the program's process did: the same code, or killed by the same signal."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)


# ---------------------------------------------------------------- mode "namespace"

def enter_namespaces():
    uid, gid = os.getuid(), os.getgid()
    user = 0 if uid == 0 else CLONE_NEWUSER  # root needs none and keeps the throwaway uid's RLIMIT_NPROC
    check(libc.unshare(user | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS), "unshare")
    if user:
        maps = (("setgroups", "deny"), ("uid_map", f"{GUEST_UID} {uid} 1"), ("gid_map", f"{GUEST_UID} {gid} 1"))
        for name, text in maps:
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)


def bind(source, target, flags):
    """Bind `source` at `target` (created as an empty file or directory), then remount it with `flags`
    added; the host mount's noexec and atime flags are kept (a user namespace may not clear them)."""
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()
    mount(source, target, None, MS_BIND)
    kept = os.statvfs(source).f_flag & (MS_NOEXEC | MS_NOATIME | MS_NODIRATIME | MS_RELATIME)  # ST_* == MS_*
    mount(None, target, None, MS_REMOUNT | MS_BIND | flags | kept)


def expose(path, root):
    """Show the host's `path` read-only at the same place under `root` (a symbolic link as itself)."""
    if os.path.islink(path):  # /bin -> usr/bin on a merged-/usr system
        os.makedirs(os.path.dirname(root + path), exist_ok=True)
        os.symlink(os.readlink(path), root + path)
    elif os.path.exists(path):
        bind(path, root + path, MS_RDONLY | MS_NOSUID | MS_NODEV)


def build_root(config):
    """The program's filesystem, then pivot_root into it. `/` is a small read-only tmpfs holding the
    HOST_PATHS and the interpreter's prefix read-only, a few device nodes and a fresh /proc; one tmpfs
    of disk_bytes (its only writable storage) holds /sandbox (the run directory, cwd), /tmp and /dev/shm."""
    host_dir = config["dir"]
    program = open(os.path.join(host_dir, "main.py"), "rb").read()
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates back to the host
    root, scratch = os.path.join(host_dir, "root"), os.path.join(host_dir, "scratch")
    for path, size in ((root, 1 << 20), (scratch, config["disk_bytes"])):
        os.mkdir(path)
        mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size},nr_inodes={config['inodes']},mode=0755")
    for name, mode in (("sandbox", 0o755), ("tmp", 0o1777), ("shm", 0o1777)):
        os.mkdir(os.path.join(scratch, name))
        os.chmod(os.path.join(scratch, name), mode)  # mkdir's mode passes through the umask
    with open(os.path.join(scratch, "sandbox", "main.py"), "wb") as f:
        f.write(program)
    if config["uid"] is not None:
        for path in (os.path.join(scratch, "sandbox"), os.path.join(scratch, "sandbox", "main.py")):
            os.chown(path, config["uid"], config["uid"])
    prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix)}
    for path in HOST_PATHS + tuple(sorted(p for p in prefixes if not p.startswith("/usr/"))):
        expose(path, root)
    for name in DEVICES:
        bind(f"/dev/{name}", f"{root}/dev/{name}", MS_NOSUID)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{root}/dev/{name}")
    for name, target in (("sandbox", "sandbox"), ("tmp", "tmp"), ("shm", "dev/shm")):
        bind(os.path.join(scratch, name), os.path.join(root, target), MS_NOSUID | MS_NODEV)
    os.mkdir(f"{root}/proc")
    mount("proc", f"{root}/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)  # this PID namespace's processes only
    mount(None, root, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chdir(root)
    pivot_root = ARCHES[os.uname().machine][1]["pivot_root"]
    check(libc.syscall(pivot_root, b".", b"."), "pivot_root")  # the old root now sits on top of the new one
    check(libc.umount2(b".", MNT_DETACH), "umount old root")  # and is gone: no host path is reachable
    os.chdir("/sandbox")


def namespace_init(config, lifeline, status_pipe):
    """PID 1 of the run's namespace."""
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if select.select([lifeline], [], [], 0)[0]:  # EOF: the supervisor died before PR_SET_PDEATHSIG took hold
        os._exit(1)
    build_root(config)
    prctl(PR_SET_DUMPABLE, 0)
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/sandbox"}
    pid = os.fork()
    if pid == 0:
        run_child(start_program, config, [sys.executable, "-E", "-s", "-B", "main.py"], env)
    while True:  # as PID 1, every orphan of the run is ours to reap
        child, status = os.wait()
        if child == pid:
            os.write(status_pipe, str(status).encode())
            os._exit(0)  # the kernel now kills every other process of the namespace


def supervise_namespace(config):
    lifeline_r, lifeline_w = os.pipe()
    status_r, status_w = os.pipe()
    enter_namespaces()
    prctl(PR_SET_DUMPABLE, 0)
    pid = os.fork()
    if pid == 0:
        os.close(lifeline_w)
        os.close(status_r)
        run_child(namespace_init, config, lifeline_r, status_w)
    os.close(lifeline_r)
    os.close(status_w)  # lifeline_w stays open as long as the supervisor lives
    os.waitpid(pid, 0)
    status = os.read(status_r, 32)
    os._exit(1) if not status else exit_like(int(status))


# ---------------------------------------------------------------- mode "none"

def descendants():
    """Live processes below this one (/proc; with this process a subreaper, orphans stay below it)."""
    children = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{entry}/stat").read()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if state != "Z":
            children.setdefault(int(ppid), []).append(int(entry))
    found, todo = set(), [os.getpid()]
    while todo:
        below = children.get(todo.pop(), [])
        found.update(below)
        todo += below
    return found


def kill_descendants():
    while left := descendants():  # until none is left: one killed now may have forked a moment before
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            pass


def stop(_signum, _frame):
    """SIGTERM: the host is stopping the run (its wall-clock limit)."""
    kill_descendants()
    os._exit(1)


def supervise_none(config):
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    prctl(PR_SET_DUMPABLE, 0)
    signal.signal(signal.SIGTERM, stop)
    pid = os.fork()
    if pid == 0:
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": config["dir"]}
        run_child(start_program, config, [sys.executable, "-I", "-B", os.path.join(config["dir"], "_guest.py"),
                                          json.dumps(config)], env)
    status = os.waitpid(pid, 0)[1]
    kill_descendants()
    exit_like(status)


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    settings = json.loads(sys.argv[1])
    supervise_namespace(settings) if settings["mode"] == "namespace" else supervise_none(settings)
