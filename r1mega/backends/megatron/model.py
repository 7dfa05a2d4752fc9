"""Build a megatron-core `GPTModel` for an r1mega `ModelConfig`, and move weights into and out of it.

Layer specs come from megatron's `get_gpt_decoder_block_spec` (dense and MoE layers where
`moe_layer_freq` says): Transformer Engine's modules when `transformer_engine` imports, otherwise
megatron's local modules with `SDPACoreAttention` (core_attention.py) in the attention slot, since the
local `DotProductAttention` cannot run MLA. Rotary frequencies with linear / llama3 scaling are
replaced on the built model by `r1mega.models.rope.inv_freq`, so every scaling rule the native model
supports gives the same angles (megatron's llama3 rule hard-codes its parameters); YaRN uses megatron's
own embedding, which computes the same frequencies and attention factor.

Without TE, `compat.apply()` first repairs two globals megatron-core 0.16 leaves broken (compat.py).

GPU only: megatron-core allocates parameters and rotary tables with `torch.cuda.current_device()`.
torch.distributed must be initialised first (torchrun, or a world of one process);
`ensure_model_parallel` then sets up megatron's parallel state and CUDA RNG trackers.

Weights move in and out at any tensor-parallel size: `load_native_weights` cuts this rank's shard,
`native_weights` gathers the shards back.

Deliberately left out: pipeline parallelism (pre/post-process stages), virtual pipelines, expert
parallel weight loading (experts are named globally in mapping.py), megatron's DDP wrapper and
distributed optimizer (the trainer's job), FP8.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch

from r1mega.backends.megatron import compat
from r1mega.backends.megatron.config import ParallelConfig, build_transformer_config, position_embedding
from r1mega.backends.megatron.mapping import (Layout, is_tp_sharded, megatron_to_native, native_to_megatron, tp_shard,
                                             tp_unshard)
from r1mega.models import rope
from r1mega.models.checkpoint import CheckpointError
from r1mega.models.config import ModelConfig

_GROUPED_EXPERT = re.compile(r".*\.experts\.linear_fc1\.weight\d+")


def have_transformer_engine() -> bool:
    """Whether Transformer Engine and megatron's wrappers of it import here."""
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.extensions.transformer_engine import TEDotProductAttention  # noqa: F401
    except Exception:  # an ImportError, or a TE build that fails to load its CUDA library
        return False
    return True


