"""Token sampling from a batch of logits: temperature, top-k, top-p, greedy, seeded per sequence.

Pure functions on tensors, run on the logits' device. Each row carries its own settings, so one decode
step serves requests with different parameters. Randomness comes from one `torch.Generator` per
sequence, drawn with the exponential race (argmax of p / E, E ~ Exp(1), is an exact sample from p):
a sequence's tokens then depend only on its own generator and logits, never on the rest of the batch.

Deliberately left out: repetition/presence penalties, min-p, logit bias, beam search.
"""

from __future__ import annotations

import hashlib
from array import array
from typing import Optional, Sequence

import torch

_MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """A 64-bit integer mixer (Steele et al.): nearby inputs give unrelated outputs."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def prompt_key(prompt: Sequence[int]) -> int:
    """A 64-bit hash of a prompt's token ids, stable across processes."""
    return int.from_bytes(hashlib.blake2b(array("q", prompt).tobytes(), digest_size=8).digest(), "little")


def sample_seed(seed: int, prompt: Sequence[int], sample_index: int) -> int:
    """The seed (< 2**63) of sample `sample_index` of a request for `prompt` seeded with `seed`.

    Depends on nothing else (not the batch, not the prompt's place in it). The prompt is mixed in so
    that different prompts sharing one seed draw independent noise, and the mix is a hash rather than
    `seed + index` so that consecutive seeds (one per training step) do not share streams."""
    return splitmix64(splitmix64(splitmix64(seed & _MASK64) ^ prompt_key(prompt)) ^ sample_index) >> 1


def sample_generator(seed: int, prompt: Sequence[int], sample_index: int, device: torch.device | str) -> torch.Generator:
    """A generator seeded with `sample_seed(seed, prompt, sample_index)` on `device`."""
    return torch.Generator(device=device).manual_seed(sample_seed(seed, prompt, sample_index))


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """logits [B, V] (already divided by the temperature) -> the same with tokens outside each row's top-k
    and top-p nucleus set to -inf. top_k [B] (0: off), top_p [B] (1: off). The most likely token is
    always kept. Top-k filters first and the nucleus is taken on the softmax of the kept logits (the
    distribution renormalised over the top-k), as Hugging Face, vLLM and SGLang do."""
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)  # [B]
    if bool((k >= vocab).all()) and bool((top_p >= 1).all()):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V]
    rank = torch.arange(vocab, device=logits.device)
    drop = rank[None] >= k[:, None]  # beyond top-k
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)  # renormalised over the top-k
    # a token is dropped when the more likely ones before it already reach top_p; top_p 1 is off even
    # where the rounded cumulative sum reaches 1 before the last, least likely tokens
    before = probs.cumsum(dim=-1) - probs
    drop |= (before >= top_p[:, None]) & (top_p[:, None] < 1)
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def exponential_noise(generators: Sequence[Optional[torch.Generator]], vocab: int,
                      device: torch.device | str) -> torch.Tensor:
    """[B, V] Exp(1) draws, row b from generators[b] (None: a row of ones, for greedy rows)."""
    noise = torch.ones(len(generators), vocab, device=device)
    for row, gen in enumerate(generators):
        if gen is not None:
            noise[row].exponential_(generator=gen)
    return noise


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           generators: Sequence[Optional[torch.Generator]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row and its log-probability.

    logits [B, V] float; temperature, top_p [B] float; top_k [B] int; generators[b] for rows with
    temperature > 0 (None for greedy rows). Returns tokens [B] (long) and logprobs [B]: log softmax of
    logits / temperature (temperature 1 for greedy rows) at the token, before top-k / top-p.
    """
    greedy = temperature <= 0  # [B]
    scaled = logits / torch.where(greedy, 1.0, temperature)[:, None]  # [B, V]
    logp = scaled.log_softmax(dim=-1)
    filtered = filter_logits(scaled, top_k, top_p)
    # exponential race: argmax p / E  ==  argmax log p - log E; greedy rows get E = 1, a plain argmax
    noise = exponential_noise(generators, logits.shape[-1], logits.device)
    tokens = (filtered - noise.log()).argmax(dim=-1)  # [B]
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)
