"""Activation memory of the training forward and backward, per layer type, from the model's shapes.

Every formula counts, per token of a micro-batch, the elements autograd keeps for the backward in
r1mega's own modules (attention.py, moe.py, norm.py, rope.py) on the fused-attention path (SDPA's
flash kernel: it saves q, k, v, the output and the log-sum-exp), in the compute dtype (4-byte
floats: the trainer runs float32), integers at 8 bytes. tp divides the column-parallel widths
(heads, the FFN's inner size); the norms, MLA's low-rank projections and the router stay whole.

Per layer, with H hidden, I the dense FFN's (local) inner size, k experts per token, i the expert
inner size, h local heads, d head dims, r_q / r_kv MLA's ranks, E the routed experts:

    norm (RMSNorm, fp32):        its input, the normalised x and the output: 3H + 1 (the rsqrt)
                                 (the attention norm's input is the previous layer's output: 2H + 1)
    MLA attention, none:         2H+1 + (3 r_q + 1) + (3 r_kv + rope + 1) + 3 h qk + h v' + h + h v
                                 (q, k, v padded to v' = qk for SDPA, its output and lse; the output
                                 cut back to v and copied for wo)
    GQA attention, none:         2H+1 + [qk_norm: 2(h d + kv d) + h + kv] + 2 h d + 2 kv d + h
    dense SwiGLU, none:          3H+1 + 4I            (gate, silu, up, their product)
    MoE, none:                   3H+1 + E + k(2H + 4i) + 4 i_shared + 3k ints + k
                                 (router logits; rows sorted to the experts and their outputs;
                                 per row gate, silu, up, product; the shared expert; row map, indices)
    selective (parallel/checkpointing.py keeps matmul and attention outputs, recomputes the rest):
                                 the outputs of every projection + SDPA's output and lse
    full:                        nothing inside the block

Each layer also keeps its output (the next layer's input): H. The backward of a layer then needs, on
top of what is kept: the gradients in flight, W = 2 max(H, I) for a dense FFN and 2 max(H, i_shared)
for an MoE one (the FFN's backward runs first, while everything is still alive); under "selective"
the recomputed part (none - selective) + W + H; under "full" the whole block again (none) + W. The
peak is everything kept + the largest of these transients (the last layer's backward, or the loss).

The head (last pipeline stage): the final norm (2H + 1), the response rows gathered from it, and
`linear_grpo_loss`, which computes grad_hidden [rows, H] and grad_weight [V, H] during its forward and
keeps them for the backward, with a chunked logits buffer of 2^25 elements (CPU) or 2^26 (CUDA).

Deliberately left out: the masked short-suffix path of shared-prefix attention (SDPA's math kernel
keeps [n, heads, C, P + C] scores; bounded by shared_prefix.MASK_ELEMENTS per block, and only taken
when a group's responses are short), expert load imbalance beyond a factor (`imbalance`), the
stacked expert weights' gradient buffers in an MoE layer's backward (about one or two [E, i, H]
tensors: at 512 tokens of the tiny model they doubled that layer's backward transient; from 2048
tokens on they stay under the activation gradients' peak), and allocator fragmentation.
"""

from __future__ import annotations

from dataclasses import dataclass

from r1mega.models.config import ModelConfig

FLOAT = 4  # bytes of the trainer's float32 activations
INT = 8  # int64 indices
LOSS_BUFFER_ELEMENTS = {"cpu": 1 << 25, "cuda": 1 << 26}  # r1mega/ops/linear_logprob.py's chunk budget


@dataclass
class LayerActivations:
    """Bytes per token of one layer under one checkpointing mode."""

    kept: float  # kept for the backward, the layer's output included
    transient: float  # extra during this layer's backward


def _attention(c: ModelConfig, tp: int) -> tuple[float, float]:
    """(none, selective) elements per token of the attention sublayer (the norm included)."""
    h_ = c.hidden_size
    heads = c.num_attention_heads // tp
    norm = 2 * h_ + 1
    if c.is_mla:
        qk, v = c.qk_head_dim, c.v_head_dim
        v_pad = max(v, qk)
        q_path = 3 * c.q_lora_rank + 1 if c.q_lora_rank else 0
        kv_path = 3 * c.kv_lora_rank + c.qk_rope_head_dim + 1
        sdpa = 3 * heads * qk if v_pad == qk else 2 * heads * qk + heads * v_pad
        sdpa += heads * v_pad + heads  # output, lse
        wo_input = heads * v if v_pad != v else 0  # the output's cut-back copy
        none = norm + q_path + kv_path + sdpa + wo_input
        q_proj = (c.q_lora_rank + heads * qk) if c.q_lora_rank else heads * qk
        selective = q_proj + (c.kv_lora_rank + c.qk_rope_head_dim) + heads * (c.qk_nope_head_dim + v) + h_
        selective += heads * v_pad + heads
        return none, selective
    d, kv = c.head_dim, c.num_key_value_heads // tp
    qk_norm = 2 * (heads * d + kv * d) + heads + kv if c.qk_norm else 0
    none = norm + qk_norm + 2 * heads * d + 2 * kv * d + heads  # rotated q, k; v; output; lse
    selective = heads * d + 2 * kv * d + h_ + heads * d + heads
    return none, selective


