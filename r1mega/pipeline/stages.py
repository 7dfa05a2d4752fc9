"""One function per stage of the R1 pipeline. Each reads the checkpoint directories it starts from,
writes its own directory (`model/`: a native checkpoint with its tokenizer; `metrics.jsonl`; stage
files such as the rejection-sampled `data.jsonl`) and returns the stage's summary metrics.

GRPO stages run the `GRPOTrainer` on a copy of the pipeline's GRPO config with the stage's changes
(init checkpoint, rewards, temperature, steps, learning rate) and resume from their own training
checkpoints when a previous attempt was interrupted; stage 4 brings in general prompts (hence its
reward model) for its last steps only (schedule.py). SFT stages run `fine_tune`.

Deliberately left out: the paper's cold-start data collection (few-shot prompting, R1-Zero outputs
refined by annotators): the embedded default uses correct, well-formed synthetic demonstrations (for
the chain task its long, self-checking form), and
`pipeline.cold_start.path` takes a file.
"""

from __future__ import annotations

import copy
import dataclasses
import random
from pathlib import Path
from typing import Any

import torch

from r1mega.config import Config
from r1mega.data.templates import get_template
from r1mega.models.checkpoint import save_native
from r1mega.pipeline.config import AllScenarioStage, PipelineConfig, RLStage, SFTStage
from r1mega.pipeline.general import general_rows
from r1mega.pipeline.schedule import SwitchedPrompts, general_steps
from r1mega.trainers.components import build_prompt_sets, pick_device
from r1mega.trainers.policy_update import steps_per_rollout


def grpo_config(cfg: PipelineConfig) -> Config:
    """The GRPO part of the pipeline config, as `r1mega-train` would read it."""
    return Config(**{f.name: copy.deepcopy(getattr(cfg, f.name)) for f in dataclasses.fields(Config)})


def save_model(model, tokenizer, directory: Path) -> Path:
    save_native(model, directory, overwrite=True)
    tokenizer.save(directory)
    return directory


def load_model(directory: Path):
    from r1mega.data.tokenizer import Tokenizer
    from r1mega.models import load_pretrained

    return load_pretrained(directory), Tokenizer.from_dir(directory)


def base(cfg: PipelineConfig, out: Path) -> dict[str, float]:
    """The base model (model.path, or the tiny preset pretrained on demonstrations), saved as out/model."""
    from r1mega.trainers.components import build_policy, build_tokenizer

    tokenizer = build_tokenizer(cfg.data, cfg.model)
    model = build_policy(cfg.model, tokenizer, cfg.data, cfg.train.seed)
    save_model(model, tokenizer, out / "model")
    return {"parameters": float(sum(p.numel() for p in model.parameters()))}


def rl(cfg: PipelineConfig, stage: RLStage, init: Path, out: Path,
       prompts: SwitchedPrompts | None = None) -> dict[str, float]:
    """GRPO from the checkpoint `init`; `prompts` (a stream following the trainer's step) replaces the data
    config's training set."""
    from r1mega.trainers.grpo import GRPOTrainer

    run = grpo_config(cfg)
    run.model.path, run.data.tokenizer = str(init), None
    run.reward.components = dict(stage.reward)
    run.rollout.temperature = stage.temperature
    run.algo.lr = stage.lr if stage.lr is not None else run.algo.lr
    run.train.steps, run.train.out_dir, run.train.resume = stage.steps, str(out), True
    run.train.eval_every = stage.steps  # the pipeline evaluates every stage itself
    trainer = GRPOTrainer(run, prompts=prompts)  # restores the stream's position when it resumes
    if prompts is not None:
        prompts.follow(lambda: trainer.step)
    try:
        final = trainer.fit()
    finally:
        trainer.scorer.close()
    save_model(trainer.policy, trainer.tokenizer, out / "model")
    keep = ("reward/mean", "accuracy", "response_length/mean", "reflective_words/mean", "eval/accuracy",
            "eval/accuracy_initial")
    return {f"rl/{k}": float(final[k]) for k in keep if k in final}


def _sft(cfg: PipelineConfig, stage: SFTStage, model, tokenizer, rows, out: Path) -> dict[str, float]:
    from r1mega.trainers.sft import fine_tune

    return fine_tune(model, rows, tokenizer, template=get_template(cfg.data.template), out_dir=out,
                     epochs=stage.epochs, batch_size=stage.batch_size, lr=stage.lr, schedule=stage.schedule,
                     warmup_steps=stage.warmup_steps, token_budget=cfg.algo.token_budget, max_len=stage.max_len,
                     seed=cfg.train.seed, device=pick_device(cfg.train.device))


