"""The wheels the GPU machine lacks: fetched here for Python 3.12 (`fetch`), installed there (`install_argv`).

The list is benchmarks/gpu_wheels.txt; the wheels go to benchmarks/wheels/ (git-ignored, carried by
the device tool). A requirement PyPI has only as an sdist is built into a wheel here, which must come
out pure Python (py3-none-any) to run on the other machine. At most one version of each project, as
pip refuses to install two from one folder, and 40 MiB in all (the device tool carries 64 MiB with the
tree). Installing uses `--target` into a private folder that gpu_check.py puts first on PYTHONPATH,
and no index: that machine reaches none.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
LIST = HERE / "gpu_wheels.txt"
FOLDER = HERE / "wheels"
PYTHON = "3.12"  # the GPU machine's
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]
MAX_BYTES = 40 << 20
# pip's flags that pick wheels for the GPU machine's Python rather than this one's
FOR_GPU_PYTHON = ["--only-binary=:all:", "--python-version", PYTHON, "--implementation", "cp",
                  *(arg for p in PLATFORMS for arg in ("--platform", p))]


def requirements() -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in LIST.read_text().splitlines())
    return [line for line in lines if line]


def wheels() -> list[pathlib.Path]:
    return sorted(FOLDER.glob("*.whl"))


def _project(wheel: pathlib.Path) -> str:
    return re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()


def problems(found: list[pathlib.Path]) -> list[str]:
    """What would stop the install there: two versions of a project, a wheel for another Python, too much."""
    out, seen = [], {}
    py_tag = "cp" + PYTHON.replace(".", "")
    for wheel in found:
        seen.setdefault(_project(wheel), []).append(wheel.name)
        tags = wheel.name[:-len(".whl")].split("-")[-3:]  # python tag, abi tag, platform tag
        if not ({"py3", py_tag} & set(tags[0].split("."))):
            out.append(f"{wheel.name} is not for Python {PYTHON}")
    out += [f"several versions of {name}: {', '.join(names)}" for name, names in seen.items() if len(names) > 1]
    total = sum(w.stat().st_size for w in found)
    if total > MAX_BYTES:
        out.append(f"{total / 2**20:.1f} MiB of wheels, over {MAX_BYTES >> 20} MiB")
    return out


def fetch() -> int:
    """Downloads every listed requirement's wheel (or builds it from its sdist); returns an exit code."""
    FOLDER.mkdir(exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    for req in requirements():
        got = subprocess.run([*pip, "download", "-q", "--no-deps", *FOR_GPU_PYTHON, "-d", str(FOLDER), req])
        if got.returncode != 0:
            print(f"{req}: no wheel for Python {PYTHON}; building one from its sdist", flush=True)
            subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-binary=:all:", "-w", str(FOLDER), req], check=True)
    found = wheels()
    for wheel in found:
        print(f"{wheel.stat().st_size / 2**20:7.2f} MiB  {wheel.name}")
    issues = problems(found)
    for issue in issues:
        print(f"error: {issue}", file=sys.stderr)
    print(f"{len(found)} wheels, {sum(w.stat().st_size for w in found) / 2**20:.1f} MiB in {FOLDER}")
    return 1 if issues else 0


def install_argv(target: pathlib.Path, *, for_gpu_python: bool) -> list[str]:
    """pip's command installing every wheel of the folder into `target`; `for_gpu_python` picks them
    for Python 3.12 whatever runs pip (the dry run checks the set installs, and uses none of it)."""
    return [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
            "--no-cache-dir", "--upgrade", "--target", str(target),
            *(FOR_GPU_PYTHON if for_gpu_python else []), *map(str, wheels())]
