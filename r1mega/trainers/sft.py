"""Supervised fine-tuning on prompt/response pairs: loss on response tokens only, packed micro-batches.

Used for the tiny base model's pretraining on demonstrations, for cold start, for the SFT on
rejection-sampled data and for distillation. The loss is the mean negative log-likelihood over every
response token of a batch, through the chunked `linear_logprob` (no [tokens, vocabulary] tensor).
"""

from __future__ import annotations

import math
import random
from typing import Sequence

import torch

from r1mega.trainers.token_batch import TokenBatch, response_logprobs


def sft_step(model, optimizer, batch: TokenBatch, *, token_budget: int, grad_clip: float, device) -> float:
    optimizer.zero_grad(set_to_none=True)
    tokens = batch.mask.sum().clamp(min=1)
    total = 0.0
    for index in batch.micro_batches(token_budget):
        micro = batch.select(index)
        loss = -response_logprobs(model, micro, temperature=1.0, device=device).sum() / tokens
        loss.backward()
        total += loss.item()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return total


def train_sft(model, examples: Sequence[tuple[list[int], list[int]]], *, steps: int, batch_size: int, lr: float,
              token_budget: int = 16384, grad_clip: float = 1.0, seed: int = 0, device="cpu", log_every: int = 0):
    """`examples`: (prompt ids, response ids) pairs, drawn in a seeded shuffled order. Returns losses."""
    if not examples:
        raise ValueError("no SFT examples")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / max(1, steps)))))
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
        schedule.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"sft step {step + 1}/{steps}: loss {sum(losses[-log_every:]) / log_every:.4f}")
    return losses
