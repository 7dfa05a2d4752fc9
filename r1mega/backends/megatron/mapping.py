"""Native (and Hugging Face) state dicts <-> megatron-core `GPTModel` state dicts: pure renaming and reshaping.

Each megatron tensor comes from a fixed group of native tensors (a `_Rule`): most one to one, some
fused. The fused ones, for the unsharded (TP=1) model:
- GQA `self_attention.linear_qkv.{weight,bias}`: per query group g, [q heads of g; k_g; v_g] along dim 0
  (megatron splits the fused projection group by group);
- `linear_fc1.weight` of dense MLPs, shared experts and each routed expert: [gate; up] (SwiGLU);
- stacked native experts `ffn.experts.{gate,up}` [E, I, H] / `down` [E, H, I] <-> one fc1 / fc2 per
  expert (`local_experts.{e}.linear_fc{1,2}.weight`, or TE's grouped `experts.linear_fc{1,2}.weight{e}`);
- MLA rope rows: megatron's MLA de-interleaves the rope dims before rotating halves (what r1mega does
  for `rope_interleave=True` checkpoints); for `rope_interleave=False` the q and kv_down rope rows are
  stored interleaved so that megatron's de-interleave gives back the native halves.
`Layout` says which module names the built model has: the local spec (norms as their own modules) or
Transformer Engine's (norms fused into the next linear as `layer_norm_weight`, grouped experts).

Both directions stream: a tensor is held only until the rest of its rule has arrived (a layer's
q/k/v, gate/up; all E experts of a layer's fc1 before the stacked native tensors are emitted), so
state-dict order keeps memory to one layer. `tp_shard` cuts a full megatron tensor into rank r's
tensor-parallel piece, `tp_unshard` puts the pieces back together. TE's `_extra_state` entries carry
no weights and are skipped. Unknown, duplicate and half-given fused tensors raise; whether every
tensor was given is the caller's check (`megatron_names` lists them; model.load_native_weights does it).

Deliberately left out: pipeline-parallel layer offsets and expert-parallel expert renumbering (the
names are those of the whole model), multi-token-prediction layers, megatron's distributed
(`torch_dist`) checkpoint format.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

from r1mega.models.checkpoint import CheckpointError
from r1mega.models.config import ModelConfig
from r1mega.models.hf import hf_to_native, native_to_hf

Named = Iterable[tuple[str, torch.Tensor]]


@dataclass(frozen=True)
class Layout:
    """Module naming of a built megatron model (model.py's `layout_of` reads it from the model)."""

    te_fused_norms: bool = False  # TE spec: input/q/kv/pre-MLP norms live in the next linear as layer_norm_weight
    grouped_experts: bool = False  # TEGroupedMLP: mlp.experts.linear_fc1.weight{e}; else SequentialMLP local_experts


LOCAL = Layout()
TE = Layout(te_fused_norms=True, grouped_experts=True)


@dataclass(frozen=True)
class _Rule:
    native: tuple[str, ...]
    megatron: tuple[str, ...]
    to_megatron: Callable[..., tuple[torch.Tensor, ...]]
    to_native: Callable[..., tuple[torch.Tensor, ...]]


def _same(t: torch.Tensor) -> tuple[torch.Tensor]:
    return (t,)


def _one(native: str, megatron: str) -> _Rule:
    return _Rule((native,), (megatron,), _same, _same)


# ---- fused tensors ------------------------------------------------------------------------------------
def _glu_rule(gate: str, up: str, fc1: str) -> _Rule:
    return _Rule((gate, up), (fc1,), lambda g, u: (torch.cat([g, u]),), lambda f: tuple(f.chunk(2)))


def _qkv_rule(config: ModelConfig, native: tuple[str, str, str], fused: str) -> _Rule:
    groups, hd = config.num_key_value_heads, config.head_dim
    per_group = config.num_attention_heads // groups

    def to_megatron(q, k, v):  # q [np*hd, ...], k/v [ng*hd, ...] -> [ng*(np/ng + 2)*hd, ...]
        rest = q.shape[1:]
        parts = [q.reshape(groups, per_group * hd, *rest), k.reshape(groups, hd, *rest), v.reshape(groups, hd, *rest)]
        return (torch.cat(parts, dim=1).reshape(-1, *rest),)

    def to_native(qkv):
        rest = qkv.shape[1:]
        q, k, v = qkv.reshape(groups, (per_group + 2) * hd, *rest).split([per_group * hd, hd, hd], dim=1)
        return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)

    return _Rule(native, (fused,), to_megatron, to_native)