def cold_start(cfg: PipelineConfig, base_dir: Path, out: Path) -> dict[str, float]:
    """SFT of the base model on long, readable, correct chains of thought."""
    from r1mega.data.datasets import load_sft_dataset
    from r1mega.data.tasks import demonstration, make_task_dataset

    stage = cfg.pipeline.cold_start
    if stage.path:
        rows = load_sft_dataset(stage.path)
    else:
        rng = random.Random(f"cold_start/{cfg.train.seed}")
        tasks = make_task_dataset(cfg.data.task, split="train", size=stage.size, difficulty=cfg.data.difficulty,
                                  seed=cfg.train.seed + 1)
        # The chain task's longest readable form, each hard step checked (strategies.py), with no slip.
        strategy = "check" if cfg.data.task == "chain" else None
        rows = [{"prompt": t["prompt"], "response": demonstration(t, rng, strategy=strategy)} for t in tasks]
    model, tokenizer = load_model(base_dir)
    return _sft(cfg, stage, model, tokenizer, rows, out)


def _rejection_data(cfg: PipelineConfig, source: Path, out: Path) -> tuple[Path, dict[str, float]]:
    """Rejection sampling from `source` on the training prompts, mixed with non-reasoning rows, written to
    out/data.jsonl; (its path, the sampling statistics)."""
    from r1mega.data.datasets import load_sft_dataset
    from r1mega.pipeline.rejection import mix, rejection_sample, write_jsonl
    from r1mega.rewards import ScoringPool
    from r1mega.rollout.engine import max_len_for
    from r1mega.rollout.native import NativeEngine

    stage = cfg.pipeline.rejection
    train_rows, _ = build_prompt_sets(cfg.data, cfg.train.seed)
    rows = [{**row, "id": i} for i, row in enumerate(train_rows[:stage.prompts])]
    model, tokenizer = load_model(source)
    max_len = max_len_for({"training": [tokenizer.encode(r["prompt"]) for r in rows]}, stage.sampling.max_new_tokens,
                          model.config.max_position_embeddings, key="pipeline.rejection.sampling.max_new_tokens")
    engine = NativeEngine(model, tokenizer, max_slots=cfg.rollout.max_slots, max_len=max_len,
                          device=pick_device(cfg.train.device))
    with ScoringPool(dict(stage.reward), cfg.reward.num_workers, cfg.reward.timeout) as scorer:
        kept, stats = rejection_sample(engine, tokenizer, rows, scorer, stage.sampling, source=str(source))
    if not kept:
        raise RuntimeError(f"rejection sampling from {source} kept no sample of {stats['rejection/samples']:.0f}: "
                           "nothing to fine-tune on (more prompts, more samples or a better model to sample from)")
    general = load_sft_dataset(stage.non_reasoning_path) if stage.non_reasoning_path else [
        {"prompt": r["prompt"], "response": r["response"], "source": "synthetic_general"}
        for r in general_rows(len(kept), cfg.train.seed)]
    return write_jsonl(mix(kept, general, stage.non_reasoning_share, cfg.train.seed), out / "data.jsonl"), stats


def rejection_sft(cfg: PipelineConfig, source: Path, base_dir: Path, out: Path) -> dict[str, float]:
    """Rejection sampling from `source` (stage 2), mixed with non-reasoning rows, into out/data.jsonl;
    then SFT of the *base* model on it."""
    from r1mega.data.datasets import load_sft_dataset

    data, stats = _rejection_data(cfg, source, out)
    base_model, tokenizer = load_model(base_dir)
    metrics = _sft(cfg, cfg.pipeline.rejection_sft, base_model, tokenizer, load_sft_dataset(data), out)
    return {**stats, **metrics}


def _general_prompts(stage: AllScenarioStage, size: int, seed: int) -> list[str]:
    if stage.general_path:
        from r1mega.rewards.reward_model import read_jsonl

        return [row["prompt"] for row in read_jsonl(stage.general_path)]
    return [row["prompt"] for row in general_rows(size, seed + 7)]


