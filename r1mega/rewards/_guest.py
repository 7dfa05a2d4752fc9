"""The program's first code in sandbox mode "none" (standard library only; copied into the run
directory, not imported by the package): `python -I -B _guest.py CONFIG` installs an audit hook, then
runs main.py as `__main__` with its own file name in argv. The limits, the throwaway uid and the
cleanup are the supervisor's (_launcher.py); this process never imports ctypes, and the hook refuses
to import it.
"""

import json
import os
import runpy
import socket
import sys

def make_guard(config):
    """An audit hook that refuses, to Python code, what the namespaces stop in the other mode: sockets,
    opening files outside the run directory and the interpreter (writing: outside the run directory),
    changing files outside it, more than disk_bytes // file_bytes new files, starting programs,
    signalling other processes, ctypes, and the introspection that would reach the hook's own state
    (gc). Not a security boundary: code written to get around it (through frames, function internals or
    an interpreter bug) can."""
    run_dir = os.path.realpath(config["dir"])
    readable = (run_dir, os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix), "/usr", "/lib", "/lib64",
                "/dev/null", "/dev/urandom")
    created, max_created = [0], config["disk_bytes"] // config["file_bytes"]
    start = ("os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen", "pty.spawn", "os.startfile")
    inspect = ("gc.get_objects", "gc.get_referrers", "gc.get_referents")  # the way to the hook's counter

    def inside(path, roots):
        try:
            real = os.path.realpath(os.fsdecode(path)) if not isinstance(path, int) else run_dir
        except (TypeError, ValueError):
            return False
        return any(real == root or real.startswith(root.rstrip("/") + "/") for root in roots)

    def refuse(what):
        raise PermissionError(f"the sandbox does not allow {what}")

    def guard(event, args):
        if event.startswith("socket.") and not (event == "socket.__new__" and args[1] == socket.AF_UNIX):
            refuse("network access")
        elif event.startswith("ctypes.") or event in inspect or (event == "import" and "ctypes" in args[0]):
            refuse(event)
        elif event.startswith(start):
            refuse("starting programs")
        elif event in ("os.kill", "os.killpg", "signal.pthread_kill") and args[0] != os.getpid():
            refuse("signalling other processes")
        elif event == "open" and args[0] is not None:
            path, mode, flags = args
            writes = (mode and any(c in mode for c in "wax+")) or (flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if not inside(path, (run_dir,) if writes else readable):
                refuse(f"opening {path!r}")
            if writes and not isinstance(path, int) and not os.path.exists(path):
                created[0] += 1
                if created[0] > max_created:
                    refuse(f"more than {max_created} new files")
        elif event in ("os.listdir", "os.scandir") and not inside(args[0] or ".", readable):
            refuse(f"listing {args[0]!r}")
        elif event in ("os.remove", "os.rmdir", "os.rename", "os.replace", "os.chmod", "os.chown", "os.truncate",
                       "os.mkdir", "os.link", "os.symlink", "shutil.rmtree", "os.utime"):
            if not inside(args[0], (run_dir,)) or (event in ("os.rename", "os.replace", "os.link", "os.symlink")
                                                   and not inside(args[1], (run_dir,))):
                refuse(f"{event} outside its directory")

    return guard


def run_guest(config):
    sys.addaudithook(make_guard(config))
    sys.argv = ["main.py"]
    sys.path.insert(0, config["dir"])
    os.chdir(config["dir"])
    runpy.run_path("main.py", run_name="__main__")


if __name__ == "__main__":
    run_guest(json.loads(sys.argv[1]))
