"""The R1 pipeline's driver: base model, stages 0-6 in order, each evaluated, then the report.

    base             the base model (stage 0, and the SFT of stages 1 and 3, start from it)
    0 r1_zero        GRPO on the base model, rule rewards
    1 cold_start     SFT of the base model on readable chains of thought
    2 reasoning_rl   GRPO from 1, rule rewards + language consistency
    3 rejection_sft  rejection sampling from 2 (+ non-reasoning rows) -> data.jsonl; SFT of the base on it
    4 all_scenario   GRPO from 3 on reasoning + general prompts, rule rewards + helpful RM, temperature 0.7
    5 distill        rejection sampling from 4 (+ non-reasoning rows); SFT of a small dense student on it
    6 student_rl     the paper's comparison: that student's start trained with GRPO alone, as many steps

Stage i writes `<out_dir>/<i>_<name>/`; `stage.json` there (its summary metrics and its evaluation) is
written last, atomically, and marks it finished. With `start_stage=0` a finished stage is skipped and
an unfinished one runs (a GRPO stage resumes from its last training checkpoint); with
`start_stage=k > 0` stages before k must have finished and stages from k on are run afresh.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from r1mega.pipeline import stages
from r1mega.pipeline.config import STAGES, PipelineConfig
from r1mega.rewards.sandbox import allow_isolation
from r1mega.trainers.cpu_kernels import pin_cpu_kernels

FINISHED = "stage.json"


def stage_dirs(root: Path) -> dict[str, Path]:
    return {"base": root / "base", **{name: root / f"{i}_{name}" for i, name in enumerate(STAGES)}}


def read_finished(directory: Path) -> dict[str, Any] | None:
    path = directory / FINISHED
    return json.loads(path.read_text()) if path.exists() else None


def _plan(cfg: PipelineConfig, dirs: dict[str, Path]) -> list[tuple[int, str, Callable[[], dict]]]:
    """(index, name, run) per stage; base has index -1."""
    d = dirs
    return [
        (-1, "base", lambda: stages.base(cfg, d["base"])),
        (0, "r1_zero", lambda: stages.rl(cfg, cfg.pipeline.r1_zero, d["base"] / "model", d["r1_zero"])),
        (1, "cold_start", lambda: stages.cold_start(cfg, d["base"] / "model", d["cold_start"])),
        (2, "reasoning_rl", lambda: stages.rl(cfg, cfg.pipeline.reasoning_rl, d["cold_start"] / "model",
                                              d["reasoning_rl"])),
        (3, "rejection_sft", lambda: stages.rejection_sft(cfg, d["reasoning_rl"] / "model", d["base"] / "model",
                                                          d["rejection_sft"])),
        (4, "all_scenario_rl", lambda: stages.all_scenario(cfg, d["rejection_sft"] / "model", d["all_scenario_rl"])),
        (5, "distill", lambda: stages.distill(cfg, d["all_scenario_rl"] / "model", d["distill"])),
        (6, "student_rl", lambda: stages.student_rl(cfg, read_finished(d["distill"]), d["student_rl"])),
    ]


def evaluate_stage(cfg: PipelineConfig, model_dir: Path, eval_sets) -> dict[str, dict[str, float]]:
    from r1mega.eval.run import evaluate_model
    from r1mega.trainers.components import pick_device

    model, tokenizer = stages.load_model(model_dir)
    device = pick_device(cfg.train.device)
    return evaluate_model(model.to(device).eval(), tokenizer, eval_sets, cfg.pipeline.eval.sampling, device=device,
                          max_slots=cfg.rollout.max_slots)


def _write_finished(directory: Path, record: dict[str, Any]) -> None:
    tmp = directory / (FINISHED + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, directory / FINISHED)


def run_pipeline(cfg: PipelineConfig) -> Path:
    """Runs (or skips) every stage up to `stop_stage`; returns the path of report.md."""
    from r1mega.eval.run import load_eval_sets
    from r1mega.pipeline.report import write_report

    pin_cpu_kernels(cfg.train.cpu_isa)  # before the first tensor work (the evaluation sets)
    allow_isolation(cfg.reward.sandbox.allow)  # every stage's scoring pools, evaluations included
    settings = cfg.pipeline
    if not 0 <= settings.start_stage <= settings.stop_stage < len(STAGES):
        raise ValueError(f"pipeline.start_stage={settings.start_stage} and pipeline.stop_stage={settings.stop_stage} "
                         f"must satisfy 0 <= start <= stop <= {len(STAGES) - 1}")
    root = Path(settings.out_dir)
    root.mkdir(parents=True, exist_ok=True)
    dirs = stage_dirs(root)
    eval_sets = load_eval_sets(settings.eval.datasets, template=cfg.data.template, size=settings.eval.size,
                               difficulty=cfg.data.difficulty, seed=cfg.train.seed)
    records = []
    for index, name, run in _plan(cfg, dirs):
        if index > settings.stop_stage:
            break
        directory, label = dirs[name], name if index < 0 else f"{index} {name}"
        done = read_finished(directory)
        if index < settings.start_stage and done is None and index >= 0:
            raise FileNotFoundError(f"stage {label} has not finished ({directory / FINISHED} is missing): "
                                    f"run with pipeline.start_stage<={index}")
        if done is not None and (index < settings.start_stage or settings.start_stage == 0):
            print(f"[pipeline] stage {label}: finished earlier, skipped ({directory})")
            records.append(done)
            continue
        if index >= settings.start_stage > 0:
            shutil.rmtree(directory, ignore_errors=True)  # a requested rerun starts afresh
        directory.mkdir(parents=True, exist_ok=True)
        print(f"[pipeline] stage {label}: running in {directory}")
        started = time.perf_counter()
        metrics = run()
        trained = time.perf_counter() - started
        evaluation = evaluate_stage(cfg, directory / "model", eval_sets)
        record = {"stage": name, "index": index, "dir": str(directory), "metrics": metrics, "eval": evaluation,
                  "seconds": {"train": trained, "eval": time.perf_counter() - started - trained}}
        _write_finished(directory, record)
        records.append(record)
        print(f"[pipeline] stage {label}: done in {time.perf_counter() - started:.0f}s; eval "
              + ", ".join(f"{ds} pass@1 {m.get('pass@1', 0):.3f}" for ds, m in evaluation.items()))
    return write_report(root, records, cfg)
