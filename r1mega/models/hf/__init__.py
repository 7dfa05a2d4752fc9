"""Hugging Face checkpoints <-> r1mega: name mapping, `load`, `save`, and streaming conversion.

`native_to_hf` / `hf_to_native` rename a stream of (name, tensor) pairs (the rollout weight sync
reuses them): non-expert tensors one to one; a stacked native expert tensor [E, ...] becomes E
per-expert HF tensors (views, no copy), and back (HF experts of one layer and projection are held
until all E have arrived, then stacked). One module per architecture family knows the names
(llama.py, qwen3_moe.py, deepseek_v3.py) and what the hub files need on the way in (skipped
tensors, FP8 dequantisation).

`load` checks every HF tensor against the shapes the config implies (from a model built on the meta
device): unexpected, mis-shaped, duplicate or missing tensors raise `CheckpointError` naming them.
`save` and the converters stream tensor by tensor into shards inside a temporary directory renamed
at the end (checkpoint.py), so no full second copy of the weights is ever held.

Deliberately left out: tokenizer files (copy them alongside), generation_config.json, writing FP8.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

import torch

from r1mega.models.checkpoint import (DEFAULT_SHARD_BYTES, NATIVE_KEY, CheckpointError, atomic_dir, checked,
                                      empty_model, iter_safetensors, load_state, native_shapes, read_json,
                                      read_native, write_tensors)
from r1mega.models.config import ModelConfig
from r1mega.models.hf import deepseek_v3, llama, qwen3_moe
from r1mega.models.transformer import Transformer

FAMILIES = {
    "DeepseekV3ForCausalLM": deepseek_v3,
    "LlamaForCausalLM": llama,
    "Qwen2ForCausalLM": llama,
    "Qwen3ForCausalLM": llama,
    "Qwen3MoeForCausalLM": qwen3_moe,
}
_EXPERT_PROJ = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
_NATIVE_EXPERT = re.compile(r"layers\.(\d+)\.ffn\.experts\.(gate|up|down)")
_HF_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight")

__all__ = ["CheckpointError", "convert_hf_to_native", "convert_native_to_hf", "expected_hf_shapes", "hf_to_native",
           "load", "native_to_hf", "save"]


def _renames(config: ModelConfig) -> dict[str, str]:
    """native name -> HF name for every tensor except stacked experts."""
    names = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    family = FAMILIES[config.architecture]
    for i in range(config.num_hidden_layers):
        for native, hf in family.layer_names(config, i).items():
            names[f"layers.{i}.{native}"] = f"model.layers.{i}.{hf}"
    return names


def native_to_hf(config: ModelConfig, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Renames native (name, tensor) pairs to HF ones; stacked experts [E, ...] yield E views."""
    renames = _renames(config)
    for name, t in named_tensors:
        if name in renames:
            yield renames[name], t
        elif m := _NATIVE_EXPERT.fullmatch(name):
            for e in range(t.shape[0]):
                yield f"model.layers.{m.group(1)}.mlp.experts.{e}.{_EXPERT_PROJ[m.group(2)]}.weight", t[e]
        else:
            raise CheckpointError(f"native tensor {name} has no Hugging Face name for {config.architecture}")


