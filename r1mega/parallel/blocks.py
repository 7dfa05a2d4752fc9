"""The transformer blocks of a `Transformer` or of one of its pipeline stages, with their global layer
indices, for the code that walks blocks (tensor parallel plans, checkpointing, FSDP units).

A `Transformer` keeps its blocks in an `nn.ModuleList` (layer i at index i); a pipeline stage keeps
its share in an `nn.ModuleDict` keyed by the global index, so that parameter names stay
`layers.{i}.…` and the plans that depend on the layer (dense or MoE) see the right one.
"""

from __future__ import annotations

from torch import nn


def blocks(model: nn.Module) -> list[tuple[int, nn.Module]]:
    layers = model.layers
    if isinstance(layers, nn.ModuleDict):
        return [(int(key), block) for key, block in layers.items()]
    return list(enumerate(layers))
