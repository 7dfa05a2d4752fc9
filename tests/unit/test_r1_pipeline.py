"""The R1 pipeline runner on a random tiny model with minimal stage sizes: every stage's artefacts,
the report holding every stage's evaluation, skipping finished stages and rerunning from a later one,
the r1mega-eval CLI on a stage's checkpoint, and the strict config."""

import json
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from r1mega.cli.train import CONF_DIR
from r1mega.pipeline.config import STAGES, register_pipeline_configs
from r1mega.pipeline.runner import FINISHED, run_pipeline, stage_dirs
from r1mega.pipeline.schedule import general_steps
from r1mega.pipeline.stages import all_scenario_prompts
from r1mega.rewards import get_reward
from r1mega.trainers.policy_update import steps_per_rollout

MINIMAL = [
    "model.init=random", "algo.train_batch_size=2", "algo.group_size=2", "algo.ppo_mini_batch_size=2",
    "rollout.max_new_tokens=[[0,6]]", "data.train_size=32", "data.test_size=2", "train.progress=false",
    "pipeline.r1_zero.steps=1", "pipeline.reasoning_rl.steps=1", "pipeline.all_scenario_rl.steps=1",
    "pipeline.cold_start.size=8", "pipeline.cold_start.batch_size=8",
    "pipeline.rejection.prompts=4", "pipeline.rejection.sampling.n=2", "pipeline.rejection.sampling.max_new_tokens=6",
    "pipeline.rejection.sampling.min_language_consistency=0.0",
    "pipeline.rejection_sft.batch_size=8", "pipeline.rejection_sft.epochs=1",
    "pipeline.all_scenario_rl.general_steps=1",  # its one step with general prompts and the reward model
    "pipeline.all_scenario_rl.reward_model.steps=1", "pipeline.all_scenario_rl.reward_model.pairs=8",
    "pipeline.all_scenario_rl.reward_model.batch_size=2", "pipeline.distill.epochs=1", "pipeline.distill.batch_size=8",
    "pipeline.eval.size=2", "pipeline.eval.sampling.n=2", "pipeline.eval.sampling.pass_k=[1,2]",
    "pipeline.eval.sampling.max_new_tokens=6",
]


def make_config(out_dir, *overrides):
    register_pipeline_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = OmegaConf.to_object(compose("pipeline", overrides=[*MINIMAL, f"pipeline.out_dir={out_dir}", *overrides]))
    # A random model is never right: keep every non-empty sample so that stage 3 has data to train on.
    cfg.pipeline.rejection.reward = {"language_consistency": 1.0}
    return cfg


def finished_times(root):
    return {name: (d / FINISHED).stat().st_mtime_ns for name, d in stage_dirs(root).items() if (d / FINISHED).exists()}


def test_stage_zero_then_skip_and_rerun(tmp_path, capsys):
    run_pipeline(make_config(tmp_path, "pipeline.stop_stage=0"))
    first = finished_times(tmp_path)
    assert sorted(first) == ["base", "r1_zero"]
    report = (tmp_path / "report.md").read_text()
    assert "| base |" in report and "| 0 r1_zero |" in report and "![evaluation across stages]" in report

    capsys.readouterr()
    run_pipeline(make_config(tmp_path, "pipeline.stop_stage=0"))  # start_stage=0: finished stages are skipped
    assert finished_times(tmp_path) == first
    assert "stage 0 r1_zero: finished earlier, skipped" in capsys.readouterr().out

    with pytest.raises(FileNotFoundError, match="1 cold_start"):
        run_pipeline(make_config(tmp_path, "pipeline.start_stage=2", "pipeline.stop_stage=2"))


def test_stage_four_has_general_data_and_the_reward_model_in_its_final_steps_only(monkeypatch):
    # The paper's second RL stage: 1,700 steps, general data and preference rewards only in the final 400.
    register_pipeline_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = OmegaConf.to_object(compose("pipeline", overrides=["pipeline.all_scenario_rl.steps=1700",
                                                                 "data.train_size=64"]))
    prompts = all_scenario_prompts(cfg)
    step = 0
    prompts.follow(lambda: step)
    monkeypatch.delenv("R1MEGA_HELPFUL_RM", raising=False)  # the reward model, if it ran, would fail
    helpful_rm = get_reward("helpful_rm")
    for step in (0, 700, 1299):
        rows = prompts.take(32)
        assert all("answer" in row for row in rows), step  # reasoning rows only
        assert all(helpful_rm("<think> a </think> b", row).score == 0.0 for row in rows)  # the model never runs
    for step in (1300, 1699):
        general = [row for row in prompts.take(32) if "answer" not in row]
        assert general, step
        with pytest.raises(RuntimeError, match="R1MEGA_HELPFUL_RM"):  # the reward model scores them
            helpful_rm("<think> a </think> b", general[0])
    # Drawn as the trainer draws them, at each rollout's first step: at least general_steps steps get
    # general rows, whatever the rollout size (the tiny default's 30 steps in rollouts of 2; one step).
    for overrides, wanted in ((["pipeline.all_scenario_rl.steps=30"], 7),
                              (["pipeline.all_scenario_rl.steps=30", "pipeline.all_scenario_rl.general_steps=1"], 1),
                              (["pipeline.all_scenario_rl.steps=1700", "algo.train_batch_size=64",
                                "algo.ppo_mini_batch_size=4"], 400)):
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            short = OmegaConf.to_object(compose("pipeline", overrides=[*overrides, "data.train_size=64"]))
        stream, per_rollout, steps = all_scenario_prompts(short), steps_per_rollout(short.algo), \
            short.pipeline.all_scenario_rl.steps
        step = 0
        stream.follow(lambda: step)
        general_steps_trained = 0
        for step in range(0, steps, per_rollout):
            if any("answer" not in row for row in stream.take(32)):
                general_steps_trained += min(per_rollout, steps - step)
        assert wanted <= general_steps_trained < wanted + per_rollout, (overrides, general_steps_trained)
    # Scaled in proportion for shorter stages; a configured count must fit in the stage.
    assert general_steps(1700, None) == 400 and general_steps(30, None) == 7 and general_steps(30, 5) == 5
    with pytest.raises(ValueError, match="pipeline.all_scenario_rl.general_steps=31"):
        general_steps(30, 31)


