"""Supervised fine-tuning on prompt/response pairs: loss on response tokens only, packed micro-batches.

Used for the tiny base model's pretraining on demonstrations, for cold start, for the SFT on
rejection-sampled data and for distillation. The loss is the mean negative log-likelihood over every
response token of a batch, through the chunked `linear_logprob` (no [tokens, vocabulary] tensor).

- `train_sft`: token-id pairs, a fixed number of steps, linear warm-up then cosine (or constant); the
  model may be a pipeline (r1mega.parallel.pipeline, every pp rank calling with the same pairs): its
  micro-batches then run through the schedule, the loss on the last stage.
- `sft_examples`: dataset rows ({"prompt","response"} through a template, or {"messages"} in ChatML,
  see r1mega.data.datasets.sft_texts) -> token-id pairs, each response closed by the EOS token.
- `fine_tune`: rows -> epochs of `train_sft`, then the model saved as a native checkpoint (with its
  tokenizer) and the per-step loss as metrics.jsonl.

Deliberately left out: loss on prompt tokens, sequence-level loss weighting, LoRA, and resuming an
interrupted SFT run (runs here are short; a stage of the pipeline reruns whole).
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from r1mega.trainers.schedule import lr_factor
from r1mega.trainers.token_batch import TokenBatch, logprob_head, run_micro_batches


def sft_step(model, optimizer, batch: TokenBatch, *, token_budget: int, grad_clip: float, device) -> float:
    optimizer.zero_grad(set_to_none=True)
    tokens = batch.mask.sum().clamp(min=1)

    def head(hidden, weight, micro):
        loss = -logprob_head(hidden, weight, micro, temperature=1.0).sum() / tokens.to(hidden.device)
        return loss, loss.item()

    micro_batches = [batch.select(index) for index in batch.micro_batches(token_budget)]
    total = sum(run_micro_batches(model, micro_batches, head, device=device, backward=True))
    own = getattr(model, "clip_grad_norm", None)  # a pipeline's: its stages hold other parameters each
    if own is not None:
        own(grad_clip)
    else:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return total


def _lr_schedule(steps: int, warmup_steps: int | None, kind: str):
    """The learning-rate multiplier by step; warm-up `warmup_steps` (None: 5% of the steps, at least 1)."""
    warmup = max(1, steps // 20 if warmup_steps is None else warmup_steps)
    return lambda step: lr_factor(step, warmup_steps=warmup, total_steps=steps, kind=kind)


def train_sft(model, examples: Sequence[tuple[list[int], list[int]]], *, steps: int, batch_size: int, lr: float,
              token_budget: int = 16384, grad_clip: float = 1.0, seed: int = 0, device="cpu", log_every: int = 0,
              schedule: str = "cosine", warmup_steps: int | None = None, weight_decay: float = 0.0):
    """`examples`: (prompt ids, response ids) pairs, drawn in a seeded shuffled order (a new shuffle each
    pass). Warm-up: `warmup_steps` (None: 5% of the steps). Returns the loss of every step."""
    if not examples:
        raise ValueError("no SFT examples")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    factor = _lr_schedule(steps, warmup_steps, schedule)
    factor(0)  # an unknown schedule fails before any work
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    order, rng, losses = [], random.Random(seed), []
    model.train()
    for step in range(steps):
        picked = []
        while len(picked) < batch_size:
            if not order:
                order = list(range(len(examples)))
                rng.shuffle(order)
            picked.append(examples[order.pop()])
        ids, mask = TokenBatch.pad([response for _, response in picked])
        losses.append(sft_step(model, optimizer, TokenBatch([p for p, _ in picked], ids, mask),
                               token_budget=token_budget, grad_clip=grad_clip, device=device))
        scheduler.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"sft step {step + 1}/{steps}: loss {sum(losses[-log_every:]) / log_every:.4f}")
    return losses


def sft_examples(rows: Sequence[Mapping[str, Any]], tokenizer, template, *,
                 max_len: int | None = None) -> list[tuple[list[int], list[int]]]:
    """Token-id pairs of SFT rows. A response that would run straight into a prompt ending in a
    non-space character (the R1-Zero template ends at "Assistant:") gets a leading space, as the base
    model's demonstrations have. Pairs longer than `max_len` tokens in all are dropped."""
    from r1mega.data.datasets import sft_texts

    out = []
    for row in rows:
        prompt, response = sft_texts(dict(row), template)
        if prompt and not prompt[-1].isspace() and response and not response[0].isspace():
            response = " " + response
        pair = (tokenizer.encode(prompt), tokenizer.encode(response) + [tokenizer.eos_token_id])
        if max_len is None or len(pair[0]) + len(pair[1]) <= max_len:
            out.append(pair)
    if not out:
        raise ValueError(f"no SFT example left of {len(rows)} rows (max_len={max_len})")
    return out


def fine_tune(model, rows: Sequence[Mapping[str, Any]], tokenizer, *, template, out_dir: str | os.PathLike,
              epochs: float = 1.0, batch_size: int = 32, lr: float = 1e-4, schedule: str = "cosine",
              warmup_steps: int | None = None, token_budget: int = 16384, max_len: int | None = None,
              seed: int = 0, device="cpu", log_every: int = 0) -> dict[str, float]:
    """SFT for `epochs` passes over `rows`; writes `out_dir`/model (native checkpoint + tokenizer) and
    `out_dir`/metrics.jsonl (one row per step: loss, lr). Returns summary metrics."""
    from r1mega.models.checkpoint import save_native
    from r1mega.trainers.metrics import MetricsLogger

    examples = sft_examples(rows, tokenizer, template, max_len=max_len)
    steps = max(1, math.ceil(epochs * len(examples) / batch_size))
    model.to(device)
    losses = train_sft(model, examples, steps=steps, batch_size=batch_size, lr=lr, token_budget=token_budget,
                       seed=seed, device=device, log_every=log_every, schedule=schedule, warmup_steps=warmup_steps)
    logger = MetricsLogger(out_dir, tensorboard=False)
    factor = _lr_schedule(steps, warmup_steps, schedule)
    for step, loss in enumerate(losses):
        logger.log(step, {"sft/loss": loss, "lr": lr * factor(step)})
    logger.close()
    model.eval()
    path = Path(out_dir) / "model"
    save_native(model, path, overwrite=True)
    tokenizer.save(path)
    tail = losses[-max(1, steps // 10):]  # the last 10% of the steps: less noisy than the last one
    return {"sft/examples": float(len(examples)), "sft/steps": float(steps), "sft/loss_first": losses[0],
            "sft/loss_last": sum(tail) / len(tail)}
