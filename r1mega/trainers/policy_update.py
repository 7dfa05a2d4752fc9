"""The trainer's side of a GRPO step: per-token logprobs, and the clipped-ratio update.

Logprobs and the loss both run on packed micro-batches (whole sequences up to a token budget) and go
through the fused vocabulary-chunked ops, so no [tokens, vocabulary] tensor ever exists.

On-policy (one mini-batch, one inner epoch, so the only optimizer step sees the policy that the
rollouts' old logprobs would come from), the batch arrives without old logprobs: the loss pass uses
its own, detached (the op's `old_logp=None`), and returns them for the metrics. That saves one full
forward per step, as TRL does in the same case.

Both passes return results of the whole batch, whatever the rank: the batch reduces over the ranks that
share it (`RolloutBatch.all_reduce`, sharded_batch.py), and nothing is written into it.

Micro-batch losses are weighted so that their sum equals the loss of the whole mini-batch under the
configured aggregation: by the share of sequences (sequence-level means) or of valid tokens
(token-mean), since the op normalises within the tensors it is given. The op's other statistics are
means over valid tokens (clip fraction, KL, ratio mean, entropy), weighted by the share of valid
tokens whatever the aggregation, or extremes (ratio min and max), taken by min and max: so none of
them depends on how the sequences were packed into micro-batches or dealt to data-parallel ranks.

Under data parallelism the ranks' gradients are summed: FSDP2 sums each micro-batch's in its backward;
a replicated policy (the megatron backend's DDP) keeps them local until the mini-batch's last
micro-batch, since DDP would sum the already-summed gradients of the earlier ones again.

The gradient norm is clipped by r1mega.parallel.grad_clip (gradients may be DTensors on several
meshes). A step whose loss or gradient norm is not finite is skipped, on every rank if on any: under
torch.distributed the ranks agree by a min-reduced flag, since their sharded or replicated parameters
must take the same steps.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from r1mega.ops.linear_grpo_loss import linear_grpo_loss
from r1mega.parallel.grad_clip import clip_grad_norm
from r1mega.trainers.algorithms import corrects_rollouts
from r1mega.trainers.rollout_batch import RolloutBatch
from r1mega.trainers.token_batch import logprob_head, run_micro_batches, vocab_group

# linear_grpo_loss's statistics that are extremes over valid tokens: (how two combine, the value of no
# token, its reduction over ranks). The others are means over valid tokens.
EXTREMES = {"ratio_min": (min, math.inf, "min"), "ratio_max": (max, -math.inf, "max")}


@dataclass
class PolicyUpdate:
    stats: dict[str, float]  # "train/..." statistics of the global batch (update_policy)
    logp: torch.Tensor | None  # on-policy: the loss pass's per-token logprobs [S, R] of the whole batch


@torch.no_grad()
def sequence_logprobs(model, batch: RolloutBatch, *, temperature: float, token_budget: int, device,
                      replay_routing: bool = False) -> torch.Tensor:
    """Logprob [S, R] of each response token of the whole batch under `model` (0 where masked), each rank
    running its own micro-batches; with `replay_routing`, routed to the engine's experts (the batch's
    routing record, token_batch.py)."""
    out = torch.zeros_like(batch.mask)
    indices = batch.micro_batches(token_budget)
    micro_batches = [batch.select(index) for index in indices]

    group = vocab_group(model)

    def head(hidden, weight, micro):
        return None, logprob_head(hidden, weight, micro, temperature=temperature, vocab_group=group).cpu()

    logps = run_micro_batches(model, micro_batches, head, device=device, backward=False,
                              routings=[_replayed(micro, replay_routing) for micro in micro_batches])
    for index, logp in zip(indices, logps):
        _place(out, index, logp)
    return batch.all_reduce(out)


def _replayed(batch: RolloutBatch, replay: bool) -> list[torch.Tensor] | None:
    """The routing record to replay in a pass over `batch`: its own when `replay` (algo.routing_replay)."""
    if replay and batch.routing is None:
        raise ValueError("algo.routing_replay=true, but the rollout batch has no routing record: the engine must "
                         "record the experts it routed to (the native engine's record_routing)")
    return batch.routing if replay else None


def sequence_kl(old_logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(pi_old || pi_ref) of each sample [S], as the k1 estimator summed over its response tokens:

        kl_b = sum_t mask[b, t] * (old_logp[b, t] - ref_logp[b, t])

    unbiased for the sequence's KL (the tokens were sampled from pi_old), though any one sample's may be
    negative; what algo.kl_in_reward subtracts, times beta, from the sample's reward."""
    return ((old_logp - ref_logp) * mask).sum(1)


