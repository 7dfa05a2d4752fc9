"""The megatron-core backend (`backend=megatron`): r1mega's architectures as megatron-core `GPTModel`s.

    from r1mega.backends import megatron as mb
    model = mb.build_model(cfg)                                   # GPU; TE when installed
    mb.load_native_weights(model, cfg, native_model.state_dict().items())
    loss, stats = mb.grpo_loss(model, input_ids, targets, old_logp, ref_logp, advantages, mask)

Modules: config.py (ModelConfig -> TransformerConfig), model.py (build, load/export weights),
core_attention.py (the SDPA fallback when Transformer Engine is absent), mapping.py (native/HF <->
megatron names, tensor-parallel shards), loss.py (logprobs and GRPO loss on vocabulary-parallel
logits), policy.py (`MegatronPolicy`: the model behind the trainer's policy interface). Names
resolve lazily: the mapping and config-translation functions work without megatron-core (CPU tests,
checkpoint conversion); everything that builds or runs a model raises an ImportError saying how to
install it.

Deliberately left out: pipeline parallelism, megatron's distributed optimizer and DDP wrapper.
"""

from __future__ import annotations

import importlib

MISSING_MESSAGE = ("the megatron backend needs megatron-core, which is not installed: "
                   "pip install r1mega[megatron] (and transformer-engine[pytorch] for TE kernels, optional)")

# public name -> (submodule, needs megatron-core at import/call time)
_LAZY = {
    "Layout": ("mapping", False), "LOCAL": ("mapping", False), "TE": ("mapping", False),
    "native_to_megatron": ("mapping", False), "megatron_to_native": ("mapping", False),
    "hf_to_megatron": ("mapping", False), "megatron_to_hf": ("mapping", False),
    "megatron_names": ("mapping", False), "tp_shard": ("mapping", False),
    "ParallelConfig": ("config", False), "transformer_config_kwargs": ("config", False),
    "build_transformer_config": ("config", True),
    "build_model": ("model", True), "load_native_weights": ("model", True), "native_weights": ("model", True),
    "ensure_model_parallel": ("model", True), "have_transformer_engine": ("model", True),
    "layout_of": ("model", True),
    "SDPACoreAttention": ("core_attention", True),
    "hidden_states": ("loss", True), "logprobs": ("loss", True), "grpo_loss": ("loss", True),
    "output_weight": ("loss", True),
    "MegatronPolicy": ("policy", True),
}

__all__ = ["MISSING_MESSAGE", "require_megatron", *_LAZY]


def require_megatron() -> None:
    """Raises ImportError with the install command when megatron-core cannot be imported."""
    try:
        import megatron.core  # noqa: F401
    except ImportError as e:
        raise ImportError(MISSING_MESSAGE) from e


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, needs_megatron = _LAZY[name]
    if needs_megatron:
        require_megatron()
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
