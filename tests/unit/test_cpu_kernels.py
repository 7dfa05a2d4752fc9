"""train.cpu_isa pins the kernels torch, MKL and oneDNN run, in a fresh interpreter as r1mega-train has."""

import os
import platform
import subprocess
import sys

import pytest

from r1mega.trainers.cpu_kernels import pin_cpu_kernels

pytestmark = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 kernels only")
PROBE = ("import os, torch; from r1mega.trainers.cpu_kernels import pin_cpu_kernels; pin_cpu_kernels('avx2'); "
         "torch.ones(8).exp(); print(torch.backends.cpu.get_cpu_capability(), os.environ['MKL_CBWR'])")


def _probe(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")}
    return subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_avx2_pins_aten_and_mkl():
    assert _probe() == "AVX2 AVX2"


def test_the_users_environment_wins():
    assert _probe(ATEN_CPU_CAPABILITY="default", MKL_CBWR="COMPATIBLE") == "DEFAULT COMPATIBLE"


def test_unknown_isa_names_the_key():
    with pytest.raises(ValueError, match="train.cpu_isa='avx9'"):
        pin_cpu_kernels("avx9")
