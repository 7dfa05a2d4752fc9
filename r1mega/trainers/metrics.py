"""Per-step metrics: JSONL and CSV files, TensorBoard, Weights & Biases when configured.

`metrics.jsonl` is the record, appended at every step; `metrics.csv` is the same table for
spreadsheets, written when the logger closes (rewriting it every step would cost time quadratic in
the number of steps). On resume, rows after the checkpoint's step are dropped first, so a resumed
run's files read exactly like an uninterrupted run's.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

class MetricsLogger:
    def __init__(self, out_dir: str | Path, *, resume_step: int | None = None, tensorboard: bool = True,
                 wandb_project: str | None = None, run_config: dict | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.out_dir / "metrics.jsonl"
        self.rows = self._read_rows(keep_until=resume_step)
        self._rewrite()
        self.tb = self._tensorboard() if tensorboard else None
        self.wandb = self._wandb(wandb_project, run_config) if wandb_project else None

    def _read_rows(self, keep_until: int | None) -> list[dict[str, Any]]:
        if keep_until is None or not self.jsonl.exists():
            return []
        rows = [json.loads(line) for line in self.jsonl.read_text().splitlines() if line.strip()]
        return [row for row in rows if row["step"] <= keep_until]

    def _rewrite(self) -> None:
        with open(self.jsonl, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in self.rows)

    def _write_csv(self) -> None:
        columns = sorted({key for row in self.rows for key in row}, key=lambda k: (k != "step", k))
        with open(self.out_dir / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is an optional dependency
            return None
        return SummaryWriter(str(self.out_dir / "tensorboard"))

    @staticmethod
    def _wandb(project: str, run_config: dict | None):
        import wandb

        return wandb.init(project=project, config=run_config)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self.rows.append(row)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for key, value in metrics.items():
                self.tb.add_scalar(key, value, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        self._write_csv()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
