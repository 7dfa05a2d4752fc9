"""Installs SGLang for the CPU tests (tests/unit/test_rollout_sglang_real.py) into the running Python.

    python tools/install_sglang_cpu.py [--dry-run]

SGLang's wheel declares a GPU stack (CUDA wheels, flashinfer, torch==2.14.1, ...) that would replace
the CPU torch, so it goes in with `--no-deps`, followed by only what the modules the tests import
need at import time (io_struct, the serialiser, the weight loaders, the model classes), all pinned
next to the installed torch so that pip cannot replace it. `triton` is imported unconditionally by
sglang.srt.utils; it also goes in with `--no-deps` (it declares no dependency anyway). Not installed,
because nothing the tests import needs them or because PyPI has only CUDA builds: sglang-kernel,
flashinfer, torchvision (PyPI's wheel links libtorch_cuda.so: the tests stub it, see
tests/sglang_cpu.py), xgrammar, vllm.

Deliberately left out: a GPU install (use `pip install r1mega[sglang]` there).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from importlib import metadata

SGLANG = "sglang==0.5.23"
NO_DEPS = [SGLANG, "triton==3.9.0"]
# What the imported modules need (found by importing them in a fresh environment); plain Python or
# CPU wheels. Versions are SGLang's pins where it has one.
IMPORT_DEPS = ["aiohttp", "apache-tvm-ffi==0.1.11", "compressed-tensors", "dill", "einops", "fastapi", "gguf",
               "IPython", "msgspec", "numpy", "openai", "orjson", "partial_json_parser", "pillow", "psutil",
               "pybase64", "pyzmq", "requests", "sentencepiece==0.2.1", "setproctitle", "transformers", "uvicorn",
               "uvloop"]


def pip(args: list[str], dry_run: bool) -> None:
    command = [sys.executable, "-m", "pip", "install", "-q", *(["--dry-run"] if dry_run else []), *args]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="show what pip would install, install nothing")
    args = parser.parse_args(argv)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as pins:
        pins.write(f"torch=={metadata.version('torch')}\n")  # the CPU torch stays
    pip(["--no-deps", *NO_DEPS], args.dry_run)
    pip(["-c", pins.name, *IMPORT_DEPS], args.dry_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