def _place(out: torch.Tensor, rows: list[int], logp: torch.Tensor) -> None:
    """Writes a micro-batch's logprobs [s, r] into rows `rows` of the batch's [S, R] tensor."""
    out[torch.tensor(rows)[:, None], torch.arange(logp.shape[1])[None]] = logp.float().cpu()


def _fraction_of_mini_batch(micro: RolloutBatch, mini: RolloutBatch, agg: str) -> float:
    """The micro-batch's weight in the mini-batch: its share of the sequences or, for "token-mean", of the
    valid tokens."""
    micro_mask, mini_mask = micro.loss_tokens(), mini.loss_tokens()
    if agg == "token-mean":
        return float(micro_mask.sum() / mini_mask.sum().clamp(min=1))
    return float((micro_mask.sum(1) > 0).sum() / (mini_mask.sum(1) > 0).sum().clamp(min=1))


def _finite_on_every_rank(loss: float, grad_norm: torch.Tensor, device) -> bool:
    """False on every rank when the loss or the gradient norm is not finite on any (module docstring)."""
    finite = torch.tensor(float(math.isfinite(loss) and bool(torch.isfinite(grad_norm))), device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite)


def _no_tokens() -> dict[str, float]:
    return {key: none for key, (_, none, _) in EXTREMES.items()}


def _add(into: dict[str, float], stats: dict[str, float], weight: float = 1.0) -> None:
    """Adds `stats`, weighted by `weight`, into the sums of `into`, or combines them with its extremes."""
    for key, value in stats.items():
        if key in EXTREMES:
            into[key] = EXTREMES[key][0](into[key], value)
        else:
            into[key] = into.get(key, 0.0) + value * weight


def _over_ranks(stats: dict[str, float], batch: RolloutBatch) -> dict[str, float]:
    """One rank's statistics of a mini-batch made the global mini-batch's: the share-weighted sums added
    over the ranks that share `batch`, the extremes min- or max-reduced."""
    sums = sorted(key for key in stats if key not in EXTREMES)
    totals = batch.all_reduce(torch.tensor([stats[key] for key in sums], dtype=torch.float64))
    out = dict(zip(sums, totals.tolist()))
    for key, (_, _, op) in EXTREMES.items():
        out[key] = float(batch.all_reduce(torch.tensor([stats[key]], dtype=torch.float64), op))
    return out


def _micro_stats(stats: dict[str, torch.Tensor], micro: RolloutBatch) -> dict[str, float]:
    """The op's statistics of one micro-batch as floats; its extremes only when it has a valid token
    (without one the op reports 0)."""
    return {key: float(value) for key, value in stats.items() if key not in EXTREMES or micro.loss_tokens().any()}


def clip_gradients(model, max_norm: float) -> torch.Tensor:
    """The global gradient norm, clipped to `max_norm`: the model's own `clip_grad_norm` when it has one
    (a pipeline's stages hold other parameters each), r1mega.parallel.grad_clip's otherwise."""
    own = getattr(model, "clip_grad_norm", None)
    return own(max_norm) if own is not None else clip_grad_norm(model.parameters(), max_norm)


