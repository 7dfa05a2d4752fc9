"""Model FLOPs of a forward pass, counted from the config: what MFU divides by.

A matrix product of [n, k] by [k, m] is 2 n k m FLOPs (a multiply and an add per term). Per token
that passes through the trunk, the forward multiplies it by every matrix on its path:

    attention, MLA:  H*q_lora + q_lora*nh*(d_nope + d_rope)      (or H*nh*(d_nope + d_rope) without a q LoRA)
                     + H*(kv_lora + d_rope) + kv_lora*nh*(d_nope + d_v) + nh*d_v*H
    attention, GQA:  H*nh*d + 2*H*n_kv*d + nh*d*H
    dense FFN:       3*H*I                                        (gate, up, down)
    MoE FFN:         H*E + (k + n_shared)*3*H*I_moe               (router, k routed + the shared experts)

summed over layers, times 2; the output head adds 2*H*V per token whose logits are computed. The
attention core adds, per query that sees c keys (itself included), 2*nh*c*(d_qk + d_v): scores, then
the weighted sum of values. With causal masking a sequence of L tokens has L(L+1)/2 (query, key)
pairs; a GRPO group reads its shared prompt of P tokens once, so a response of r tokens adds
r*P + r(r+1)/2 pairs to the prompt's P(P+1)/2 (`shared_prefix_pairs`).

A training step's backward costs twice its forward (the gradients of the activations and of the
weights), so forward + backward = 3 x forward; a no-grad pass (the reference logprobs) = 1 x.
Deliberately not counted: norms, rope, softmax, activations and other elementwise work, the
embedding lookup, the zero padding MLA's attention call adds to d_v, and recomputation (the chunked
loss recomputes its logits in the backward): these are model FLOPs, as MFU is defined (PaLM,
Chowdhery et al. 2022), not the FLOPs the hardware ran. Causal attention counts only the pairs a mask
keeps, so this is lower than the 6N + 12*L*H*T rule of thumb, which counts every pair.
"""

from __future__ import annotations

from r1mega.models.config import ModelConfig


def _attention_weights(c: ModelConfig) -> int:
    """Matrix entries of one layer's attention projections a token is multiplied by."""
    h, nh = c.hidden_size, c.num_attention_heads
    if c.is_mla:
        qk = c.qk_nope_head_dim + c.qk_rope_head_dim
        q = h * nh * qk if c.q_lora_rank is None else h * c.q_lora_rank + c.q_lora_rank * nh * qk
        kv = h * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank * nh * (c.qk_nope_head_dim + c.v_head_dim)
        return q + kv + nh * c.v_head_dim * h
    d = c.head_dim
    return h * nh * d + 2 * h * c.num_key_value_heads * d + nh * d * h


def _ffn_weights(c: ModelConfig, layer: int) -> int:
    h = c.hidden_size
    if not c.is_moe_layer(layer):
        return 3 * h * c.intermediate_size
    return h * c.n_routed_experts + (c.num_experts_per_tok + c.n_shared_experts) * 3 * h * c.moe_intermediate_size


def active_weights(c: ModelConfig) -> int:
    """Matrix entries of the trunk (every layer, no head, no embedding) one token is multiplied by."""
    return sum(_attention_weights(c) + _ffn_weights(c, i) for i in range(c.num_hidden_layers))


def forward_flops(c: ModelConfig, *, trunk_tokens: int, head_tokens: int, attention_pairs: int) -> int:
    """FLOPs of one forward: `trunk_tokens` through the layers, logits for `head_tokens`, and
    `attention_pairs` (query, key) pairs summed over the sequences, in every layer and head."""
    linear = 2 * trunk_tokens * active_weights(c) + 2 * head_tokens * c.hidden_size * c.vocab_size
    qk = c.qk_nope_head_dim + c.qk_rope_head_dim if c.is_mla else c.head_dim
    v = c.v_head_dim if c.is_mla else c.head_dim
    return linear + 2 * c.num_hidden_layers * c.num_attention_heads * attention_pairs * (qk + v)


def causal_pairs(length: int) -> int:
    """(query, key) pairs a causal mask keeps in a sequence of `length` tokens."""
    return length * (length + 1) // 2


def shared_prefix_pairs(prompt: int, responses: list[int]) -> int:
    """Pairs of one group: its prompt once, each response over the prompt and its own earlier tokens."""
    return causal_pairs(prompt) + sum(r * prompt + causal_pairs(r) for r in responses)
