"""Sharded safetensors directories: the reader and writer both formats use, and the native format.

A native checkpoint is a directory with `config.json` (the `ModelConfig` fields plus
`"r1mega_native": 1`) and safetensors shards under the native parameter names (transformer.py),
experts stacked [E, ...]. Shards follow the Hugging Face layout: one `model.safetensors`, or
`model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`.

Everything is written into a temporary sibling directory and renamed into place at the end, so a
crash never leaves a half-written checkpoint under the final name. Tensors stream through: a writer
holds at most one shard, a reader one tensor (plus what a caller buffers).

Deliberately left out: optimizer state (r1mega/trainers/checkpoint.py), sharded (distributed) saving.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from r1mega.models.config import ModelConfig
from r1mega.models.transformer import Transformer

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
NATIVE_KEY = "r1mega_native"
DEFAULT_SHARD_BYTES = 5 * 2**30


class CheckpointError(ValueError):
    """A checkpoint that does not match the model: the message names the file and tensor."""


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yields a fresh temporary directory that replaces `path` only if the block succeeds."""
    path = Path(path)
    if path.exists() and not overwrite and any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not empty (pass overwrite=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)


class ShardWriter:
    """Writes named tensors into shards of at most `max_shard_bytes` (a bigger tensor gets its own)."""

    def __init__(self, directory: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.directory, self.max_bytes = Path(directory), max_shard_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffer_bytes, self.files, self.weight_map, self.total = 0, [], {}, 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.weight_map or name in self.buffer:
            raise CheckpointError(f"tensor {name} written twice")
        tensor = tensor.detach().cpu()
        # safetensors refuses tensors that share storage (e.g. one expert's slice of a stacked parameter)
        if not tensor.is_contiguous() or tensor.untyped_storage().nbytes() != tensor.nbytes:
            tensor = tensor.clone()
        if self.buffer and self.buffer_bytes + tensor.nbytes > self.max_bytes:
            self._flush()
        self.buffer[name] = tensor
        self.buffer_bytes += tensor.nbytes
        self.total += tensor.nbytes

    def _flush(self) -> None:
        file = f"shard-{len(self.files):05d}.tmp"
        save_file(self.buffer, str(self.directory / file), metadata={"format": "pt"})
        self.files.append(file)
        for name in self.buffer:
            self.weight_map[name] = file
        self.buffer, self.buffer_bytes = {}, 0

    def close(self) -> None:
        if self.buffer or not self.files:
            self._flush()
        n = len(self.files)
        if n == 1:
            os.rename(self.directory / self.files[0], self.directory / SINGLE)
            return
        final = {f: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, f in enumerate(self.files)}
        for tmp, name in final.items():
            os.rename(self.directory / tmp, self.directory / name)
        index = {"metadata": {"total_size": self.total},
                 "weight_map": {k: final[v] for k, v in sorted(self.weight_map.items())}}
        (self.directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def write_tensors(directory: Path, named_tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int) -> None:
    writer = ShardWriter(directory, max_shard_bytes)
    for name, tensor in named_tensors:
        writer.add(name, tensor)
    writer.close()


def iter_safetensors(directory: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of a sharded or single-file safetensors directory, shard by shard."""
    directory = Path(directory)
    if (directory / INDEX).exists():
        weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
        files = list(dict.fromkeys(weight_map.values()))
    elif (directory / SINGLE).exists():
        files = [SINGLE]
    else:
        raise CheckpointError(f"{directory}: neither {SINGLE} nor {INDEX} found")
    for file in files:
        if not (directory / file).exists():
            raise CheckpointError(f"{directory}: shard {file} listed in {INDEX} is missing")
        with safe_open(str(directory / file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def read_json(path: Path) -> dict:
    if not path.exists():
        raise CheckpointError(f"{path} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None


def empty_model(config: ModelConfig, *, dtype: torch.dtype = torch.float32, device="cpu") -> Transformer:
    """A Transformer with uninitialised storage (built on meta, no init cost), to be filled by load_state."""
    with torch.device("meta"):
        model = Transformer(config)
    return model.to_empty(device=device).to(dtype)


def checked(named_tensors: Iterable[tuple[str, torch.Tensor]], expected: dict[str, tuple[int, ...]],
            source: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Passes (name, tensor) pairs through, raising on an unexpected, duplicate or mis-shaped tensor, and,
    once the stream ends, on any expected name that never came."""
    seen: set[str] = set()
    for name, tensor in named_tensors:
        if name not in expected:
            raise CheckpointError(f"{source}: unexpected tensor {name}")
        if name in seen:
            raise CheckpointError(f"{source}: tensor {name} appears twice")
        if tuple(tensor.shape) != tuple(expected[name]):
            raise CheckpointError(f"{source}: tensor {name} has shape {tuple(tensor.shape)}, "
                                  f"expected {tuple(expected[name])}")
        seen.add(name)
        yield name, tensor
    missing = sorted(set(expected) - seen)
    if missing:
        raise CheckpointError(f"{source}: missing {len(missing)} tensor(s): {', '.join(missing[:8])}"
                              + (" ..." if len(missing) > 8 else ""))


def native_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every native tensor name of this config and its shape (from a model on the meta device)."""
    with torch.device("meta"):
        model = Transformer(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def load_state(model: Transformer, named_tensors: Iterable[tuple[str, torch.Tensor]], source: str) -> Transformer:
    """Copies every (native name, tensor) into the model; each parameter and buffer must come exactly once."""
    targets = model.state_dict()
    expected = {name: tuple(t.shape) for name, t in targets.items()}
    with torch.no_grad():
        for name, tensor in checked(named_tensors, expected, source):
            targets[name].copy_(tensor)
    return model


def is_native(directory: str | os.PathLike) -> bool:
    path = Path(directory) / "config.json"
    return path.exists() and bool(read_json(path).get(NATIVE_KEY))


def save_native(model: Transformer, directory: str | os.PathLike, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                overwrite: bool = False) -> Path:
    with atomic_dir(directory, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps({NATIVE_KEY: 1, **model.config.to_dict()}, indent=2) + "\n")
        write_tensors(tmp, model.state_dict().items(), max_shard_bytes)
    return Path(directory)


def read_native_config(directory: str | os.PathLike) -> ModelConfig:
    path = Path(directory) / "config.json"
    d = read_json(path)
    if not d.pop(NATIVE_KEY, None):
        raise CheckpointError(f"{path}: not an r1mega native checkpoint (no {NATIVE_KEY!r} key)")
    return ModelConfig.from_dict(d)


def read_native(directory: str | os.PathLike) -> tuple[ModelConfig, Iterator[tuple[str, torch.Tensor]]]:
    """The config and the checked (native name, tensor) stream of a native checkpoint."""
    config = read_native_config(directory)
    return config, checked(iter_safetensors(directory), native_shapes(config), str(directory))


def load_native(directory: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device="cpu") -> Transformer:
    config, stream = read_native(directory)
    return load_state(empty_model(config, dtype=dtype, device=device), stream, str(directory))