def _ffn(c: ModelConfig, layer: int, tp: int, ep: int, imbalance: float) -> tuple[float, float, float]:
    """(none, selective, backward working set W) elements per token of the FFN sublayer (norm included)."""
    h_ = c.hidden_size
    norm = 3 * h_ + 1
    if not c.is_moe_layer(layer):
        inner = c.intermediate_size // tp
        return norm + 4 * inner, 2 * inner + h_, 2 * max(h_, inner)
    k, i = c.num_experts_per_tok, c.moe_intermediate_size
    # rows an expert rank computes per token: k on average (times the load imbalance); when the ep group
    # spans tp, each tp rank takes 1/tp of them; with ep == 1 every tp rank runs all of them
    rows = k * imbalance / (tp if ep > 1 and tp > 1 else 1)
    shared = c.moe_intermediate_size * c.n_shared_experts // tp
    ints = 3 * k * INT / FLOAT  # routing indices, the row map (saved by permute and unpermute)
    none = norm + c.n_routed_experts + rows * (h_ + 4 * i) + k * h_ + 4 * shared + ints + k
    selective = c.n_routed_experts + rows * (2 * i + h_) + (2 * shared + h_ if shared else 0)
    return none, selective, 2 * max(h_, shared)


def layer_activations(c: ModelConfig, layer: int, mode: str, *, tp: int = 1, ep: int = 1,
                      imbalance: float = 1.0) -> LayerActivations:
    """Bytes per token of layer `layer` under checkpointing `mode` ("none", "selective", "full")."""
    attn_none, attn_sel = _attention(c, tp)
    ffn_none, ffn_sel, work = _ffn(c, layer, tp, ep, imbalance)
    none, selective, out = attn_none + ffn_none, attn_sel + ffn_sel, c.hidden_size
    if mode == "none":
        kept, transient = none + out, work
    elif mode == "selective":
        kept, transient = selective + out, none - selective + work + out
    elif mode == "full":
        kept, transient = out, none + work
    else:
        raise ValueError(f"activation_checkpointing={mode!r}: must be none, selective or full")
    return LayerActivations(kept=kept * FLOAT, transient=transient * FLOAT)


@dataclass
class TrainingActivations:
    kept: int  # every layer's kept activations and the head's
    transient: int  # the largest transient (a layer's backward, or the loss's buffers)
    largest_layer: str  # which one sets the transient

    @property
    def peak(self) -> int:
        return self.kept + self.transient


def training_activations(c: ModelConfig, layers: list[int], mode: str, tokens: int, response_rows: int, *,
                         tp: int = 1, ep: int = 1, last_stage: bool = True, device: str = "cuda",
                         imbalance: float = 1.0, in_flight: float = 1.0) -> TrainingActivations:
    """Peak activation bytes of one micro-batch of `tokens` stored tokens whose `response_rows` rows
    (samples x longest response) the loss reads, over this rank's `layers`, their kept activations
    `in_flight` times (a pipeline rank's forwards waiting for their backward, plan/memory.py)."""
    kept, transient, largest = 0.0, 0.0, "none"
    for i in layers:
        a = layer_activations(c, i, mode, tp=tp, ep=ep, imbalance=imbalance)
        kept += a.kept * tokens * in_flight
        if a.transient * tokens > transient:
            transient, largest = a.transient * tokens, f"layer {i} backward"
    if last_stage:
        h_, vocab = c.hidden_size, c.vocab_size
        kept += (2 * h_ + 1) * tokens * FLOAT  # final norm
        kept += response_rows * (2 * h_ * FLOAT + INT)  # gathered rows, grad_hidden, the gather's index
        kept += vocab * h_ * FLOAT  # grad_weight, kept from the loss's forward to its backward
        # [rows, chunk] logits and their softmax; the chunk is the budget / rows, at most the vocabulary
        buffers = 2 * min(LOSS_BUFFER_ELEMENTS.get(device, 1 << 26), response_rows * vocab) * FLOAT
        if buffers > transient:
            transient, largest = buffers, "loss logits buffers"
    return TrainingActivations(kept=int(kept), transient=int(transient), largest_layer=largest)


def inference_activations(c: ModelConfig, tokens: int, *, tp: int = 1, device: str = "cuda") -> int:
    """Peak bytes of a no-grad forward (reference / old logprobs): nothing is kept, a layer's widest
    intermediates live at once (four of the widest per-token tensors), plus the loss-op buffers."""
    widest = max(c.hidden_size, c.intermediate_size // tp, c.num_experts_per_tok * c.moe_intermediate_size,
                 c.num_attention_heads // tp * max(c.qk_head_dim, c.v_head_dim or 0))
    buffer = min(LOSS_BUFFER_ELEMENTS.get(device, 1 << 26), tokens * c.vocab_size)
    return int((4 * widest * tokens + buffer) * FLOAT)