def _expert_rules(config: ModelConfig, layer: int, layout: Layout) -> list[_Rule]:
    e_count, inner = config.n_routed_experts, config.moe_intermediate_size
    p = f"decoder.layers.{layer}.mlp.experts."
    if layout.grouped_experts:
        fc1 = tuple(f"{p}linear_fc1.weight{e}" for e in range(e_count))
        fc2 = tuple(f"{p}linear_fc2.weight{e}" for e in range(e_count))
    else:
        fc1 = tuple(f"{p}local_experts.{e}.linear_fc1.weight" for e in range(e_count))
        fc2 = tuple(f"{p}local_experts.{e}.linear_fc2.weight" for e in range(e_count))
    n = f"layers.{layer}.ffn.experts."
    return [
        # gate, up [E, I, H] <-> E x fc1 [2I, H]
        _Rule((n + "gate", n + "up"), fc1, lambda g, u: tuple(torch.cat([g[e], u[e]]) for e in range(e_count)),
              lambda *f: (torch.stack([x[:inner] for x in f]), torch.stack([x[inner:] for x in f]))),
        # down [E, H, I] <-> E x fc2 [H, I]
        _Rule((n + "down",), fc2, lambda d: tuple(d.unbind(0)), lambda *f: (torch.stack(f),)),
    ]


