"""Log-probabilities and the GRPO loss of a megatron-core GPTModel without its [B, T, V] logits.

The model runs embedding + decoder (final norm included) and stops before `output_layer`; the
hidden states [B, T, H] and this rank's vocabulary shard of the output matrix go to r1mega's fused
ops (`linear_logprob`, `linear_grpo_loss`), vocabulary-parallel over megatron's tensor-parallel group
exactly as megatron's own output layer shards the vocabulary (`parallel_output=True`).

`hidden_states` drives GPTModel's `_preprocess` (embedding, rotary tables) and `decoder` itself: that
is the whole of `GPTModel.forward` up to `_postprocess` when there is no multi-token prediction and
no inference context, and megatron-core 0.16 offers no public switch to skip the output layer.

Deliberately left out: packed sequences (`packed_seq_params`), pipeline stages, MTP heads.
"""

from __future__ import annotations

import torch

from r1mega.ops.linear_grpo_loss import linear_grpo_loss
from r1mega.ops.linear_logprob import linear_logprob


def tensor_parallel_group():
    from megatron.core import parallel_state

    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return None
    return parallel_state.get_tensor_model_parallel_group()


def output_weight(model) -> torch.Tensor:
    """This rank's [V / TP, H] shard of the output matrix (the embedding when tied)."""
    if model.share_embeddings_and_output_weights:
        return model.shared_embedding_or_output_weight()
    return model.output_layer.weight


def hidden_states(model, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """input_ids [B, T] -> final-normed hidden states [B, T, H] (causal attention, positions 0..T-1)."""
    if model.mtp_process:
        raise NotImplementedError("megatron backend: multi-token-prediction heads are not supported")
    if position_ids is None:
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    decoder_input, rotary_pos_emb, rotary_pos_cos, rotary_pos_sin, sequence_len_offset = model._preprocess(
        input_ids=input_ids, position_ids=position_ids)[:5]
    h = model.decoder(hidden_states=decoder_input, attention_mask=None, rotary_pos_emb=rotary_pos_emb,
                      rotary_pos_cos=rotary_pos_cos, rotary_pos_sin=rotary_pos_sin,
                      sequence_len_offset=sequence_len_offset)  # [T(/TP under sequence parallel), B, H]
    if model.config.sequence_parallel:
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        h = gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=False)
    return h.transpose(0, 1)


def logprobs(model, input_ids: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
             chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probability of targets [B, T], entropy [B, T]) in fp32, differentiable."""
    h = hidden_states(model, input_ids)
    logp, entropy = linear_logprob(h.reshape(-1, h.shape[-1]), output_weight(model), targets.reshape(-1),
                                   temperature=temperature, chunk_size=chunk_size,
                                   process_group=tensor_parallel_group())
    return logp.view(targets.shape), entropy.view(targets.shape)


def grpo_loss(model, input_ids: torch.Tensor, targets: torch.Tensor, old_logp: torch.Tensor,
              ref_logp: torch.Tensor | None, advantages: torch.Tensor, mask: torch.Tensor, **loss_kw):
    """`r1mega.ops.linear_grpo_loss` on the megatron model: (loss, stats). `loss_kw`: temperature,
    clip_low, clip_high, beta, agg, max_len, chunk_size as that op takes them."""
    return linear_grpo_loss(hidden_states(model, input_ids), output_weight(model), targets, old_logp, ref_logp,
                            advantages, mask, process_group=tensor_parallel_group(), **loss_kw)
