"""PNG plots of a run's metrics: reward, accuracy, response length and reflective words per step."""

from __future__ import annotations

import json
from pathlib import Path

PANELS = (
    ("reward/mean", "reward"),
    ("accuracy", "accuracy (train rollouts)"),
    ("response_length/mean", "mean response length (tokens)"),
    ("reflective_words/mean", "reflective words per response"),
)


def plot_metrics(jsonl_path: str | Path, out_path: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    jsonl_path = Path(jsonl_path)
    rows = [json.loads(line) for line in jsonl_path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{jsonl_path} holds no metrics")
    out_path = Path(out_path) if out_path else jsonl_path.with_name("metrics.png")
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.4))
    for ax, (key, title) in zip(axes, PANELS):
        points = [(row["step"], row[key]) for row in rows if key in row]
        if points:
            ax.plot(*zip(*points), lw=1.5)
        if key == "accuracy":  # held-out accuracy beside it; step -1 is the base model, before any update
            held_out = [(-1, row["eval/accuracy_initial"]) for row in rows[:1] if "eval/accuracy_initial" in row]
            held_out += [(row["step"], row["eval/accuracy"]) for row in rows if "eval/accuracy" in row]
            if held_out:
                ax.plot(*zip(*held_out), "o-", lw=1.5, label="held-out pass@1")
                ax.legend(loc="lower right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