def reward_model(cfg: PipelineConfig, init: Path, out: Path) -> dict[str, float]:
    """The helpful reward model: the policy architecture initialised from `init`, a scalar head, trained
    on preference pairs (prompts rendered with the pipeline's template, as the RL prompts are)."""
    from r1mega.rewards.reward_model import (
        RewardModel, TrainConfig, pair_accuracy, read_jsonl, train_reward_model,
    )

    stage = cfg.pipeline.all_scenario_rl.reward_model
    template = get_template(cfg.data.template)
    pairs = read_jsonl(stage.path) if stage.path else [
        {"prompt": r["prompt"], "chosen": r["response"], "rejected": r["rejected"]}
        for r in general_rows(stage.pairs, cfg.train.seed + 3)]
    pairs = [{**p, "prompt": template(p["prompt"])} for p in pairs]
    held_out, train = pairs[:max(1, len(pairs) // 10)], pairs[max(1, len(pairs) // 10):] or pairs
    policy, tokenizer = load_model(init)
    model = RewardModel(policy.config, "helpful", stage.max_len)
    model.backbone.load_state_dict(policy.state_dict())
    torch.manual_seed(cfg.train.seed)
    losses = train_reward_model(model, train, tokenizer, TrainConfig(steps=stage.steps, batch_size=stage.batch_size,
                                                                     lr=stage.lr, seed=cfg.train.seed))
    model.save(out, tokenizer)
    return {"rm/loss_first": losses[0], "rm/loss_last": losses[-1],
            "rm/held_out_pair_accuracy": pair_accuracy(model, held_out, tokenizer)}


def all_scenario_prompts(cfg: PipelineConfig) -> SwitchedPrompts:
    """Stage 4's prompts: reasoning rows alone, then, for the last `general_steps` steps, reasoning and
    general rows mixed (`general_share` of them general), as the paper's second RL stage."""
    stage = cfg.pipeline.all_scenario_rl
    reasoning, _ = build_prompt_sets(cfg.data, cfg.train.seed)
    count = round(len(reasoning) * stage.general_share / (1 - stage.general_share))
    template = get_template(cfg.data.template)
    general = [{"prompt": template(p), "question": p} for p in _general_prompts(stage, count, cfg.train.seed)]
    mixed = [*reasoning, *general]
    random.Random(cfg.train.seed).shuffle(mixed)
    # Prompts are drawn at a rollout's first step: the switch is the last rollout start that leaves at
    # least `general_steps` steps with general rows.
    per_rollout = steps_per_rollout(cfg.algo)
    switch = (stage.steps - general_steps(stage.steps, stage.general_steps)) // per_rollout * per_rollout
    return SwitchedPrompts(reasoning, mixed, switch, cfg.train.seed)


def all_scenario(cfg: PipelineConfig, init: Path, out: Path) -> dict[str, float]:
    """GRPO on reasoning prompts, general prompts joining for the last steps, with rule rewards + the
    helpful reward model (it scores the general rows only) + language."""
    from r1mega.rewards.reward_model import set_reward_model_dir

    stage = cfg.pipeline.all_scenario_rl
    prompts = all_scenario_prompts(cfg)
    metrics = {}
    if "helpful_rm" in stage.reward and prompts.switch < stage.steps:  # no general row, no reward model
        rm_dir = out / "reward_model"
        if not (rm_dir / "model.pt").exists():
            metrics = reward_model(cfg, init, rm_dir)
        set_reward_model_dir("helpful", rm_dir)
    return {**metrics, **rl(cfg, stage, init, out, prompts)}


def _student(cfg: PipelineConfig):
    """(the distillation student at its start, its tokenizer): `pipeline.distill.student_path`, or the
    `student` architecture pretrained on the base model's demonstrations (random with model.init=random)."""
    from r1mega.data.tokenizer import Tokenizer
    from r1mega.models import ModelConfig, Transformer, load_pretrained
    from r1mega.trainers.base_model import pretrained_base
    from r1mega.trainers.components import build_tokenizer

    stage = cfg.pipeline.distill
    if stage.student_path:
        return load_pretrained(stage.student_path), Tokenizer.from_dir(stage.student_path)
    tokenizer = build_tokenizer(cfg.data, cfg.model)
    architecture = ModelConfig(**{**stage.student, "vocab_size": tokenizer.vocab_size})
    if cfg.model.init == "base":
        return pretrained_base(cfg.model, tokenizer, cfg.data, cfg.train.seed, architecture=architecture), tokenizer
    torch.manual_seed(cfg.train.seed)
    return Transformer(architecture), tokenizer


def distill(cfg: PipelineConfig, teacher: Path, out: Path) -> dict[str, float]:
    """SFT of a smaller dense student on samples of `teacher` (stage 4) kept by rejection sampling, mixed with
    non-reasoning rows; the student's start is saved as out/student_start for the RL-only comparison."""
    from r1mega.data.datasets import load_sft_dataset

    data, stats = _rejection_data(cfg, teacher, out)
    student, tokenizer = _student(cfg)
    save_model(student, tokenizer, out / "student_start")
    metrics = _sft(cfg, cfg.pipeline.distill, student, tokenizer, load_sft_dataset(data), out)
    return {**stats, **metrics, "student/parameters": float(sum(p.numel() for p in student.parameters()))}


def student_rl(cfg: PipelineConfig, distilled: dict[str, Any], out: Path) -> dict[str, float]:
    """The distillation student's start trained with GRPO alone, for as many optimizer steps as its
    distillation took (`distilled`: stage 5's finished record) unless `pipeline.student_rl.steps` says."""
    stage = copy.deepcopy(cfg.pipeline.student_rl)
    stage.steps = stage.steps or int(distilled["metrics"]["sft/steps"])
    return rl(cfg, stage, Path(distilled["dir"]) / "student_start", out)
