"""Routing records: the experts each MoE layer chose for each token of a forward, recorded by one forward
and replayed by another (routing replay, R3: Ma et al. 2025, "Stabilizing MoE Reinforcement Learning by
Aligning Training and Inference Routers").

A `Routing` passed to `Transformer.forward` is filled with every MoE layer's choice, `chosen[l]` [N, k]
for the l-th MoE layer (N: the call's tokens as laid out in input_ids, row-major). With `replay`
[N, L, k] (L: the model's MoE layers in order) each MoE layer routes token n to the experts
`replay[n, l]` instead of its own top-k, combined with its own router's weights at those experts (so
the router still receives gradients); a row of -1 (a token the record does not cover) routes as usual.

Deliberately left out: replaying the engine's combine weights too (only its choice is replayed, so
the router keeps its gradient), R2 (the trainer's own old-logprob routing replayed in its update), and
a record of the shared experts (every token uses them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

NO_RECORD = -1  # a replay row of this value: the layer chooses for itself


@dataclass
class Routing:
    replay: Optional[torch.Tensor] = None  # [N, L, k] int, NO_RECORD rows route themselves
    chosen: dict[int, torch.Tensor] = field(default_factory=dict)  # MoE layer -> [N, k] int64, filled by the forward

    def check(self, tokens: int, moe_layers: int, top_k: int) -> None:
        if self.replay is not None and tuple(self.replay.shape) != (tokens, moe_layers, top_k):
            raise ValueError(f"routing replay must be [tokens, MoE layers, top_k] = [{tokens}, {moe_layers}, "
                             f"{top_k}], got {tuple(self.replay.shape)}")

    def replayed(self, layer: int, own: torch.Tensor) -> torch.Tensor:
        """The experts [N, k] MoE layer `layer` uses: the record's where it has one, `own` elsewhere."""
        record = self.replay[:, layer].to(device=own.device, dtype=own.dtype)
        return torch.where(record[:, :1] != NO_RECORD, record, own)

    def stacked(self) -> torch.Tensor:
        """The chosen experts of every MoE layer, [N, L, k]."""
        return torch.stack([self.chosen[layer] for layer in sorted(self.chosen)], dim=1)
