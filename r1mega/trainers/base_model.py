"""The embedded default's base model: the tiny preset pretrained on synthetic demonstrations.

R1-Zero starts from a base model that can already solve some questions; RL reinforces what sampling
sometimes gets right. A random tiny model solves none, so this pretrains one briefly on worked
solutions in the R1-Zero format, written in a mixture of strategies (`base_strategies`: answering at
once, working step by step, working and checking each hard step; strategies.py) whose hard steps
slip (`base_slip_rate`), a share with broken tags (`base_bad_format_rate`). Which strategy a
response follows is the model's own choice (at its first tokens: at once or worked; at each hard
step: checked or not), and only the answer and the format
are rewarded: what GRPO does to the mixture is the run's result. The model is cached under the
tokenizer's cache directory, keyed by every setting that shapes it, so later runs start at once.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict
from typing import Optional

import torch

from r1mega.config import DataConfig, ModelConfig
from r1mega.data.tasks import demonstration, make_task_dataset
from r1mega.data.tasks.strategies import strategy_sampler
from r1mega.data.templates import get_template
from r1mega.data.tokenizer import Tokenizer, cache_dir
from r1mega.models import ModelConfig as TransformerConfig, Transformer, preset
from r1mega.models.checkpoint import is_native, load_native, save_native
from r1mega.trainers.sft import train_sft

RECIPE_VERSION = 4  # 2: the SFT schedule is the trainer's (cosine after the warm-up); 3: strategies; 4: hard-step slips


def _examples(model_cfg: ModelConfig, tokenizer: Tokenizer, data: DataConfig, seed: int):
    levels = model_cfg.base_difficulties or [data.difficulty]
    size = max(data.train_size, 4096) // len(levels)
    rows = [row for level in levels
            for row in make_task_dataset(data.task, split="train", size=size, difficulty=level, seed=seed)]
    template, rng, write = get_template(data.template), random.Random(seed), _writer(model_cfg, data.task)
    return [(tokenizer.encode(template(row["prompt"])),
             tokenizer.encode(" " + write(row, rng)) + [tokenizer.eos_token_id]) for row in rows]


def _writer(model_cfg: ModelConfig, task: str):
    """(row, rng) -> demonstration, as the config's strategies and rates say."""
    if task != "chain":
        if set(model_cfg.base_strategies) != {"steps"}:
            raise ValueError(f"model.base_strategies={model_cfg.base_strategies}: task {task!r} is written "
                             "one way only, {steps: 1.0}; the strategies are the chain task's")
        return lambda row, rng: demonstration(row, rng, wrong_rate=model_cfg.base_slip_rate,
                                              bad_format_rate=model_cfg.base_bad_format_rate)
    draw = strategy_sampler(model_cfg.base_strategies)
    return lambda row, rng: demonstration(row, rng, bad_format_rate=model_cfg.base_bad_format_rate,
                                          strategy=draw(rng), slip_rate=model_cfg.base_slip_rate)


def pretrained_base(model_cfg: ModelConfig, tokenizer: Tokenizer, data: DataConfig, seed: int,
                    architecture: Optional[TransformerConfig] = None) -> Transformer:
    """`architecture` (default: the preset `model_cfg.preset`) pretrained on the demonstrations that
    `model_cfg.base_*` describe; the pipeline's distillation student is such a model, smaller."""
    config = architecture or preset(model_cfg.preset, vocab_size=tokenizer.vocab_size)
    recipe = {"version": RECIPE_VERSION, "model": asdict(config), "tokenizer": tokenizer.backend.to_str(),
              "task": data.task, "difficulty": data.difficulty, "template": data.template, "seed": seed,
              **{k: v for k, v in asdict(model_cfg).items() if k.startswith("base_")}}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = cache_dir() / f"base_{config.architecture}_{key}"
    if is_native(path):
        print(f"base model: loaded from cache {path}")
        return load_native(path)
    # A named step, not a silent one: on a cold cache, building any trainer runs this SFT first.
    print(f"base model: pretraining {model_cfg.base_steps} SFT steps on {data.task} demonstrations "
          f"(once; cached at {path})")
    torch.manual_seed(seed)
    model = Transformer(config)
    train_sft(model, _examples(model_cfg, tokenizer, data, seed), steps=model_cfg.base_steps,
              batch_size=model_cfg.base_batch_size, lr=model_cfg.base_lr, seed=seed, log_every=25)
    save_native(model, path)
    # Read back: the run that pretrained starts from what every later run reads from the cache, not from
    # a model that still holds the MoE loads its pretraining counted (they would enter the first
    # expert-bias update of RL).
    return load_native(path)
