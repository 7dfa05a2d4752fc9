"""Distributed checkpoints reshard (saved at TP=2 or FSDP2xEP2, loaded in one process: equal logits),
and `gathered_state_dict` streams the full weights of a sharded model equal to the plain state dict."""

import copy
from types import SimpleNamespace

import pytest
import torch

from helpers import run_world
from parity import batch, tiny_config
from r1mega.models.transformer import Transformer
from r1mega.parallel import ParallelDims, gathered_state_dict, parallelize
from r1mega.parallel import dist_checkpoint

pytestmark = pytest.mark.distributed


def _save_parallel(rank, world, dims_kw, path):
    dims = ParallelDims(world, **dims_kw)
    dims.build_mesh("cpu")
    torch.manual_seed(0)
    model = parallelize(Transformer(tiny_config("mla_moe")), dims, SimpleNamespace(activation_checkpointing="none"))
    with torch.no_grad():  # weights no fresh model has, so that a load that silently fails is caught
        for p in model.parameters():
            p.add_(0.01)
    dist_checkpoint.save(path, model)
    logits = model(batch(model.config)).detach()
    if rank == 0:
        torch.save(logits, f"{path}.logits.pt")


@pytest.mark.parametrize("dims_kw", [{"tp": 2}, pytest.param({"dp_shard": 2, "ep": 2}, marks=pytest.mark.slow)])
def test_checkpoint_saved_parallel_loads_in_one_process(tmp_path, dims_kw):
    path = str(tmp_path / "ckpt")
    run_world(_save_parallel, 2, dims_kw, path)
    torch.manual_seed(1)
    model = Transformer(tiny_config("mla_moe"))
    dist_checkpoint.load(path, model)
    torch.testing.assert_close(model(batch(model.config)), torch.load(f"{path}.logits.pt"), atol=1e-5, rtol=0)
    assert not (tmp_path / "ckpt.tmp").exists()


def _gather(rank, world, dims_kw, bucket_bytes):
    dims = ParallelDims(world, **dims_kw)
    dims.build_mesh("cpu")
    torch.manual_seed(0)
    ref = Transformer(tiny_config("mla_moe"))
    model = parallelize(copy.deepcopy(ref), dims, SimpleNamespace(activation_checkpointing="full"))
    expected = ref.state_dict()
    got = list(gathered_state_dict(model, bucket_bytes))
    assert [n for n, _ in got] == list(expected)
    for name, tensor in got:
        assert type(tensor) is torch.Tensor, name
        torch.testing.assert_close(tensor, expected[name], atol=0, rtol=0, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("dims_kw", [{"tp": 2, "ep": 2}, {"dp_shard": 2, "ep": 2}])
def test_gathered_state_dict_is_the_full_model(dims_kw):
    run_world(_gather, 2, dims_kw, 4096)
