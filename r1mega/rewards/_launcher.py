"""The sandbox's first code in the child (copied into the run directory; standard library only).

argv[1] is a JSON object: the resource limits, the run directory and whether to install the audit
hook (sandbox mode "none"). Limits are set with soft = hard, so the program cannot raise them again.
The program is `main.py` in the run directory, run as `__main__` with its own file name in argv.
Not imported by the package: sandbox.py copies this file next to the program.
"""

import json
import os
import resource
import runpy
import socket
import sys

config = json.loads(sys.argv[1])
run_dir = os.path.realpath(config["dir"])
for limit, value in ((resource.RLIMIT_CPU, config["cpu_s"]), (resource.RLIMIT_AS, config["memory_bytes"]),
                     (resource.RLIMIT_NPROC, config["max_procs"]), (resource.RLIMIT_FSIZE, config["file_bytes"]),
                     (resource.RLIMIT_NOFILE, config["open_files"]), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))

parent = os.getppid()
readable_roots = tuple({run_dir, os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix), "/usr", "/lib",
                        "/etc", "/dev/null", "/dev/urandom", "/proc/self"})


def _inside(path, roots):
    try:
        real = os.path.realpath(os.fsdecode(path)) if not isinstance(path, int) else run_dir
    except (TypeError, ValueError):
        return False
    return any(real == root or real.startswith(root.rstrip("/") + "/") for root in roots)


def _guard(event, args):
    # Always: the program may not signal the process that started it.
    if event in ("os.kill", "os.killpg") and args[0] in (parent, 1):
        raise PermissionError("the sandbox does not allow signalling the parent")
    if not config["audit"]:
        return
    if event in ("socket.connect", "socket.bind", "socket.sendto", "socket.getaddrinfo", "socket.__new__"):
        if event != "socket.__new__" or args[1] != socket.AF_UNIX:
            raise PermissionError("the sandbox does not allow network access")
    elif event == "open":
        path, mode, flags = args
        writes = (mode and any(c in mode for c in "wax+")) or (flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if path is not None and not _inside(path, (run_dir,) if writes else readable_roots):
            raise PermissionError(f"the sandbox does not allow opening {path!r}")
    elif event in ("os.remove", "os.rmdir", "os.rename", "os.replace", "os.chmod", "os.chown", "os.truncate",
                   "os.mkdir", "os.link", "os.symlink", "shutil.rmtree", "os.utime"):
        if not _inside(args[0], (run_dir,)) or (event in ("os.rename", "os.replace", "os.link", "os.symlink")
                                                and not _inside(args[1], (run_dir,))):
            raise PermissionError(f"the sandbox does not allow {event} outside its directory")


sys.addaudithook(_guard)
sys.argv = ["main.py"]
sys.path.insert(0, run_dir)
os.chdir(run_dir)
runpy.run_path(os.path.join(run_dir, "main.py"), run_name="__main__")