def hf_to_native(config: ModelConfig, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Renames HF (name, tensor) pairs to native ones, stacking each layer's per-expert tensors."""
    inverse = {hf: native for native, hf in _renames(config).items()}
    pending: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    n_experts = config.n_routed_experts
    for name, t in named_tensors:
        if name in inverse:
            yield inverse[name], t
            continue
        m = _HF_EXPERT.fullmatch(name)
        layer, expert = (int(m.group(1)), int(m.group(2))) if m else (-1, -1)
        if not m or layer >= config.num_hidden_layers or not config.is_moe_layer(layer) or expert >= n_experts:
            raise CheckpointError(f"unexpected tensor {name} for {config.architecture} with this config")
        group = pending.setdefault((layer, m.group(3)), {})
        if expert in group:
            raise CheckpointError(f"tensor {name} appears twice")
        group[expert] = t
        if len(group) == n_experts:
            del pending[(layer, m.group(3))]
            yield f"layers.{layer}.ffn.experts.{m.group(3)}", torch.stack([group[e] for e in range(n_experts)])
    if pending:
        (layer, proj), group = next(iter(pending.items()))
        absent = [e for e in range(n_experts) if e not in group]
        raise CheckpointError(f"missing tensor model.layers.{layer}.mlp.experts.{absent[0]}.{_EXPERT_PROJ[proj]}.weight"
                              f" ({len(absent)} expert(s) of that layer and projection absent)")


def expected_hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name this config needs and its shape."""
    shapes = native_shapes(config)
    return {name: tuple(t.shape) for name, t in native_to_hf(config, ((n, torch.empty(s, device="meta"))
                                                                       for n, s in shapes.items()))}


def read_config(path: str | os.PathLike) -> tuple[ModelConfig, dict]:
    """(ModelConfig, raw config.json dict) of a HF directory; errors name the file."""
    file = Path(path) / "config.json"
    hf_config = read_json(file)
    try:
        return ModelConfig.from_hf(hf_config), hf_config
    except ValueError as e:
        raise CheckpointError(f"{file}: {e}") from None


def _hf_tensors(path: str | os.PathLike, config: ModelConfig, hf_config: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """The directory's HF tensors after the family filter, checked by name and shape against the config."""
    stream = FAMILIES[config.architecture].filter_stream(hf_config, config, iter_safetensors(path))
    # some tied checkpoints ship the (identical) output matrix anyway
    stream = ((n, t) for n, t in stream if not (n == "lm_head.weight" and config.tie_word_embeddings))
    return checked(stream, expected_hf_shapes(config), str(path))


def read_as_native(path: str | os.PathLike) -> tuple[ModelConfig, Iterator[tuple[str, torch.Tensor]]]:
    """The config and the checked stream of a HF directory's tensors under native names."""
    config, hf_config = read_config(path)
    return config, hf_to_native(config, _hf_tensors(path, config, hf_config))


def load(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device="cpu") -> tuple[Transformer, ModelConfig]:
    """A Transformer with the weights of a local HF directory (config.json + safetensors)."""
    config, native = read_as_native(path)
    model = empty_model(config, dtype=dtype, device=device)
    load_state(model, native, str(path))
    return model, config


def _hf_config_json(config: ModelConfig, dtype: torch.dtype) -> str:
    hf = config.to_hf()
    hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    return json.dumps(hf, indent=2) + "\n"


def save(model: Transformer, path: str | os.PathLike, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
         overwrite: bool = False) -> Path:
    """Writes config.json + safetensors in the hub layout of model.config.architecture."""
    with atomic_dir(path, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(_hf_config_json(model.config, model.output_weight.dtype))
        write_tensors(tmp, native_to_hf(model.config, model.state_dict().items()), max_shard_bytes)
    return Path(path)


def _cast(named_tensors, dtype):
    for name, t in named_tensors:
        # the expert bias stays fp32, as in the model
        yield name, t if dtype is None or not t.is_floating_point() or name.endswith("expert_bias") else t.to(dtype)


def convert_hf_to_native(src, dst, *, dtype: torch.dtype | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                         overwrite: bool = False) -> Path:
    """Streams a HF directory into a native one without building the model (FP8 is dequantised)."""
    config, stream = read_as_native(src)
    with atomic_dir(dst, overwrite=overwrite) as tmp:
        write_tensors(tmp, _cast(stream, dtype), max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps({NATIVE_KEY: 1, **config.to_dict()}, indent=2) + "\n")
    return Path(dst)


def convert_native_to_hf(src, dst, *, dtype: torch.dtype | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                         overwrite: bool = False) -> Path:
    """Streams a native directory into the HF hub layout without building the model."""
    config, native = read_native(src)
    with atomic_dir(dst, overwrite=overwrite) as tmp:
        first_dtype = []

        def stream():
            for name, t in _cast(native, dtype):
                if not first_dtype and name == "embed.weight":
                    first_dtype.append(t.dtype)
                yield name, t

        write_tensors(tmp, native_to_hf(config, stream()), max_shard_bytes)
        (tmp / "config.json").write_text(_hf_config_json(config, first_dtype[0] if first_dtype else dtype))
    return Path(dst)