def steps_per_rollout(algo) -> int:
    """Optimizer steps one rollout makes: `inner_epochs` passes over its mini-batches."""
    if algo.train_batch_size % algo.ppo_mini_batch_size:
        raise ValueError(f"algo.train_batch_size={algo.train_batch_size} must be a multiple of "
                         f"algo.ppo_mini_batch_size={algo.ppo_mini_batch_size}: a rollout splits into whole "
                         "mini-batches")
    return algo.inner_epochs * (algo.train_batch_size // algo.ppo_mini_batch_size)


def is_on_policy(algo) -> bool:
    """True when one optimizer step consumes the whole rollout batch, so old logprobs = current ones, and
    nothing needs them before the loss (the KL in the reward, rollout correction's weights and masks)."""
    return steps_per_rollout(algo) == 1 and not algo.kl_in_reward and not corrects_rollouts(algo)


def _mini_batches(samples: int, algo, generator: random.Random) -> list[list[int]]:
    """The samples of each optimizer step: `inner_epochs` shuffled passes over the batch, each cut into
    mini-batches of `ppo_mini_batch_size` questions' samples (samples, not whole groups: a random split)."""
    size = algo.ppo_mini_batch_size * algo.group_size
    steps = []
    for _ in range(algo.inner_epochs):
        order = list(range(samples))
        generator.shuffle(order)
        steps += [order[start:start + size] for start in range(0, samples, size)]
    return steps


def update_policy(model, optimizer, batch: RolloutBatch, algo, *, max_new_tokens: int, temperature: float, device,
                  generator: random.Random, steps: int | None = None,
                  on_step: Callable[[bool], None] | None = None) -> PolicyUpdate:
    """Inner epochs over shuffled mini-batches: forward, fused logprob + GRPO loss, backward, step; the
    first `steps` of them only when given (a run's last rollout). `on_step(finite)` is called after each.

    `batch.old_logp` None: on-policy (module docstring), the loss pass's logprobs returned as `logp`.
    `max_new_tokens`: the generation budget of the rollout, the constant divisor of Dr. GRPO's
    "seq-mean-token-sum-norm" (Liu et al. 2025), the same for every micro-batch and every step.
    The statistics, of the global batch: the mean of each over optimizer steps, but `ratio_min` and
    `ratio_max` over all their valid tokens (+inf and -inf without any), plus `nan_steps`: updates skipped
    because the loss or the gradient norm was not finite.
    """
    on_policy = batch.old_logp is None
    if on_policy and not is_on_policy(algo):
        raise ValueError("a batch without old logprobs needs one mini-batch, one inner epoch, the KL in the loss "
                         "and no rollout correction")
    current_logp = torch.zeros_like(batch.mask)
    totals = _no_tokens()  # sums of per-step statistics, extremes over all steps
    updates = nan_steps = 0
    beta = 0.0 if algo.kl_in_reward or batch.ref_logp is None else algo.beta
    group = vocab_group(model)
    for members in _mini_batches(len(batch), algo, generator)[:steps]:
        mini = batch.select(members)
        optimizer.zero_grad(set_to_none=True)
        step_stats = {"loss": 0.0, **_no_tokens()}
        indices = mini.micro_batches(algo.token_budget)

        def head(hidden, weight, micro):
            ref = None if beta == 0.0 else micro.ref_logp.to(hidden.device)
            old = None if on_policy else micro.old_logp.to(hidden.device)
            loss, stats, logp = linear_grpo_loss(
                hidden, weight, micro.response_ids.to(hidden.device), old, ref, micro.advantages.to(hidden.device),
                micro.loss_tokens().to(hidden.device), temperature=temperature, clip_low=algo.clip_low,
                clip_high=algo.clip_high, beta=beta, agg=algo.agg, max_len=max_new_tokens, ratio=algo.ratio,
                process_group=group, return_logp=True)
            share = _fraction_of_mini_batch(micro, mini, algo.agg)
            logp = (logp.detach() * micro.mask.to(logp.device)).cpu()
            return loss * share, (loss.item() * share, _micro_stats(stats, micro), logp)

        micro_batches = [mini.select(index) for index in indices]
        results = run_micro_batches(model, micro_batches, head, device=device, backward=True,
                                    routings=[_replayed(micro, algo.routing_replay) for micro in micro_batches])
        for index, micro, (loss, stats, logp) in zip(indices, micro_batches, results):
            if on_policy:
                _place(current_logp, [members[i] for i in index], logp)
            step_stats["loss"] += loss
            _add(step_stats, stats, _fraction_of_mini_batch(micro, mini, "token-mean"))  # token means
        step_stats = _over_ranks(step_stats, batch)
        grad_norm = clip_gradients(model, algo.grad_clip)
        finite = _finite_on_every_rank(step_stats["loss"], grad_norm, device)
        if finite:
            optimizer.step()
            updates += 1
            step_stats["grad_norm"] = float(grad_norm)
            _add(totals, step_stats)
        else:
            optimizer.zero_grad(set_to_none=True)
            nan_steps += 1
        if on_step is not None:
            on_step(finite)
    means = {f"train/{k}": v if k in EXTREMES else v / max(1, updates) for k, v in totals.items()}
    means["train/nan_steps"] = float(nan_steps)
    return PolicyUpdate(means, batch.all_reduce(current_logp) if on_policy else None)