def test_the_pipeline_accepts_the_sandbox_allow_list_before_any_stage(monkeypatch, tmp_path):
    # Stages evaluate (with scoring pools) before any trainer starts: the allow list must already hold.
    from r1mega.rewards import sandbox

    monkeypatch.setenv(sandbox.ALLOW_ENV, "")
    register_pipeline_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = OmegaConf.to_object(compose("pipeline", overrides=[
            "reward.sandbox.allow=[none]", "pipeline.start_stage=3", "pipeline.stop_stage=1",
            f"pipeline.out_dir={tmp_path}"]))
    with pytest.raises(ValueError, match="start_stage"):  # refused before any work
        run_pipeline(cfg)
    assert os.environ[sandbox.ALLOW_ENV] == "none"


def test_config_is_strict(tmp_path):
    result = subprocess.run([sys.executable, "-m", "r1mega.cli.pipeline", "pipeline.r1_zero.not_a_key=1",
                             f"pipeline.out_dir={tmp_path}"], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "not_a_key" in result.stdout + result.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_whole_pipeline_end_to_end_and_resume(tmp_path, capsys):
    cfg = make_config(tmp_path)
    task = cfg.pipeline.eval.datasets[0]  # the embedded default's task
    report = run_pipeline(cfg)
    dirs = stage_dirs(tmp_path)
    records = json.loads((tmp_path / "report.json").read_text())
    assert [r["stage"] for r in records] == ["base", *STAGES]
    text = report.read_text()
    for record in records:
        directory = dirs[record["stage"]]
        assert (directory / "model" / "config.json").exists() and (directory / "model" / "tokenizer.json").exists()
        assert set(record["eval"][task]) >= {"pass@1", "pass@2", "cons@2", "response_length"}
        label = record["stage"] if record["index"] < 0 else f"{record['index']} {record['stage']}"
        assert f"| {label} |" in text
    for rl_stage in ("r1_zero", "reasoning_rl", "all_scenario_rl"):
        assert (dirs[rl_stage] / "metrics.jsonl").exists()
    assert (dirs["all_scenario_rl"] / "reward_model" / "model.pt").exists()
    rows = [json.loads(line) for line in (dirs["rejection_sft"] / "data.jsonl").read_text().splitlines()]
    reasoning = [r for r in rows if r["kind"] == "reasoning"]
    assert reasoning and all(r["source_checkpoint"] == str(dirs["reasoning_rl"] / "model") for r in reasoning)
    assert {"prompt_id", "sample_index", "rewards"} <= set(reasoning[0])
    assert any(r["kind"] == "non_reasoning" for r in rows)
    student = json.loads((dirs["distill"] / "model" / "config.json").read_text())
    assert student["architecture"] == "Qwen2ForCausalLM"
    distilled = [json.loads(line) for line in (dirs["distill"] / "data.jsonl").read_text().splitlines()]
    assert {r["source_checkpoint"] for r in distilled if r["kind"] == "reasoning"} == {
        str(dirs["all_scenario_rl"] / "model")}
    # RL alone on the same student start, for as many optimizer steps as the distillation's SFT
    rl_alone = json.loads((dirs["student_rl"] / "model" / "config.json").read_text())
    assert rl_alone["architecture"] == "Qwen2ForCausalLM"
    sft_steps = next(r for r in records if r["stage"] == "distill")["metrics"]["sft/steps"]
    rl_steps = [json.loads(line)["step"] for line in (dirs["student_rl"] / "metrics.jsonl").read_text().splitlines()]
    assert max(rl_steps) == sft_steps
    assert "Distillation versus RL alone on the student" in text
    assert (tmp_path / "report_eval.png").stat().st_size > 0 and (tmp_path / "report_training.png").exists()

    # Resume: everything finished is skipped; start_stage=5 reruns only the student's two stages.
    before = finished_times(tmp_path)
    capsys.readouterr()
    run_pipeline(make_config(tmp_path))
    assert finished_times(tmp_path) == before
    assert capsys.readouterr().out.count("finished earlier, skipped") == 1 + len(STAGES)
    run_pipeline(make_config(tmp_path, "pipeline.start_stage=5"))
    after = finished_times(tmp_path)
    assert [name for name in before if after[name] != before[name]] == ["distill", "student_rl"]

    # r1mega-eval on a stage's checkpoint writes its tables
    result = subprocess.run([sys.executable, "-m", "r1mega.cli.eval", f"model_path={dirs['cold_start'] / 'model'}",
                             "size=2", "sampling.n=2", "sampling.pass_k=[1,2]", "sampling.max_new_tokens=6",
                             f"out_dir={tmp_path / 'eval'}"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    evaluated = json.loads((tmp_path / "eval" / "eval.json").read_text())["results"]["arithmetic"]
    assert evaluated["samples_per_question"] == 2 and "cons@2" in evaluated
    assert "| arithmetic |" in (tmp_path / "eval" / "eval.md").read_text()
