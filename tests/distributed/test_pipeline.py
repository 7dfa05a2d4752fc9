"""Pipeline parallel on gloo against one process: the loss and every parameter's gradient after one step
of the tiny DeepSeek-V3 preset equal those of the plain model on the whole batch (fp32, 1e-5), for
1F1B (pp=2, 2 stages), interleaved 1F1B (pp=2, 4 stages, 2 per rank, with activation checkpointing),
and (slow) 1F1B over FSDP2 (pp=2 x dp_shard=2, each data-parallel rank feeding its half of the batch)."""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from helpers import run_world
from r1mega.models import Transformer, preset
from r1mega.parallel import ParallelDims
from r1mega.parallel.pipeline import next_token_loss, pipeline_parallelize, stage_layers


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _pipeline_step(rank, world, dims_kw, cfg):
    dims = ParallelDims(world, **dims_kw)
    dims.build_mesh("cpu")
    torch.manual_seed(0)
    ref = Transformer(preset("tiny_deepseek_v3", vocab_size=64, hidden_size=32, intermediate_size=64,
                             moe_intermediate_size=16, q_lora_rank=16, kv_lora_rank=16))
    for block in ref.layers:  # a non-zero selection bias, so that the stages must carry the router's buffer
        if hasattr(block.ffn, "router"):
            block.ffn.router.expert_bias.normal_(std=0.01)
    ids = torch.randint(64, (8, 13), generator=torch.Generator().manual_seed(1))  # [B, T+1]
    local = ids.chunk(dims.dp_size)[dims.rank("dp")]
    pipe = pipeline_parallelize(copy.deepcopy(ref), dims, cfg)
    loss = pipe.step(local[:, :-1], local[:, 1:])

    ref_loss = next_token_loss(ref(ids[:, :-1]), ids[:, 1:])
    ref_loss.backward()
    if pipe.has_last:
        dist.all_reduce(loss, group=dims.mesh("dp").get_group())
        torch.testing.assert_close(loss / dims.dp_size, ref_loss.detach(), atol=1e-5, rtol=0)
    ref_params = dict(ref.named_parameters())
    mine = pipe.named_parameters()
    for name, p in mine:
        torch.testing.assert_close(_full(p.grad), ref_params[name].grad, atol=1e-5, rtol=0,
                                   msg=lambda m: f"grad {name}: {m}")
    names: list = [None] * world
    dist.all_gather_object(names, [n for n, _ in mine])
    held = {n for rank_names in names for n in rank_names}
    per_stage_rank = [names[r] for r in range(0, world, dims.dp_size)]  # one rank of each pp position
    assert held == set(ref_params) and sum(map(len, per_stage_rank)) == len(ref_params), \
        "the stages do not hold every parameter exactly once"


def test_stage_layers_are_contiguous_and_even():
    assert stage_layers(5, 2) == [range(0, 3), range(3, 5)]
    assert stage_layers(4, 4) == [range(i, i + 1) for i in range(4)]
    with pytest.raises(ValueError, match="at least as many layers"):
        stage_layers(2, 3)


ONE_F_ONE_B = SimpleNamespace(pp_schedule="1f1b", pp_microbatches=2, activation_checkpointing="none")
INTERLEAVED = SimpleNamespace(pp_schedule="interleaved_1f1b", pp_stages_per_rank=2, activation_checkpointing="full")


@pytest.mark.distributed
@pytest.mark.parametrize("cfg", [ONE_F_ONE_B, pytest.param(INTERLEAVED, marks=pytest.mark.slow)],
                         ids=["1f1b", "interleaved"])
def test_pipeline_matches_one_process(cfg):
    run_world(_pipeline_step, 2, {"pp": 2}, cfg)


@pytest.mark.distributed
@pytest.mark.slow
def test_pipeline_over_fsdp_matches_one_process():
    run_world(_pipeline_step, 4, {"pp": 2, "dp_shard": 2}, ONE_F_ONE_B)
