"""`moe_route`: router logits -> top-k experts and their combine weights, for one MoE layer.

Two scoring rules, as the models define them:
- "sigmoid" (DeepSeek-V3): s = sigmoid(logits); experts are *chosen* by s + bias (the load-balancing
  bias, adjusted outside the gradient), optionally group-limited: the E experts form `n_group` equal
  groups, a group's score is the sum of its two best (s + bias), the best `topk_group` groups are kept,
  and the top_k experts are taken among them. The weights are s (without bias) at the chosen experts,
  normalised to sum 1 when `norm_topk`, times `scaling` (routed_scaling_factor).
- "softmax" (Qwen3-MoE): p = softmax(logits); top_k of p (+ bias if given), weights p at those,
  renormalised when `norm_topk`, times `scaling`.

Ties resolve deterministically: among equal selection scores the lower expert index wins, among equal
group scores the lower group index wins, and `indices[n]` lists the chosen experts by descending
selection score (ties: ascending index). transformers uses an unsorted `torch.topk`, so its order (and
its choice among exact ties) is unspecified; the set of experts and their weights are the same.
Normalisation divides by (sum + 1e-20), as transformers' DeepSeek-V3 router does.

Gradients reach `logits` through the weights only; the selection is piecewise constant, and `bias`
receives none (it is updated by the load-balancing rule, not by the loss).

`moe_route_weights` gives the weights of experts chosen elsewhere (routing replay: a rollout engine's
choice combined with the trainer's own scores), by the same rule; plain PyTorch, since it is a gather
and a normalisation with nothing to fuse.

Deliberately left out: capacity limits / token dropping, auxiliary losses, the node-limited variant
(it is the group-limited one with one group per node).
"""

from __future__ import annotations

import torch

from r1mega.ops import _extension

_SCORES = ("sigmoid", "softmax")
_NORM_EPS = 1e-20  # transformers' DeepSeek-V3 router adds this to the denominator


