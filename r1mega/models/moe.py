"""Feed-forward blocks: the dense SwiGLU and the mixture of experts (shared + routed experts).

Routing and token permutation go through `r1mega.ops.moe` (moe_route, moe_permute, moe_unpermute):
one routing rule for DeepSeek-V3 (sigmoid scores, selection bias, group-limited top-k, normalised
weights times routed_scaling_factor) and Qwen3-MoE (softmax top-k, optionally renormalised).

Expert weights are stacked parameters `experts.gate`/`experts.up` [E, I, H] and `experts.down`
[E, H, I], so an expert-parallel layer shards them along dim 0 and replaces `Experts.forward`, which
takes the rows sorted by expert plus the per-expert counts (the all-to-all split sizes).

Deliberately left out: capacity limits, auxiliary losses (DeepSeek-V3 balances with the bias, see
balance.py), grouped-GEMM kernels (the expert loop is plain PyTorch).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from r1mega.models.routing import Routing
from r1mega.ops.moe import moe_permute, moe_route, moe_route_weights, moe_unpermute


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate = nn.Linear(hidden, inner, bias=False)
        self.up = nn.Linear(hidden, inner, bias=False)
        self.down = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Router(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))  # [E, H]
        if config.scoring_func == "sigmoid":
            # Added to the scores for selection only; moved by balance.update_expert_bias, never by the loss.
            self.register_buffer("expert_bias", torch.zeros(config.n_routed_experts, dtype=torch.float32))
        else:
            self.expert_bias = None

    def _apply(self, fn, recurse=True):
        # Keep the bias in fp32 when the model is cast to bf16: balancing steps (~1e-3) are below bf16's
        # resolution at the bias's magnitude and would be lost.
        bias = self.expert_bias
        super()._apply(fn, recurse)
        if bias is not None and self.expert_bias.dtype != bias.dtype and self.expert_bias.is_floating_point():
            self.expert_bias = bias.to(device=self.expert_bias.device)
        return self


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden: int, inner: int):
        super().__init__()
        self.gate = nn.Parameter(torch.empty(num_experts, inner, hidden))  # [E, I, H]
        self.up = nn.Parameter(torch.empty(num_experts, inner, hidden))  # [E, I, H]
        self.down = nn.Parameter(torch.empty(num_experts, hidden, inner))  # [E, H, I]

    def forward(self, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """x_sorted [N*k, H], rows grouped by expert in order; tokens_per_expert [E] -> [N*k, H]."""
        outs = []
        for e, rows in enumerate(x_sorted.split(tokens_per_expert.tolist())):
            if rows.shape[0]:
                outs.append(F.linear(F.silu(F.linear(rows, self.gate[e])) * F.linear(rows, self.up[e]), self.down[e]))
        return torch.cat(outs) if outs else x_sorted.new_zeros(x_sorted.shape)


class MoE(nn.Module):
    def __init__(self, config, moe_index: int = 0):
        super().__init__()
        self.config = config
        self.moe_index = moe_index  # this layer's place among the model's MoE layers (routing.py)
        self.router = Router(config)
        self.experts = Experts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared = (SwiGLU(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
                       if config.n_shared_experts else None)
        # Tokens routed to each expert [E]: in the last forward, and summed over training-mode forwards
        # since the last balance.update_expert_bias (a step's micro-batches; recomputation counts twice,
        # which leaves sign(load - mean) unchanged). Written only here: by the forward and the methods below.
        # Plain attributes, not buffers: no checkpoint entry, and None until the first forward.
        self.last_expert_load: torch.Tensor | None = None
        self.load_since_update: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, token_repeats: torch.Tensor | None = None,
                routing: Routing | None = None) -> torch.Tensor:
        """x [..., H]; token_repeats [N] (N = tokens of x): how many sequences read each token, as
        expert-load counts (shared_prefix.py; None: once each). routing: records this layer's choice
        and, with a replay, routes to the recorded experts (routing.py)."""
        c = self.config
        flat = x.reshape(-1, x.shape[-1])  # [N, H]
        # router logits in fp32, as DeepSeek-V3 computes them
        logits = F.linear(flat.float(), self.router.weight.float())  # [N, E]
        weights, indices = moe_route(logits, self.router.expert_bias, top_k=c.num_experts_per_tok, n_group=c.n_group,
                                     topk_group=c.topk_group, scaling=c.routed_scaling_factor, score=c.scoring_func,
                                     norm_topk=c.norm_topk_prob)  # [N, k] each
        if routing is not None:
            if routing.replay is not None:
                indices = routing.replayed(self.moe_index, indices)
                weights = moe_route_weights(logits, indices, scaling=c.routed_scaling_factor, score=c.scoring_func,
                                            norm_topk=c.norm_topk_prob)
            routing.chosen[self.moe_index] = indices
        x_sorted, tokens_per_expert, row_map = moe_permute(flat, indices, c.n_routed_experts)
        y = moe_unpermute(self.experts(x_sorted, tokens_per_expert), row_map, weights).view_as(x)
        with torch.no_grad():
            self.last_expert_load = tokens_per_expert.detach() if token_repeats is None else torch.zeros_like(
                tokens_per_expert).index_add_(0, indices.flatten(), token_repeats.repeat_interleave(indices.shape[1]))
            if self.training:
                prev = self.load_since_update
                self.load_since_update = self.last_expert_load if prev is None else prev + self.last_expert_load
        if self.shared is not None:
            y = y + self.shared(x)
        return y

    def pending_load(self) -> torch.Tensor | None:
        """The load the next bias update acts on: counted since the last one, else the last forward's."""
        return self.load_since_update if self.load_since_update is not None else self.last_expert_load

    def take_pending_load(self) -> torch.Tensor | None:
        """`pending_load`, and the count since the last update starts again (a bias update took it)."""
        load = self.pending_load()
        self.load_since_update = None
        return load

    @torch.no_grad()
    def reduce_pending_load(self, all_reduce: Callable[[torch.Tensor], None]) -> None:
        """Replaces the load since the last update by `all_reduce` of it, in place (the caller's sum over
        data-parallel ranks: models know no process groups); nothing when none was counted."""
        if self.load_since_update is not None:
            load = self.load_since_update.clone()  # it may alias last_expert_load, this rank's own
            all_reduce(load)
            self.load_since_update = load
