"""What every rollout engine speaks: `SamplingParams` in, `Sample`s out, through the `Engine` protocol.

The trainer talks only to this protocol; the native engine (native.py) and the SGLang engine implement
it. `generate` takes token-id prompts (or strings, which the engine encodes with its tokenizer) and
returns, per prompt, `n` samples with their generated token ids, text and per-token log-probabilities.

Log-probabilities: each entry of `Sample.logprobs` is log softmax(logits / temperature) at the sampled
token, i.e. after temperature and before top-k / top-p truncation, which is what the trainer
recomputes with its own forward at the same temperature. Greedy decoding (temperature 0) reports
log softmax(logits) (temperature 1).

Deliberately left out: streaming outputs, per-token alternatives (top logprobs), prompt logprobs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Mapping, Optional, Protocol, Sequence, Union, runtime_checkable

import torch

from r1mega.config import SamplingParams
from r1mega.rollout.stop import validate_stop

FinishReason = Literal["stop", "length", "error"]


@dataclass
class Sample:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)  # generated tokens, stop token included
    text: str = ""  # decoded token_ids, without a final stop token, cut right after a matched stop string
    logprobs: list[float] = field(default_factory=list)  # one per token_ids entry (see module docstring)
    finish_reason: FinishReason = "length"
    error: Optional[str] = None  # set when finish_reason == "error"
    # [len(prompt_ids) + len(token_ids) - 1, L, k] int16: the experts each of the L MoE layers chose for
    # every token the engine fed (the prompt and the generated tokens but the last); None unless the
    # engine records routing (the native engine's record_routing), for routing replay (models/routing.py)
    routed_experts: Optional[torch.Tensor] = None

    @property
    def refused(self) -> bool:
        """The engine refused the request (too long, invalid): an error before any token was generated."""
        return self.finish_reason == "error" and not self.token_ids


class TokenizerLike(Protocol):
    """What the engines need from a tokenizer (r1mega.data.tokenizer.Tokenizer is one)."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    @property
    def eos_token_id(self) -> int: ...


Prompts = Union[Sequence[Sequence[int]], Sequence[str]]


@runtime_checkable
class Engine(Protocol):
    version: int  # the weight version last applied by update_weights

    def generate(self, prompts: Prompts, sampling: SamplingParams | Sequence[SamplingParams]) -> list[list[Sample]]:
        """Per prompt, `n` samples. `sampling` is one SamplingParams for all prompts or one per prompt. A bad
        request (empty prompt, too long, invalid params) gets samples with finish_reason "error"; the
        others are served."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Copies (name, tensor) pairs, native or Hugging Face names, into the engine's weights in place."""
        ...

    def release_memory(self) -> None:
        """Frees the KV cache (and whatever else generation alone needs) while the trainer runs."""
        ...

    def resume_memory(self) -> None:
        """Reallocates what release_memory freed."""
        ...


def validate(prompt: list[int], p: SamplingParams, *, vocab_size: Optional[int] = None,
             max_len: Optional[int] = None, max_positions: Optional[int] = None) -> None:
    """Raises ValueError with the reason when an engine must refuse the request. `max_positions` is the
    model's max_position_embeddings: no sequence may run past it. Limits not known here (None) are left
    to the server."""
    if not prompt:
        raise ValueError("empty prompt")
    if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 or (vocab_size and t >= vocab_size) for t in prompt):
        raise ValueError(f"prompt token ids must be integers in [0, {vocab_size or 'vocab size'})")
    if not isinstance(p.n, int) or p.n < 1:
        raise ValueError(f"n must be a positive integer, got {p.n!r}")
    if not isinstance(p.max_new_tokens, int) or p.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {p.max_new_tokens!r}")
    if max_len is not None and len(prompt) + p.max_new_tokens > max_len:
        raise ValueError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({p.max_new_tokens}) exceeds the "
                         f"engine's max_len {max_len}")
    if max_positions is not None and len(prompt) + p.max_new_tokens > max_positions:
        raise ValueError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({p.max_new_tokens}) exceeds the model's "
                         f"max_position_embeddings {max_positions}")
    if not (math.isfinite(p.temperature) and p.temperature >= 0):
        raise ValueError(f"temperature must be >= 0, got {p.temperature!r}")
    if not 0 < p.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {p.top_p!r}")
    if not isinstance(p.top_k, int) or p.top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0, got {p.top_k!r}")
    if p.seed is not None and not isinstance(p.seed, int):
        raise ValueError(f"seed must be an integer or None, got {p.seed!r}")
    validate_stop(p.stop_token_ids, p.stop)


def max_len_for(prompts: Mapping[str, Sequence[Sequence[int]]], max_new_tokens: int, max_positions: int, *,
                key: str) -> int:
    """The max_len an engine needs to serve every prompt of `prompts` (set name -> token-id prompts, every
    prompt that can reach the engine) with `max_new_tokens` new tokens: the longest prompt + max_new_tokens.

    Raises ValueError, naming the longest prompt's set and row and the config `key` that set
    max_new_tokens, when that exceeds the model's `max_positions` (max_position_embeddings): refused
    before any work rather than served as error samples that score 0."""
    rows = [(name, i, len(p)) for name, prompts_of_set in prompts.items() for i, p in enumerate(prompts_of_set)]
    if not rows:
        raise ValueError("no prompts to size the engine for")
    name, row, longest = max(rows, key=lambda r: r[2])
    if longest + max_new_tokens > max_positions:
        raise ValueError(f"{name} row {row}: its prompt ({longest} tokens) + {key} ({max_new_tokens}) exceeds the "
                         f"model's max_position_embeddings ({max_positions}): lower {key}, shorten or drop the "
                         "longest prompts, or use a model with more positions")
    return longest + max_new_tokens


def raise_refused(groups: Sequence[Sequence[Sample]], rows: Sequence[Mapping[str, Any]]) -> None:
    """Raises ValueError naming the first row (`rows[i]` gave `groups[i]`) whose prompt the engine refused:
    its samples would otherwise be scored 0, counted as wrong answers."""
    for index, (row, group) in enumerate(zip(rows, groups)):
        refused = next((s for s in group if s.refused), None)
        if refused is not None:
            question = str(row.get("question", row.get("prompt", "")))
            raise ValueError(f"the engine refused row {row.get('id', index)} ({question[:60]!r}): {refused.error}")
