"""The pipeline's report: report.md (the evaluation after every stage, per dataset, and each stage's
own numbers), report.json (the same records) and two PNG plots: the evaluation across stages, and the
GRPO stages' training curves laid end to end (reward, accuracy, response length, reflective words).

Deliberately left out: HTML, and plots of the SFT losses (their metrics.jsonl files hold them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from r1mega.eval.report import markdown_table
from r1mega.trainers.plots import PANELS


def _label(record: dict[str, Any]) -> str:
    return record["stage"] if record["index"] < 0 else f"{record['index']} {record['stage']}"


def plot_eval(records: Sequence[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [_label(r) for r in records]
    datasets = sorted({ds for r in records for ds in r["eval"]})
    keys = sorted({k for r in records for m in r["eval"].values() for k in m if "@" in k})
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ds in datasets:
        for key in keys:
            values = [100 * r["eval"].get(ds, {}).get(key, float("nan")) for r in records]
            axes[0].plot(labels, values, "o-", label=f"{ds} {key}")
        axes[1].plot(labels, [r["eval"].get(ds, {}).get("response_length", float("nan")) for r in records], "o-",
                     label=ds)
    axes[0].set_title("held-out pass@k / cons@k (%)", fontsize=10)
    axes[1].set_title("mean response length (tokens)", fontsize=10)
    for ax in axes:
        ax.tick_params(axis="x", rotation=30, labelsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_training(records: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """The GRPO stages' metrics.jsonl, one after the other on a shared step axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = []
    for record in records:
        jsonl = Path(record["dir"]) / "metrics.jsonl"
        if jsonl.exists() and "rl/reward/mean" in " ".join(record["metrics"]):
            rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
            runs.append((_label(record), rows))
    if not runs:
        return None
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.4))
    for ax, (key, title) in zip(axes, PANELS):
        offset = 0
        for label, rows in runs:
            points = [(offset + row["step"], row[key]) for row in rows if key in row]
            if points:
                ax.plot(*zip(*points), lw=1.2, label=label)
            offset += len(rows)
            ax.axvline(offset, color="grey", lw=0.5)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("GRPO step (stages end to end)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _distillation_versus_rl(records: Sequence[dict[str, Any]], datasets: Sequence[str]) -> list[str]:
    """The paper's comparison on the small student, when stages 5 and 6 both ran."""
    by_stage = {r["stage"]: r for r in records}
    if not {"distill", "student_rl"} <= set(by_stage):
        return []
    distilled, alone = by_stage["distill"], by_stage["student_rl"]
    lines = [f"Distillation versus RL alone on the student ({_fmt(distilled['metrics'].get('sft/steps'))} optimizer "
             "steps each, from the same start):", ""]
    for ds in datasets:
        if ds in distilled["eval"] and ds in alone["eval"]:
            lines.append(f"- {ds}: pass@1 {_fmt(distilled['eval'][ds].get('pass@1'))} distilled, "
                         f"{_fmt(alone['eval'][ds].get('pass@1'))} with RL alone")
    return lines + [""]


def write_report(root: Path, records: Sequence[dict[str, Any]], cfg) -> Path:
    root = Path(root)
    (root / "report.json").write_text(json.dumps(list(records), indent=2) + "\n")
    eval_png = plot_eval(records, root / "report_eval.png")
    training_png = plot_training(records, root / "report_training.png")
    sampling = cfg.pipeline.eval.sampling
    lines = ["# R1 pipeline report", "",
             f"Evaluation after every stage: {sampling.n} samples per question, temperature {sampling.temperature}, "
             f"top-p {sampling.top_p}, at most {sampling.max_new_tokens} new tokens; pass@1 is the mean correctness "
             f"over the samples, pass@k the unbiased estimator, cons@{sampling.n} the majority-voted answer "
             "(percent); response length in tokens.", ""]
    datasets = sorted({ds for r in records for ds in r["eval"]})
    for ds in datasets:
        lines += [f"## {ds}", "", markdown_table({_label(r): r["eval"][ds] for r in records if ds in r["eval"]},
                                                 first_column="stage"), ""]
    lines += _distillation_versus_rl(records, datasets)
    lines += [f"![evaluation across stages]({eval_png.name})", ""]
    if training_png is not None:
        lines += [f"![GRPO training curves]({training_png.name})", ""]
    lines += ["## Stages", ""]
    for r in records:
        seconds = r.get("seconds", {})
        timing = ", ".join(f"{k} {v:.0f}s" for k, v in seconds.items())
        lines += [f"### {_label(r)}", "", f"Output: `{r['dir']}/model`" + (f" ({timing})" if timing else ""), ""]
        lines += [f"- {k}: {_fmt(v)}" for k, v in r["metrics"].items()] + [""]
    path = root / "report.md"
    path.write_text("\n".join(lines))
    return path
