"""Reward models (R1 stage 4): a scalar head on the policy architecture, trained and used as rewards.

`RewardModel` = the policy's `Transformer` (its final-normed hidden states) + `Linear(H, 1)` read at
each sequence's last token. Two kinds, as in the paper:
- helpful: pairwise Bradley-Terry on preference pairs, loss = -log sigmoid(r_chosen - r_rejected); it
  sees the prompt and only the final summary (the text after `</think>`), never the reasoning.
- safety: pointwise, binary cross-entropy on safe (1) / unsafe (0) labels; it sees the prompt and the
  whole response. Its reward is P(safe) in [0, 1]; the helpful reward is the raw score.

`train_reward_model` fits one from a jsonl of pairs {"prompt","chosen","rejected"} or labels
{"prompt","response","label"}; `save` / `load_reward_model` use a directory holding config.json (model
config + kind + max length) and model.pt. Any tokenizer with `encode(str) -> list[int]` works; None means
UTF-8 bytes (vocabulary 256). Registered rewards "helpful_rm" / "safety_rm" load their checkpoint from
the directory in $R1MEGA_HELPFUL_RM / $R1MEGA_SAFETY_RM (`set_reward_model_dir` sets it before the
scoring pool starts, so its workers inherit it), once per process, on CPU. They score general rows
only: a row with "answer" or "tests" is reasoning data, graded by rules, and gets 0.

Deliberately left out: batching in the reward path (the pool calls one completion at a time), GPU
placement, LoRA, and initialising the backbone from a policy checkpoint (load its state dict yourself).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from r1mega.models import Transformer
from r1mega.models.config import ModelConfig
from r1mega.rewards.registry import RewardOutput, register_reward

KINDS = ("helpful", "safety")
_ENV = {"helpful": "R1MEGA_HELPFUL_RM", "safety": "R1MEGA_SAFETY_RM"}
_THINK_CLOSE = "</think>"


class TokenizerLike(Protocol):
    def encode(self, text: str) -> list[int]: ...


class Utf8Bytes:
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


def scored_text(kind: str, prompt: str, response: str) -> str:
    """What the reward model reads: the prompt and, for helpfulness, only the summary after </think>."""
    if kind == "helpful" and _THINK_CLOSE in response:
        response = response.rsplit(_THINK_CLOSE, 1)[1]
    return f"{prompt}\n{response.strip()}"


class RewardModel(nn.Module):
    def __init__(self, config: ModelConfig, kind: str, max_len: int = 512):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"reward model kind must be one of {KINDS}, got {kind!r}")
        self.kind, self.max_len = kind, max_len
        self.backbone = Transformer(config)
        self.head = nn.Linear(config.hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] right-padded, lengths [B] -> scores [B] (the head at each last real token)."""
        hidden = self.backbone(input_ids, return_hidden=True)  # [B, T, H]; causal, so padding is harmless
        last = hidden[torch.arange(len(lengths), device=hidden.device), lengths - 1]  # [B, H]
        return self.head(last).squeeze(-1).float()

    def batch(self, tokenizer: TokenizerLike, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        # Keep the end of an over-long text: the score is read at the last token.
        ids = [tokenizer.encode(t)[-self.max_len:] or [0] for t in texts]
        lengths = torch.tensor([len(x) for x in ids])
        padded = torch.zeros(len(ids), int(lengths.max()), dtype=torch.long)
        for row, x in enumerate(ids):
            padded[row, : len(x)] = torch.tensor(x)
        device = self.head.weight.device
        return padded.to(device), lengths.to(device)

    @torch.no_grad()
    def score_texts(self, tokenizer: TokenizerLike, texts: Sequence[str]) -> torch.Tensor:
        return self(*self.batch(tokenizer, texts))

    def save(self, directory: str | os.PathLike, tokenizer: TokenizerLike | None = None) -> Path:
        """config.json + model.pt, and the tokenizer when it can save itself (r1mega.data's can)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if tokenizer is not None and hasattr(tokenizer, "save"):
            tokenizer.save(directory)
        meta = {"kind": self.kind, "max_len": self.max_len, "model": self.backbone.config.to_dict()}
        (directory / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        torch.save(self.state_dict(), directory / "model.pt.tmp")
        os.replace(directory / "model.pt.tmp", directory / "model.pt")  # never a half-written checkpoint
        return directory


def load_reward_model(directory: str | os.PathLike) -> RewardModel:
    directory = Path(directory)
    try:
        meta = json.loads((directory / "config.json").read_text())
        model = RewardModel(ModelConfig.from_dict(meta["model"]), meta["kind"], meta["max_len"])
        model.load_state_dict(torch.load(directory / "model.pt", map_location="cpu", weights_only=True))
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise ValueError(f"cannot load a reward model from {directory}: {exc}") from exc
    return model.eval()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0


def _loss(model: RewardModel, tokenizer: TokenizerLike, rows: Sequence[Mapping[str, Any]]) -> torch.Tensor:
    if model.kind == "helpful":
        # Bradley-Terry: P(chosen > rejected) = sigmoid(r_c - r_r); chosen and rejected in one batch.
        texts = [scored_text("helpful", r["prompt"], r[key]) for key in ("chosen", "rejected") for r in rows]
        scores = model(*model.batch(tokenizer, texts))  # [2B]
        chosen, rejected = scores[: len(rows)], scores[len(rows):]
        return -F.logsigmoid(chosen - rejected).mean()
    texts = [scored_text("safety", r["prompt"], r["response"]) for r in rows]
    labels = torch.tensor([float(r["label"]) for r in rows], device=model.head.weight.device)
    return F.binary_cross_entropy_with_logits(model(*model.batch(tokenizer, texts)), labels)


def train_reward_model(model: RewardModel, rows: Iterable[Mapping[str, Any]] | str | os.PathLike,
                       tokenizer: TokenizerLike | None = None, cfg: TrainConfig = TrainConfig()) -> list[float]:
    """Fit `model` on rows (or a jsonl path) with AdamW; returns the loss of every step."""
    rows = read_jsonl(rows) if isinstance(rows, (str, os.PathLike)) else list(rows)
    needed = ("prompt", "chosen", "rejected") if model.kind == "helpful" else ("prompt", "response", "label")
    for i, row in enumerate(rows):
        if any(k not in row for k in needed):
            raise ValueError(f"row {i} lacks one of {needed}: {sorted(row)}")
    tokenizer = tokenizer or Utf8Bytes()
    rng = random.Random(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    losses = []
    for _ in range(cfg.steps):
        loss = _loss(model, tokenizer, rng.sample(rows, min(cfg.batch_size, len(rows))))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


def pair_accuracy(model: RewardModel, rows: Sequence[Mapping[str, Any]], tokenizer: TokenizerLike | None = None) -> float:
    """Share of preference pairs whose chosen response scores strictly higher."""
    tokenizer = tokenizer or Utf8Bytes()
    chosen = model.score_texts(tokenizer, [scored_text(model.kind, r["prompt"], r["chosen"]) for r in rows])
    rejected = model.score_texts(tokenizer, [scored_text(model.kind, r["prompt"], r["rejected"]) for r in rows])
    return float((chosen > rejected).float().mean())


def set_reward_model_dir(kind: str, directory: str | os.PathLike) -> None:
    """Point the registered reward `<kind>_rm` at a checkpoint (before starting the scoring pool)."""
    os.environ[_ENV[kind]] = str(directory)


@lru_cache(maxsize=None)
def _loaded(directory: str) -> RewardModel:
    return load_reward_model(directory)


@lru_cache(maxsize=None)
def _tokenizer_for(directory: str) -> TokenizerLike:
    if (Path(directory) / "tokenizer.json").exists():
        from r1mega.data.tokenizer import Tokenizer

        return Tokenizer.from_dir(directory)
    return Utf8Bytes()


def _rm_reward(kind: str, completion: str, sample: Mapping[str, Any]) -> RewardOutput:
    if "answer" in sample or "tests" in sample:
        return RewardOutput(0.0, "reasoning row: graded by rule rewards")
    directory = os.environ.get(_ENV[kind])
    if not directory:
        raise RuntimeError(f"${_ENV[kind]} names no {kind} reward model checkpoint")
    model = _loaded(directory)
    score = float(model.score_texts(_tokenizer_for(directory), [scored_text(kind, str(sample.get("prompt", "")), completion)])[0])
    return RewardOutput(torch.sigmoid(torch.tensor(score)).item() if kind == "safety" else score)


@register_reward("helpful_rm")
def helpful_rm(completion: str, sample: Mapping[str, Any]) -> RewardOutput:
    return _rm_reward("helpful", completion, sample)


@register_reward("safety_rm")
def safety_rm(completion: str, sample: Mapping[str, Any]) -> RewardOutput:
    return _rm_reward("safety", completion, sample)
