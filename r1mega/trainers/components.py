"""Builds what a run needs from its config: device, tokenizer, prompt sets, policy, engine, scorer.

Each builder reads one config section; the trainers call them and never branch on which engine,
task or checkpoint format they got.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from r1mega.config import Config, DataConfig, ModelConfig, RolloutConfig
from r1mega.data.datasets import load_prompt_dataset
from r1mega.data.tasks import make_task_dataset
from r1mega.data.templates import get_template
from r1mega.data.tokenizer import Tokenizer, build_default_tokenizer
from r1mega.rollout.engine import max_len_for


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_tokenizer(data: DataConfig, model: ModelConfig) -> Tokenizer:
    if data.tokenizer:
        return Tokenizer.from_dir(data.tokenizer)
    if model.path:
        return Tokenizer.from_dir(model.path)
    return build_default_tokenizer()


Rows = list[Mapping[str, Any]]


def build_prompt_sets(data: DataConfig, seed: int) -> tuple[Rows, dict[str, Rows]]:
    """(train rows, held-out rows by metric prefix: "eval", and "eval_hard" when data.hard_difficulty is
    set), each row holding at least "prompt" (rendered) and "answer"."""
    if data.task == "file":
        if not data.path:
            raise ValueError("data.task=file needs data.path")
        if data.hard_difficulty is not None:
            raise ValueError("data.hard_difficulty is a synthetic task's: data.task=file has no difficulty")
        rows = load_prompt_dataset(data.path, prompt_key=data.prompt_key, answer_key=data.answer_key)
        held_out = max(1, min(data.test_size, len(rows) // 10))
        train, tests = rows[held_out:], {"eval": rows[:held_out]}
    else:
        train = make_task_dataset(data.task, split="train", size=data.train_size, difficulty=data.difficulty, seed=seed)
        levels = {"eval": data.difficulty}
        if data.hard_difficulty is not None:
            levels["eval_hard"] = data.hard_difficulty
        tests = {prefix: make_task_dataset(data.task, split="test", size=data.test_size, difficulty=level, seed=seed)
                 for prefix, level in levels.items()}
    template = get_template(data.template)
    render = lambda row: {**row, "question": row["prompt"], "prompt": template(row["prompt"])}  # noqa: E731
    return [render(r) for r in train], {prefix: [render(r) for r in rows] for prefix, rows in tests.items()}


def build_policy(model_cfg: ModelConfig, tokenizer: Tokenizer, data: DataConfig, seed: int):
    """The policy `Transformer` in float32 (config.py: model.dtype): from a checkpoint, the preset
    pretrained on demonstrations, or the preset at random (model.init)."""
    from r1mega.models import Transformer, preset
    from r1mega.models.checkpoint import is_native, load_native
    from r1mega.models.hf import load as load_hf

    if model_cfg.dtype != "float32":
        raise ValueError(f"model.dtype={model_cfg.dtype!r}: the trainer holds its weights in float32 only (AdamW "
                         "steps them with no fp32 master copy); rollout.sglang.dtype sets SGLang's rollout weights")
    if model_cfg.path:
        path = Path(model_cfg.path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model.path={path} has no config.json")
        return load_native(path, dtype=torch.float32) if is_native(path) else load_hf(path, dtype=torch.float32)[0]
    if model_cfg.init == "base":
        from r1mega.trainers.base_model import pretrained_base

        return pretrained_base(model_cfg, tokenizer, data, seed)
    if model_cfg.init != "random":
        raise ValueError(f"model.init={model_cfg.init!r} needs model.path (a Hugging Face or r1mega checkpoint "
                         "directory); without one, model.init is 'base' or 'random'")
    torch.manual_seed(seed)
    return Transformer(preset(model_cfg.preset, vocab_size=tokenizer.vocab_size))


def build_engine(rollout: RolloutConfig, policy, tokenizer: Tokenizer, max_len: int, device,
                 record_routing: bool = False):
    """`record_routing`: the engine records the experts of every token (algo.routing_replay)."""
    if rollout.engine == "native":
        from r1mega.rollout.native import NativeEngine

        return NativeEngine(policy, tokenizer, max_slots=rollout.max_slots, max_len=max_len,
                            kv_cache_bytes=rollout.kv_cache_bytes or None, device=device,
                            record_routing=record_routing)
    if record_routing:
        raise ValueError(f"algo.routing_replay=true needs rollout.engine=native: the {rollout.engine} engine does "
                         "not record its routing yet")
    if rollout.engine == "sglang":
        from r1mega.rollout.sglang import SGLangEngine

        return SGLangEngine.from_policy(policy, tokenizer, rollout)
    raise ValueError(f"rollout.engine={rollout.engine!r}: expected 'native' or 'sglang'")


def longest_sequence(cfg: Config, tokenizer: Tokenizer, model_config,
                     row_sets: Mapping[str, Sequence[Mapping[str, Any]]]) -> int:
    """The engine's max_len: the longest prompt of every row that can reach it (`row_sets`: set name ->
    rows, the training and the held-out ones) + the longest max_new_tokens of the rollouts' schedule and
    of the evaluation (train.eval_sampling.max_new_tokens). A prompt that
    would run past the model's max_position_embeddings is refused here, its row named."""
    prompts = {name: [tokenizer.encode(r["prompt"]) for r in rows] for name, rows in row_sets.items()}
    scheduled = [value for _, value in cfg.rollout.max_new_tokens]
    longest_response = max(scheduled + [cfg.train.eval_sampling.max_new_tokens])
    return max_len_for(prompts, longest_response, model_config.max_position_embeddings, key="rollout.max_new_tokens")
