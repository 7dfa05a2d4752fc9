"""One training step of a parallelized tiny model against the same step in one process.

`check_step` runs on every rank: it builds the model twice from one seed (a plain reference and a
copy it parallelizes), feeds the reference the whole batch and the parallel copy its data-parallel
share, and checks that the loss, every parameter's gradient, the gradient norm and the gradients
clipped by r1mega.parallel.grad_clip (against torch.nn.utils.clip_grad_norm_ in one process), and
every parameter after one SGD step agree within `tol` (fp32). Gradients of sharded parameters are
compared as full tensors. With `replay`, both route to a routing record drawn at random (routing
replay; a few tokens unrecorded, routing themselves), each rank's share of it with its share of the batch.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from r1mega.models.config import ModelConfig, tiny_deepseek_v3
from r1mega.models.routing import NO_RECORD, Routing
from r1mega.models.transformer import Transformer
from r1mega.parallel import ParallelDims, parallelize
from r1mega.parallel.grad_clip import clip_grad_norm

VOCAB = 64


def tiny_config(kind: str) -> ModelConfig:
    if kind == "mla_moe":  # DeepSeek-V3 shape: MLA, one dense layer then MoE with a shared expert
        return tiny_deepseek_v3(VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                num_attention_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                                qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4, moe_intermediate_size=16,
                                n_group=2, topk_group=2, num_experts_per_tok=2, routed_scaling_factor=2.0)
    if kind == "gqa":  # Qwen2 shape: GQA with q/k/v biases, dense, tied embedding
        return ModelConfig(architecture="Qwen2ForCausalLM", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                           tie_word_embeddings=True)
    raise ValueError(kind)


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def batch(cfg: ModelConfig, rows: int = 4, length: int = 12) -> torch.Tensor:
    return torch.randint(cfg.vocab_size, (rows, length + 1), generator=torch.Generator().manual_seed(1))


def loss_of(model, ids: torch.Tensor, record: torch.Tensor | None = None) -> torch.Tensor:
    """record [B, T, L, k]: the experts each MoE layer is made to use, replayed."""
    routing = None if record is None else Routing(replay=record.flatten(0, 1))
    logits = model(ids[:, :-1], routing=routing)  # [B, T, V]
    return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())


def random_record(cfg: ModelConfig, ids: torch.Tensor) -> torch.Tensor:
    """[B, T, L, k]: distinct experts at random for every input token and MoE layer; every fifth token unrecorded."""
    moe_layers = sum(map(cfg.is_moe_layer, range(cfg.num_hidden_layers)))
    b, t = ids[:, :-1].shape
    scores = torch.rand(b, t, moe_layers, cfg.n_routed_experts, generator=torch.Generator().manual_seed(2))
    record = scores.argsort(-1)[..., :cfg.num_experts_per_tok]
    record.view(b * t, moe_layers, -1)[::5] = NO_RECORD
    return record


def check_step(rank: int, world: int, kind: str, dims_kw: dict, ac: str = "none", tol: float = 1e-5,
               first_half_only: bool = False, replay: bool = False) -> None:
    """`first_half_only`: the selection bias routes every token to the first half of the experts, so
    that under ep=2 the second rank's experts receive no rows. `replay`: routing replay (module docstring)."""
    dims = ParallelDims(world, **dims_kw)
    dims.build_mesh("cpu")
    cfg = tiny_config(kind)
    torch.manual_seed(0)
    ref = Transformer(cfg)
    if cfg.n_routed_experts:  # a non-zero selection bias, so that the parallel path must carry it
        for block in ref.layers:
            if hasattr(block.ffn, "router"):
                block.ffn.router.expert_bias.normal_(std=0.01)
                if first_half_only:
                    block.ffn.router.expert_bias[cfg.n_routed_experts // 2:] -= 100.0
    model = copy.deepcopy(ref)
    parallelize(model, dims, SimpleNamespace(activation_checkpointing=ac))

    ids = batch(cfg)
    record = random_record(cfg, ids) if replay else None
    share = dims.rank("dp")
    local = ids.chunk(dims.dp_size)[share]
    loss = loss_of(model, local, None if record is None else record.chunk(dims.dp_size)[share])
    loss.backward()
    ref_loss = loss_of(ref, ids, record)
    ref_loss.backward()
    if replay:  # the record is used: the logits move by far more than fp32 noise (measured: 3e-2)
        with torch.no_grad():
            moved = ref(ids[:, :-1]) - ref(ids[:, :-1], routing=Routing(replay=record.flatten(0, 1)))
        assert float(moved.abs().max()) > 1e-3, "the replayed record should change the logits"

    mean = loss.detach().clone()
    dist.all_reduce(mean, group=dims.mesh("dp").get_group())
    torch.testing.assert_close(mean / dims.dp_size, ref_loss.detach(), atol=tol, rtol=0)
    names = [n for n, _ in model.named_parameters()]
    assert names == [n for n, _ in ref.named_parameters()], "parallelize renamed parameters"
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(full(p.grad), q.grad, atol=tol, rtol=0, msg=lambda m: f"grad {name}: {m}")

    max_norm = 0.5 * float(torch.nn.utils.get_total_norm([q.grad for q in ref.parameters()]))  # clipping acts
    norm = clip_grad_norm(model.parameters(), max_norm)
    torch.testing.assert_close(norm, torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm), atol=tol, rtol=0)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(full(p.grad), q.grad, atol=tol, rtol=0, msg=lambda m: f"clipped grad {name}: {m}")

    for m in (model, ref):
        torch.optim.SGD(m.parameters(), lr=0.5).step()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(full(p.detach()), q.detach(), atol=tol, rtol=0, msg=lambda m: f"param {name}: {m}")
