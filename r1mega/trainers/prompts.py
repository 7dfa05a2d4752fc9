"""The prompt stream of a run: rows in a seeded order, epoch after epoch, resumable by position."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch


class PromptStream:
    def __init__(self, rows: Sequence[Mapping[str, Any]], seed: int):
        if not rows:
            raise ValueError("the training set is empty")
        self.rows, self.seed = rows, seed
        self.epoch, self.position = 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(len(self.rows), generator=generator).tolist()

    def take(self, count: int) -> list[Mapping[str, Any]]:
        out = []
        while len(out) < count:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffle()
            out.append(self.rows[self._order[self.position]])
            self.position += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._shuffle()
