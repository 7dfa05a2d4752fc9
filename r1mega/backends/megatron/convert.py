"""Megatron checkpoints on disk: `config.json` (the r1mega `ModelConfig` and the module layout) and
safetensors under megatron-core's full, unsharded `GPTModel` state-dict names.

Conversion streams tensor by tensor through the native names (mapping.py), like the Hugging Face
conversion, and writes under a temporary name renamed at the end. Left out: megatron's own
distributed-checkpoint format (torch_dist); load these weights with `model.load_native_weights`.
"""

from __future__ import annotations

import json
from pathlib import Path

from r1mega.backends.megatron.mapping import LOCAL, TE, megatron_to_native, native_to_megatron
from r1mega.models.checkpoint import (
    DEFAULT_SHARD_BYTES, NATIVE_KEY, CheckpointError, atomic_dir, is_native, iter_safetensors, read_json, read_native,
    write_tensors,
)
from r1mega.models.config import ModelConfig
from r1mega.models.hf import read_as_native

LAYOUTS = {"local": LOCAL, "te": TE}
LAYOUT_KEY = "r1mega_megatron_layout"


def convert_to_megatron(src, dst, *, layout: str = "local", max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                        overwrite: bool = False) -> Path:
    """A native or Hugging Face directory -> a megatron directory in the `layout` ("local" or "te")."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown megatron layout {layout!r}: expected one of {sorted(LAYOUTS)}")
    config, native = read_native(src) if is_native(src) else read_as_native(src)
    with atomic_dir(dst, overwrite=overwrite) as tmp:
        write_tensors(tmp, native_to_megatron(config, native, LAYOUTS[layout]), max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps({LAYOUT_KEY: layout, **config.to_dict()}, indent=2) + "\n")
    return Path(dst)


def convert_megatron_to_native(src, dst, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                               overwrite: bool = False) -> Path:
    """A megatron directory written by `convert_to_megatron` (or by a trainer) -> a native directory."""
    path = Path(src) / "config.json"
    meta = read_json(path)
    layout = meta.pop(LAYOUT_KEY, None)
    if layout not in LAYOUTS:
        raise CheckpointError(f"{path}: not an r1mega megatron checkpoint ({LAYOUT_KEY!r} missing or unknown)")
    config = ModelConfig.from_dict(meta)
    with atomic_dir(dst, overwrite=overwrite) as tmp:
        write_tensors(tmp, megatron_to_native(config, iter_safetensors(src), LAYOUTS[layout]), max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps({NATIVE_KEY: 1, **config.to_dict()}, indent=2) + "\n")
    return Path(dst)