def ensure_model_parallel(parallel: ParallelConfig = ParallelConfig(), seed: int = 1234) -> None:
    """Initialises megatron's parallel state (TP/EP groups) and CUDA RNG trackers once. Its data-parallel
    size is what tp x ep leave of the world: under torchrun with tp = ep = 1, every rank (dp = N)."""
    from megatron.core import parallel_state, tensor_parallel

    if not torch.distributed.is_initialized():
        raise RuntimeError("megatron backend: initialise torch.distributed first (torchrun, or "
                           "init_process_group('nccl', world_size=1, rank=0) for one process)")
    if parallel_state.model_parallel_is_initialized():
        have = (parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_expert_model_parallel_world_size())
        if have != (parallel.tensor_parallel, parallel.expert_parallel):
            raise RuntimeError(f"megatron parallel state already set to (tp, ep)={have}, asked for "
                               f"{(parallel.tensor_parallel, parallel.expert_parallel)}")
        return
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=parallel.tensor_parallel,
                                             expert_model_parallel_size=parallel.expert_parallel)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def layer_specs(transformer_config, use_te: bool):
    """megatron's block spec for the config; the local spec gets SDPACoreAttention."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    block = get_gpt_decoder_block_spec(transformer_config, use_transformer_engine=use_te, normalization="RMSNorm")
    if not use_te:
        from r1mega.backends.megatron.core_attention import SDPACoreAttention

        for spec in block.layer_specs:
            spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return block


def _set_rope_frequencies(model, cfg: ModelConfig) -> None:
    rs = cfg.rope_scaling
    if rs is None or rs["rope_type"] == "yarn":
        return  # megatron's default and YaRN frequencies already equal r1mega's
    freq, _ = rope.inv_freq(cfg)  # the attention factor is 1 outside YaRN
    embeddings = ([layer.self_attention.rotary_pos_emb for layer in model.decoder.layers] if cfg.is_mla
                  else [model.rotary_pos_emb])
    for emb in embeddings:
        emb.inv_freq = freq.to(emb.inv_freq.device)  # a plain attribute, read at every forward


def build_model(cfg: ModelConfig, parallel: ParallelConfig = ParallelConfig(), *, dtype: torch.dtype = torch.bfloat16,
                use_te: bool | None = None):
    """A megatron-core GPTModel computing what `r1mega.models.Transformer(cfg)` computes, on the current
    CUDA device, randomly initialised (load weights with `load_native_weights`)."""
    if not torch.cuda.is_available():
        raise RuntimeError("megatron backend: needs a CUDA device (megatron-core allocates on the GPU)")
    from megatron.core.models.gpt import GPTModel

    use_te = have_transformer_engine() if use_te is None else use_te
    if not use_te:
        compat.apply()  # megatron-core 0.16 cannot build MLA or route MoE without TE otherwise
    ensure_model_parallel(parallel)
    transformer_config = build_transformer_config(cfg, parallel, dtype=dtype, use_te=use_te)
    model = GPTModel(config=transformer_config, transformer_layer_spec=layer_specs(transformer_config, use_te),
                     vocab_size=cfg.vocab_size, max_sequence_length=cfg.max_position_embeddings,
                     share_embeddings_and_output_weights=cfg.tie_word_embeddings, parallel_output=True,
                     **position_embedding(cfg)[0])
    _set_rope_frequencies(model, cfg)
    # torch norms (the local spec) and the router weight are created on the CPU; everything else is
    # already on the GPU in params_dtype. Cast only the norms so fp32 router buffers stay fp32.
    model.cuda(torch.cuda.current_device())
    for module in model.modules():
        if isinstance(module, torch.nn.RMSNorm):
            module.to(dtype)
    return model


def layout_of(model) -> Layout:
    """The module naming of a built model: local spec or Transformer Engine's."""
    names = list(model.state_dict().keys())
    return Layout(te_fused_norms=any(n.endswith("layer_norm_weight") for n in names),
                  grouped_experts=any(_GROUPED_EXPERT.fullmatch(n) for n in names))


def _tp() -> tuple[int, int]:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()


@torch.no_grad()
def load_native_weights(model, cfg: ModelConfig, named: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copies native (name, tensor) pairs (e.g. `Transformer.state_dict().items()`) into the megatron
    model, cutting this rank's tensor-parallel shard; every weight must be given."""
    from megatron.core import parallel_state

    if parallel_state.get_expert_model_parallel_world_size() > 1:
        raise NotImplementedError("load_native_weights: expert parallel loading is not implemented")
    layout, (rank, size) = layout_of(model), _tp()
    state = model.state_dict()
    seen = set()
    for name, t in native_to_megatron(cfg, named, layout):
        if name not in state:
            raise CheckpointError(f"megatron model has no tensor {name} (layout {layout})")
        piece = tp_shard(cfg, name, t, rank, size, layout)
        if piece.shape != state[name].shape:
            raise CheckpointError(f"{name}: shape {tuple(piece.shape)} does not fit the model's "
                                  f"{tuple(state[name].shape)}")
        state[name].copy_(piece)  # state-dict tensors share storage with the parameters and buffers
        seen.add(name)
    absent = [n for n in state if n not in seen and not n.endswith("_extra_state")]
    if absent:
        raise CheckpointError(f"no native weight for megatron tensor {absent[0]} ({len(absent)} missing)")


@torch.no_grad()
def native_weights(model, cfg: ModelConfig):
    """The megatron model's weights as native (name, tensor) pairs, whole: under tensor parallelism each
    sharded tensor is gathered from the ranks of this rank's group as the stream reaches it (a
    collective: every rank of the group must read the stream through), so one full tensor at a time
    is held beyond the model."""
    layout = layout_of(model)
    named = model.state_dict().items()
    if _tp()[1] > 1:
        named = _tp_gathered(named, layout)
    return megatron_to_native(cfg, named, layout)


def _tp_gathered(named, layout: Layout):
    from megatron.core import parallel_state

    group, size = parallel_state.get_tensor_model_parallel_group(), _tp()[1]
    for name, t in named:
        if is_tp_sharded(name, layout):
            pieces = [torch.empty_like(t) for _ in range(size)]
            torch.distributed.all_gather(pieces, t.contiguous(), group=group)
            t = tp_unshard(name, pieces, layout)
        yield name, t
