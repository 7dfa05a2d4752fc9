"""In-place weight updates: a stream of (name, tensor) pairs copied into a model's existing storage.

The trainer (or a distributed gather) yields tensors one by one, with r1mega's native names or
Hugging Face names (HF names start with "model.", except `lm_head.weight`, which is the same in
both; the mapping is r1mega.models.hf's, so per-expert HF tensors are stacked back into the native
[E, ...] ones). `update_in_place` groups the stream into buckets of about `bucket_bytes`, checks every
tensor of a bucket (known name, same shape, floating or same dtype) before copying any of it, then
`copy_`s each one into the parameter or buffer it names: storage is never reallocated, so data
pointers (and CUDA graphs captured on them) stay valid. Extra memory is one bucket of the producer's
tensors plus, for HF streams, one layer's experts while they are stacked.

A partial stream (a subset of the tensors) is allowed. An error in bucket k leaves buckets before k
applied; the caller should not bump its version then.

Deliberately left out: gathering shards (r1mega/parallel/weight_gather.py) and transports between
processes (CUDA IPC, NCCL broadcast), which wrap the same stream.
"""

from __future__ import annotations

import itertools
from typing import Iterable, Iterator

import torch

from r1mega.models.hf import hf_to_native

DEFAULT_BUCKET_BYTES = 256 << 20


class WeightSyncError(ValueError):
    """A tensor that cannot be copied into the model; the message names it."""


def is_hf_name(name: str) -> bool:
    return name.startswith("model.")


def peek_naming(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> tuple[bool, Iterator[tuple[str, torch.Tensor]]]:
    """(whether the stream uses Hugging Face names, the whole stream), decided by its first name that is not
    `lm_head.weight` (a name both layouts share)."""
    stream = iter(named_tensors)
    head = []
    for name, t in stream:
        head.append((name, t))
        if name != "lm_head.weight":
            break
    return any(is_hf_name(n) for n, _ in head), itertools.chain(head, stream)


def to_native(config, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Native (name, tensor) pairs from a stream of native or HF ones (a stream mixing both raises on its
    first foreign name)."""
    hf_names, stream = peek_naming(named_tensors)
    if not hf_names:
        return stream
    # tied HF models may still list the output matrix (it is the embedding)
    if config.tie_word_embeddings:
        stream = ((n, t) for n, t in stream if n != "lm_head.weight")
    return hf_to_native(config, stream)


def buckets(named_tensors: Iterable[tuple[str, torch.Tensor]],
            bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive groups of pairs, each up to `bucket_bytes` (a larger tensor makes a bucket of its own)."""
    return unit_buckets(([pair] for pair in named_tensors), bucket_bytes)


def unit_buckets(units: Iterable[list[tuple[str, torch.Tensor]]],
                 bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """`buckets` over units, lists of pairs that must travel in one bucket (a unit is never split)."""
    bucket, size = [], 0
    for unit in units:
        nbytes = sum(t.numel() * t.element_size() for _, t in unit)
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket += unit
        size += nbytes
    if bucket:
        yield bucket


def check_bucket(targets: dict[str, torch.Tensor], bucket: list[tuple[str, torch.Tensor]]) -> None:
    for name, t in bucket:
        dst = targets.get(name)
        if dst is None:
            raise WeightSyncError(f"update_weights: unknown tensor {name}")
        if tuple(t.shape) != tuple(dst.shape):
            raise WeightSyncError(f"update_weights: tensor {name} has shape {tuple(t.shape)}, "
                                  f"the model's is {tuple(dst.shape)}")
        if t.dtype != dst.dtype and not (t.is_floating_point() and dst.is_floating_point()):
            raise WeightSyncError(f"update_weights: tensor {name} has dtype {t.dtype}, the model's is {dst.dtype}")


@torch.no_grad()
def copy_bucket(targets: dict[str, torch.Tensor], bucket: list[tuple[str, torch.Tensor]]) -> None:
    for name, t in bucket:
        dst = targets[name]
        if t.data_ptr() != dst.data_ptr():  # a shared module gets its own tensors back
            dst.copy_(t, non_blocking=True)


def update_in_place(model: torch.nn.Module, named_tensors: Iterable[tuple[str, torch.Tensor]], *,
                    bucket_bytes: int = DEFAULT_BUCKET_BYTES, targets: dict[str, torch.Tensor] | None = None) -> int:
    """Copies the stream into `model`'s parameters and buffers (see module docstring); returns how many
    native tensors were written. `targets`: `model.state_dict(keep_vars=True)`, when the caller keeps it."""
    if targets is None:
        targets = model.state_dict(keep_vars=True)  # name -> the Parameter / buffer itself, not a detached copy
    count = 0
    for bucket in buckets(to_native(model.config, named_tensors), bucket_bytes):
        check_bucket(targets, bucket)
        copy_bucket(targets, bucket)
        count += len(bucket)
    if count and next(iter(targets.values())).is_cuda:
        torch.cuda.synchronize()  # non_blocking copies from pinned host memory must land before use
    return count