# ---- MLA rope rows ------------------------------------------------------------------------------------
def _interleave_halves(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Rows [a0..a(D/2-1), b0..b(D/2-1)] along `dim` -> [a0, b0, a1, b1, ...]."""
    return torch.stack(x.chunk(2, dim=dim), dim=dim + 1).flatten(dim, dim + 1)


def _deinterleave(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of `_interleave_halves`: [a0, b0, a1, b1, ...] -> [a..., b...] (what megatron's MLA does)."""
    return x.unflatten(dim, (x.shape[dim] // 2, 2)).transpose(dim, dim + 1).flatten(dim, dim + 1)


def _rope_rows_rule(config: ModelConfig, native: str, megatron: str, *, per_head: bool) -> _Rule:
    """A projection whose output rows end in rope dims: per head ([n, nope + rope, in]) or once at the
    end ([kv_lora + rope, in]). Identity for interleaved checkpoints."""
    if config.rope_interleave:
        return _one(native, megatron)
    rope = config.qk_rope_head_dim

    def convert(w, fn):
        rows = w.reshape(config.num_attention_heads, -1, w.shape[-1]) if per_head else w[None]  # [heads, rows, in]
        head, tail = rows[:, :-rope], rows[:, -rope:]
        return (torch.cat([head, fn(tail, 1)], dim=1).reshape(w.shape),)

    return _Rule((native,), (megatron,), lambda w: convert(w, _interleave_halves), lambda w: convert(w, _deinterleave))


# ---- the rule table -----------------------------------------------------------------------------------
def _attention_rules(config: ModelConfig, i: int, layout: Layout) -> list[_Rule]:
    n, m = f"layers.{i}.attn.", f"decoder.layers.{i}.self_attention."
    norm = f"layers.{i}.attn_norm.weight"
    if config.is_mla:
        rules = [_one(norm, f"decoder.layers.{i}.input_layernorm.weight"),
                 _rope_rows_rule(config, n + "wkv_a.weight", m + "linear_kv_down_proj.weight", per_head=False),
                 _one(n + "kv_norm.weight", m + ("linear_kv_up_proj.layer_norm_weight" if layout.te_fused_norms
                                                 else "kv_layernorm.weight")),
                 _one(n + "wkv_b.weight", m + "linear_kv_up_proj.weight"),
                 _one(n + "wo.weight", m + "linear_proj.weight")]
        if config.q_lora_rank is None:
            return rules + [_rope_rows_rule(config, n + "wq.weight", m + "linear_q_proj.weight", per_head=True)]
        return rules + [_one(n + "wq_a.weight", m + "linear_q_down_proj.weight"),
                        _one(n + "q_norm.weight", m + ("linear_q_up_proj.layer_norm_weight" if layout.te_fused_norms
                                                       else "q_layernorm.weight")),
                        _rope_rows_rule(config, n + "wq_b.weight", m + "linear_q_up_proj.weight", per_head=True)]
    rules = [_one(norm, m + "linear_qkv.layer_norm_weight" if layout.te_fused_norms
                  else f"decoder.layers.{i}.input_layernorm.weight"),
             _qkv_rule(config, (n + "wq.weight", n + "wk.weight", n + "wv.weight"), m + "linear_qkv.weight"),
             _one(n + "wo.weight", m + "linear_proj.weight")]
    if config.attention_bias:
        rules.append(_qkv_rule(config, (n + "wq.bias", n + "wk.bias", n + "wv.bias"), m + "linear_qkv.bias"))
    if config.attention_out_bias:
        rules.append(_one(n + "wo.bias", m + "linear_proj.bias"))
    if config.qk_norm:
        rules += [_one(n + "q_norm.weight", m + "q_layernorm.weight"),
                  _one(n + "k_norm.weight", m + "k_layernorm.weight")]
    return rules


def _ffn_rules(config: ModelConfig, i: int, layout: Layout) -> list[_Rule]:
    n, m = f"layers.{i}.ffn.", f"decoder.layers.{i}.mlp."
    norm = f"layers.{i}.ffn_norm.weight"
    if not config.is_moe_layer(i):
        return [_one(norm, m + "linear_fc1.layer_norm_weight" if layout.te_fused_norms
                     else f"decoder.layers.{i}.pre_mlp_layernorm.weight"),
                _glu_rule(n + "gate.weight", n + "up.weight", m + "linear_fc1.weight"),
                _one(n + "down.weight", m + "linear_fc2.weight")]
    rules = [_one(norm, f"decoder.layers.{i}.pre_mlp_layernorm.weight"),
             _one(n + "router.weight", m + "router.weight"), *_expert_rules(config, i, layout)]
    if config.scoring_func == "sigmoid":
        rules.append(_one(n + "router.expert_bias", m + "router.expert_bias"))
    if config.n_shared_experts:
        rules += [_glu_rule(n + "shared.gate.weight", n + "shared.up.weight", m + "shared_experts.linear_fc1.weight"),
                  _one(n + "shared.down.weight", m + "shared_experts.linear_fc2.weight")]
    return rules


def rules(config: ModelConfig, layout: Layout = LOCAL) -> list[_Rule]:
    """Every tensor of the model as (native names, megatron names, conversions)."""
    out = [_one("embed.weight", "embedding.word_embeddings.weight"),
           _one("norm.weight", "decoder.final_layernorm.weight")]
    if not config.tie_word_embeddings:
        out.append(_one("lm_head.weight", "output_layer.weight"))
    for i in range(config.num_hidden_layers):
        out += _attention_rules(config, i, layout) + _ffn_rules(config, i, layout)
    return out


def megatron_names(config: ModelConfig, layout: Layout = LOCAL) -> list[str]:
    """The megatron state-dict names (weights only, no `_extra_state`) of `config` under `layout`."""
    return [name for rule in rules(config, layout) for name in rule.megatron]


# ---- streaming conversion -----------------------------------------------------------------------------
def _convert(table: list[_Rule], named: Named, to_megatron: bool, what: str) -> Iterator[tuple[str, torch.Tensor]]:
    inputs = (lambda r: r.native) if to_megatron else (lambda r: r.megatron)
    outputs = (lambda r: r.megatron) if to_megatron else (lambda r: r.native)
    index = {name: k for k, rule in enumerate(table) for name in inputs(rule)}
    pending: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in named:
        if not to_megatron and name.endswith("_extra_state"):
            continue  # TE's FP8 metadata, no weights
        k = index.get(name)
        if k is None:
            raise CheckpointError(f"{what} tensor {name} has no counterpart for this config and layout")
        got = pending.setdefault(k, {})
        if name in got:
            raise CheckpointError(f"{what} tensor {name} appears twice")
        got[name] = t
        rule = table[k]
        if len(got) == len(inputs(rule)):
            del pending[k]
            fn = rule.to_megatron if to_megatron else rule.to_native
            yield from zip(outputs(rule), fn(*(got[n] for n in inputs(rule))))
    if pending:
        k, got = next(iter(pending.items()))
        absent = [n for n in inputs(table[k]) if n not in got]
        raise CheckpointError(f"missing {what} tensor {absent[0]} (needed with {next(iter(got))})")


def native_to_megatron(config: ModelConfig, named: Named, layout: Layout = LOCAL) -> Iterator[tuple[str, torch.Tensor]]:
    """Native (name, tensor) pairs -> the megatron GPTModel's full (unsharded) state-dict pairs."""
    return _convert(rules(config, layout), named, True, "native")


def megatron_to_native(config: ModelConfig, named: Named, layout: Layout = LOCAL) -> Iterator[tuple[str, torch.Tensor]]:
    """Megatron GPTModel (name, tensor) pairs (full, unsharded) -> native pairs, experts stacked."""
    return _convert(rules(config, layout), named, False, "megatron")


def hf_to_megatron(config: ModelConfig, named: Named, layout: Layout = LOCAL) -> Iterator[tuple[str, torch.Tensor]]:
    """Hugging Face (name, tensor) pairs -> megatron pairs (through the native names)."""
    return native_to_megatron(config, hf_to_native(config, named), layout)


def megatron_to_hf(config: ModelConfig, named: Named, layout: Layout = LOCAL) -> Iterator[tuple[str, torch.Tensor]]:
    """Megatron pairs -> Hugging Face pairs (through the native names)."""
    return native_to_hf(config, megatron_to_native(config, named, layout))


# ---- tensor-parallel shards ---------------------------------------------------------------------------
_GLU = re.compile(r".*linear_fc1\.weight\d*")
_ROW = re.compile(r".*(linear_fc2\.weight\d*|linear_proj\.weight)")
_COLUMN = ("linear_qkv.weight", "linear_qkv.bias", "linear_q_proj.weight", "linear_q_up_proj.weight",
           "linear_kv_up_proj.weight", "word_embeddings.weight", "output_layer.weight")
# ColumnParallelLinear in the local spec (gathered after), TE's duplicated TELinear otherwise
_DOWN_PROJ = ("linear_q_down_proj.weight", "linear_kv_down_proj.weight")


def _tp_split(name: str, layout: Layout) -> str | None:
    """How tensor parallelism cuts megatron tensor `name`: "glu" (rank r holds [gate_r; up_r]), "row"
    (along dim 1), "column" (along dim 0), or None (replicated: norms, routers, expert bias, output-
    projection biases)."""
    if _GLU.fullmatch(name):
        return "glu"
    if _ROW.fullmatch(name):
        return "row"
    if name.endswith(_COLUMN) or (name.endswith(_DOWN_PROJ) and not layout.te_fused_norms):
        return "column"
    return None


def tp_shard(config: ModelConfig, name: str, t: torch.Tensor, rank: int, size: int,
             layout: Layout = LOCAL) -> torch.Tensor:
    """Rank `rank`'s piece of the full megatron tensor `name` under tensor parallelism of `size`
    (expert tensors split like dense ones: expert-tensor-parallel size = tensor-parallel size)."""
    split = _tp_split(name, layout)
    if size == 1 or split is None:
        return t
    if split == "glu":
        gate, up = t.chunk(2)
        return torch.cat([gate.chunk(size)[rank], up.chunk(size)[rank]])
    if split == "row":
        return t.chunk(size, dim=1)[rank]
    if name.endswith(("linear_qkv.weight", "linear_qkv.bias")) and config.num_key_value_heads % size:
        raise CheckpointError(f"{name}: num_key_value_heads={config.num_key_value_heads} is not divisible by "
                              f"tensor parallel size {size}")
    if t.shape[0] % size:
        raise CheckpointError(f"{name}: {t.shape[0]} rows are not divisible by tensor parallel size {size}")
    return t.chunk(size)[rank]


def is_tp_sharded(name: str, layout: Layout = LOCAL) -> bool:
    return _tp_split(name, layout) is not None


def tp_unshard(name: str, pieces: list[torch.Tensor], layout: Layout = LOCAL) -> torch.Tensor:
    """The full megatron tensor `name` from every rank's piece in rank order: `tp_shard`'s inverse."""
    split = _tp_split(name, layout)
    if split is None:
        return pieces[0]
    if split == "glu":
        halves = [p.chunk(2) for p in pieces]
        return torch.cat([gate for gate, _ in halves] + [up for _, up in halves])
    return torch.cat(pieces, dim=1 if split == "row" else 0)
