"""Models: the config, the `Transformer`, KV cache, expert balancing, and checkpoint formats.

`load_pretrained(path)` takes either checkpoint format: an r1mega native directory or a Hugging Face
one (config.json + safetensors).
"""

from __future__ import annotations

import os

import torch

from r1mega.models.config import ConfigError, ModelConfig, preset
from r1mega.models.transformer import Transformer

__all__ = ["ConfigError", "ModelConfig", "Transformer", "load_pretrained", "preset"]


def load_pretrained(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device="cpu") -> Transformer:
    from r1mega.models import checkpoint, hf

    if checkpoint.is_native(path):
        return checkpoint.load_native(path, dtype=dtype, device=device)
    return hf.load(path, dtype=dtype, device=device)[0]
