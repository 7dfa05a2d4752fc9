"""Evaluation tables: JSON (the record) and markdown (for people), one row per dataset or per stage.

Deliberately left out: plots (r1mega/pipeline/report.py draws the across-stage ones).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

# Column order: the paper's headline numbers first, then what explains them.
_FIRST = ("pass@1",)
_LAST = ("response_length", "truncated", "questions", "samples_per_question")


def columns(results: Mapping[str, Mapping[str, float]]) -> list[str]:
    keys = {key for metrics in results.values() for key in metrics}
    middle = sorted(k for k in keys if k not in _FIRST + _LAST)
    middle.sort(key=lambda k: (not k.startswith("pass@"), int(k.split("@")[1]) if "@" in k else 0, k))
    return [k for k in _FIRST if k in keys] + middle + [k for k in _LAST if k in keys]


def _cell(key: str, value: float | None) -> str:
    if value is None:
        return "-"
    if key in ("questions", "samples_per_question"):
        return str(int(value))
    if key == "response_length":
        return f"{value:.1f}"
    return f"{100 * value:.1f}"


def markdown_table(results: Mapping[str, Mapping[str, float]], first_column: str = "dataset") -> str:
    """Rows = keys of `results`; pass@k, cons@k and `truncated` in percent, length in tokens."""
    cols = columns(results)
    lines = ["| " + " | ".join([first_column, *cols]) + " |", "|" + "---|" * (len(cols) + 1)]
    for name, metrics in results.items():
        lines.append("| " + " | ".join([name, *(_cell(c, metrics.get(c)) for c in cols)]) + " |")
    return "\n".join(lines)


def write_results(results: Mapping[str, Mapping[str, float]], out_dir: str | os.PathLike, *, title: str,
                  settings: Mapping | None = None) -> tuple[Path, Path]:
    """eval.json ({"settings", "results"}) and eval.md in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "eval.json", out / "eval.md"
    json_path.write_text(json.dumps({"settings": dict(settings or {}), "results": results}, indent=2) + "\n")
    note = ("pass@k and cons@k in percent (pass@1 = mean correctness over the samples of each question); "
            "response length in tokens.")
    md_path.write_text(f"# {title}\n\n{note}\n\n{markdown_table(results)}\n")
    return json_path, md_path
