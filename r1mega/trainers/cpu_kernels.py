"""Pin torch's CPU kernels to one instruction set, so that a CPU run computes the same numbers on any
x86-64 processor that has it.

ATen picks its vectorised kernels (AVX512, AVX2 or plain) from the processor it finds, and MKL and oneDNN
pick code paths of their own: two machines with different processors round differently, and a tiny
model's pretraining turns a last-bit difference into a different model (the embedded default's base
accuracy moved by 7 points between two machines). ATEN_CPU_CAPABILITY, MKL_CBWR (MKL's conditional
numerical reproducibility) and ONEDNN_MAX_CPU_ISA fix all three. Each library reads its variable once,
at its first kernel, so `pin_cpu_kernels` must run before any tensor work of the process; a variable
already set in the environment wins, so a user can choose otherwise without editing the config.
"""

from __future__ import annotations

import logging
import os
import platform

import torch

log = logging.getLogger(__name__)

_VARIABLES = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}


def pin_cpu_kernels(isa: str) -> None:
    """Pin the CPU kernels to `isa` (`train.cpu_isa`: "avx2", or "" to keep what each library picks)."""
    if not isa or platform.machine() not in ("x86_64", "AMD64"):
        return
    if isa not in _VARIABLES:
        raise ValueError(f"train.cpu_isa={isa!r}: expected one of {sorted(_VARIABLES)} or '' (no pinning)")
    for name, value in _VARIABLES[isa].items():
        os.environ.setdefault(name, value)
    wanted = os.environ["ATEN_CPU_CAPABILITY"].upper()
    chosen = torch.backends.cpu.get_cpu_capability()
    if chosen != wanted:
        log.warning("train.cpu_isa=%s: torch already runs %s kernels in this process (tensor work before the "
                    "trainer started); the run's numbers may differ on another processor", isa, chosen)
