"""Loads the compiled kernels and says, per op and device, whether one is registered.

`setup.py` builds `r1mega._C` (CPU, plus CUDA where torch has CUDA). When the package was installed
without it (a source checkout on PYTHONPATH, say), the C++ sources are compiled on first import with
ninja into torch's extension cache. When neither works every op runs its plain-PyTorch reference,
with one warning, and `r1mega-info` shows it. `R1MEGA_KERNELS=reference` forces the references.
"""

from __future__ import annotations

import functools
import os
import pathlib
import warnings

import torch

_CSRC = pathlib.Path(__file__).resolve().parents[2] / "csrc"
_DISPATCH_KEY = {"cpu": "CPU", "cuda": "CUDA"}


def _load() -> str:
    if os.environ.get("R1MEGA_KERNELS") == "reference":
        return "reference (R1MEGA_KERNELS=reference)"
    try:
        from r1mega import _C  # noqa: F401  (loading the library registers the ops)

        return "compiled (r1mega._C)"
    except ImportError:
        pass
    if not _CSRC.is_dir():
        warnings.warn("r1mega._C is not built and csrc/ is absent: using the plain-PyTorch references")
        return "reference (no kernels built)"
    try:
        from torch.utils import cpp_extension

        sources = sorted(str(p) for p in _CSRC.glob("*.cpp"))
        cpp_extension.load(
            "r1mega_kernels_jit", sources, extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"],
            is_python_module=False, verbose=False,
        )
        return "compiled on first import (ninja)"
    except Exception as err:  # a missing compiler must not make the package unusable
        warnings.warn(f"could not build r1mega's kernels ({err}); using the plain-PyTorch references")
        return "reference (build failed)"


BUILD = _load()


def has_kernel(op: str, device: torch.device | str) -> bool:
    """Whether `r1mega::<op>` has a compiled kernel for this device's dispatch key."""
    return _has_kernel(op, device.type if isinstance(device, torch.device) else torch.device(device).type)


@functools.cache  # every op asks on every call; the kernels are all registered once, at import (above)
def _has_kernel(op: str, device_type: str) -> bool:
    key = _DISPATCH_KEY.get(device_type)
    if key is None or not hasattr(torch.ops.r1mega, op):
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"r1mega::{op}", key)
