"""What every op test parametrises over: the devices, and a skip when an op has no compiled kernel there."""

import pytest
import torch

from r1mega.ops import _extension

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
    ),
]


def needs_kernel(op: str, device: str) -> None:
    if not _extension.has_kernel(op, device):
        pytest.skip(f"no compiled r1mega::{op} for {device} ({_extension.BUILD})")