def _check(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, n_group: int, topk_group: int, score: str) -> None:
    if logits.dim() != 2:
        raise ValueError(f"moe_route: logits must be [N, E], got shape {tuple(logits.shape)}")
    n_experts = logits.shape[1]
    if score not in _SCORES:
        raise ValueError(f"moe_route: score must be one of {_SCORES}, got {score!r}")
    if bias is not None and tuple(bias.shape) != (n_experts,):
        raise ValueError(f"moe_route: bias must be [E]=[{n_experts}], got shape {tuple(bias.shape)}")
    if n_group < 1 or n_experts % n_group:
        raise ValueError(f"moe_route: n_group={n_group} must divide the number of experts {n_experts}")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"moe_route: topk_group={topk_group} must be in [1, n_group={n_group}]")
    eligible = topk_group * (n_experts // n_group)
    if not 1 <= top_k <= eligible:
        raise ValueError(f"moe_route: top_k={top_k} must be in [1, {eligible}] (experts in the kept groups)")


def _stable_topk(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest values per row, by descending value, ties to the lower index."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[:, :k]


def _probs(logits: torch.Tensor, score: str) -> torch.Tensor:
    # [N, E] scores in fp32 as transformers computes them (fp64 for fp64 logits, for gradcheck)
    logits = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    return logits.sigmoid() if score == "sigmoid" else logits.softmax(dim=-1)


def moe_route_reference(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    top_k: int,
    n_group: int = 1,
    topk_group: int = 1,
    scaling: float = 1.0,
    score: str = "sigmoid",
    norm_topk: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch meaning of `moe_route` (autograd through torch ops)."""
    _check(logits, bias, top_k, n_group, topk_group, score)
    n_tokens, n_experts = logits.shape
    probs = _probs(logits, score)  # [N, E]
    with torch.no_grad():
        choice = probs if bias is None else probs + bias.to(probs.dtype)  # [N, E]
        if n_group > 1:
            group_size = n_experts // n_group
            grouped = choice.view(n_tokens, n_group, group_size)
            group_scores = grouped.topk(min(2, group_size), dim=-1).values.sum(dim=-1)  # [N, G]
            kept = torch.zeros(n_tokens, n_group, dtype=torch.bool, device=logits.device)
            kept.scatter_(1, _stable_topk(group_scores, topk_group), True)
            choice = choice.masked_fill(~kept.repeat_interleave(group_size, dim=1), float("-inf"))
        indices = _stable_topk(choice, top_k)  # [N, k]
    return _weights_at(probs, indices, scaling, norm_topk), indices


def _weights_at(probs: torch.Tensor, indices: torch.Tensor, scaling: float, norm_topk: bool) -> torch.Tensor:
    weights = probs.gather(1, indices)  # [N, k]
    if norm_topk:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + _NORM_EPS)
    return weights * scaling


def moe_route_weights(logits: torch.Tensor, indices: torch.Tensor, *, scaling: float = 1.0, score: str = "sigmoid",
                      norm_topk: bool = True) -> torch.Tensor:
    """Combine weights [N, k] (fp32; fp64 for fp64 logits) of the given experts indices [N, k] under router
    logits [N, E]: the scores at those experts (no bias), normalised when `norm_topk`, times `scaling`,
    differentiable in `logits`."""
    if score not in _SCORES:
        raise ValueError(f"moe_route_weights: score must be one of {_SCORES}, got {score!r}")
    if indices.shape[0] != logits.shape[0] or indices.dim() != 2:
        raise ValueError(f"moe_route_weights: indices must be [N={logits.shape[0]}, k], got {tuple(indices.shape)}")
    return _weights_at(_probs(logits, score), indices.long(), scaling, norm_topk)


if hasattr(torch.ops.r1mega, "moe_route"):  # the compiled library defines the schemas

    @torch.library.register_fake("r1mega::moe_route")
    def _route_fake(logits, bias, top_k, n_group, topk_group, scaling, score, norm_topk):
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        shape = (logits.shape[0], top_k)
        return logits.new_empty(shape, dtype=acc), logits.new_empty(shape, dtype=torch.int64)

    @torch.library.register_fake("r1mega::moe_route_backward")
    def _route_backward_fake(grad_weights, logits, indices, scaling, score, norm_topk):
        return torch.empty_like(logits)

    def _route_setup_context(ctx, inputs, output):
        logits, _, _, _, _, scaling, score, norm_topk = inputs
        ctx.save_for_backward(logits, output[1])
        ctx.args = (scaling, score, norm_topk)

    def _route_backward(ctx, grad_weights, _grad_indices):
        logits, indices = ctx.saved_tensors
        grad_logits = torch.ops.r1mega.moe_route_backward(grad_weights, logits, indices, *ctx.args)
        return grad_logits, None, None, None, None, None, None, None

    torch.library.register_autograd("r1mega::moe_route", _route_backward, setup_context=_route_setup_context)


def moe_route(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    top_k: int,
    n_group: int = 1,
    topk_group: int = 1,
    scaling: float = 1.0,
    score: str = "sigmoid",
    norm_topk: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route N tokens to top_k of E experts.

    logits: [N, E] router logits (x @ gate.T, any float dtype); bias: [E] or None (selection only).
    Returns (weights [N, k] fp32 (fp64 for fp64 logits), indices [N, k] int64), by the rules of the
    module docstring.
    """
    _check(logits, bias, top_k, n_group, topk_group, score)
    if not _extension.has_kernel("moe_route", logits.device):
        return moe_route_reference(
            logits, bias, top_k=top_k, n_group=n_group, topk_group=topk_group,
            scaling=scaling, score=score, norm_topk=norm_topk,
        )
    return torch.ops.r1mega.moe_route(logits, bias, top_k, n_group, topk_group, float(scaling), score, norm_topk)
