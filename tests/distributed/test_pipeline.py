"""Pipeline parallel on gloo against one process: the loss and every parameter's gradient after one step
equal those of the plain model on the whole batch (fp32, 1e-5), for 1F1B at pp=2 on packed rows of the
tiny DeepSeek-V3 (segment ids travelling with the micro-batch), and, marked slow (over 20 s each on a
shared 2-core machine): the tied Qwen2-style model (embedding gradients summed between the first and
last stage), interleaved 1F1B (pp=2, 4 stages, 2 per rank, with activation checkpointing), and 1F1B
over FSDP2 and over tensor parallel (pp=2 x dp_shard=2, pp=2 x tp=2). Each also checks the weight
export (every rank gets the whole model) and the clipped norm. Also: the orders of both schedules, and
(slow) SFT (`train_sft`) on a pipeline, step by step equal to one process."""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from helpers import run_world
from r1mega.models import Transformer, preset
from r1mega.models.attention import Segments
from r1mega.parallel import ParallelDims
from r1mega.parallel.pipeline import pipeline_parallelize, stage_layers
from r1mega.parallel.pipeline_schedule import most_in_flight, rank_orders
from r1mega.trainers.sft import train_sft

VOCAB = 64


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _model(kind: str) -> Transformer:
    torch.manual_seed(0)
    if kind == "tied":
        return Transformer(preset("tiny_qwen2", vocab_size=VOCAB, hidden_size=32, intermediate_size=64))
    model = Transformer(preset("tiny_deepseek_v3", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                               moe_intermediate_size=16, q_lora_rank=16, kv_lora_rank=16))
    for block in model.layers:  # a non-zero selection bias, so that the stages must carry the router's buffer
        if hasattr(block.ffn, "router"):
            block.ffn.router.expert_bias.normal_(std=0.01)
    return model


def _segments(rows: int, length: int) -> torch.Tensor:
    """Segment ids [rows, length]: each row packs sequences of lengths 5, 4, then the rest."""
    seg = torch.zeros(rows, length, dtype=torch.long)
    seg[:, 5:9], seg[:, 9:] = 1, 2
    return seg


def _reference_loss(model, ids, packed: bool) -> torch.Tensor:
    """Mean next-token cross-entropy of the plain model over the whole batch (micro-batches of 2 rows)."""
    kw = {"layout": Segments(_segments(*ids[:, :-1].shape))} if packed else {}
    logits = model(ids[:, :-1], **kw)
    return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())


def _pipeline_step(rank, world, dims_kw, cfg, kind, packed):
    dims = ParallelDims(world, **dims_kw)
    dims.build_mesh("cpu")
    ref = _model(kind)
    ids = torch.randint(VOCAB, (8, 13), generator=torch.Generator().manual_seed(1))  # [B, T+1]
    local = ids.chunk(dims.dp_size)[dims.rank("dp")]
    pipe = pipeline_parallelize(copy.deepcopy(ref), dims, cfg)
    micro = local.split(2)  # micro-batches of 2 rows; the loss is the mean over all of them
    inputs = [(m[:, :-1], {"layout": Segments(_segments(*m[:, :-1].shape))} if packed else {}) for m in micro]

    def head(targets):
        def apply(hidden, weight):
            loss = F.cross_entropy(F.linear(hidden, weight).flatten(0, 1), targets.flatten()) / len(micro)
            return loss, loss.item()
        return apply

    losses = pipe.run_micro_batches(inputs, [head(m[:, 1:]) for m in micro], backward=True)
    ref_loss = _reference_loss(ref, ids, packed)
    ref_loss.backward()
    total = torch.tensor(sum(losses))
    dist.all_reduce(total, group=dims.mesh("dp").get_group())
    torch.testing.assert_close(total / dims.dp_size, ref_loss.detach(), atol=1e-5, rtol=0)
    ref_params = dict(ref.named_parameters())
    for name, p in pipe.named_parameters():
        # FSDP averages over dp ranks, each of whose losses is a mean over its half of the batch
        torch.testing.assert_close(_full(p.grad), ref_params[name].grad, atol=1e-5, rtol=0,
                                   msg=lambda m: f"grad {name}: {m}")
    names: list = [None] * world
    dist.all_gather_object(names, [n for n, _ in pipe.named_parameters()])
    held = {n for rank_names in names for n in rank_names}
    assert held == set(ref_params), "the stages do not hold every parameter"
    norm = pipe.clip_grad_norm(1e9)
    torch.testing.assert_close(norm, torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()]),
                               atol=1e-5, rtol=0)
    streamed = list(pipe.engine_weights(bucket_bytes=4096))
    exported = dict(streamed)
    assert len(streamed) == len(exported) and set(exported) == set(ref.state_dict()), \
        "the export should hold every tensor of the model once"
    for name, tensor in ref.state_dict().items():
        torch.testing.assert_close(exported[name], tensor, atol=0, rtol=0, msg=lambda m: f"export {name}: {m}")


def test_stage_layers_are_contiguous_and_even():
    assert stage_layers(5, 2) == [range(0, 3), range(3, 5)]
    assert stage_layers(4, 4) == [range(i, i + 1) for i in range(4)]
    with pytest.raises(ValueError, match="parallel.pp.*a stage without layers"):
        stage_layers(2, 3)


def test_schedule_orders():
    # 1F1B at pp=2, 3 micro-batches: rank 0 warms up with one forward more, rank 1 alternates
    assert rank_orders(2, 1, 3) == [
        [("F", 0, 0), ("F", 0, 1), ("B", 0, 0), ("F", 0, 2), ("B", 0, 1), ("B", 0, 2)],
        [("F", 1, 0), ("B", 1, 0), ("F", 1, 1), ("B", 1, 1), ("F", 1, 2), ("B", 1, 2)]]
    for pp, per_rank, n in [(2, 2, 3), (4, 2, 5), (3, 3, 7), (4, 1, 2)]:
        orders = rank_orders(pp, per_rank, n)
        for r, order in enumerate(orders):
            stages = {s for _, s, _ in order}
            assert stages == {r + k * pp for k in range(per_rank)}
            for s in stages:  # each stage: every forward, then backwards in micro-batch order
                assert [m for kind, t, m in order if kind == "B" and t == s] == list(range(n))
                assert sorted(m for kind, t, m in order if kind == "F" and t == s) == list(range(n))


def test_activations_held_in_flight():
    # 1F1B (Narayanan et al. 2021): rank r warms up with pp - r - 1 forwards, then holds one more until its
    # first backward, so pp - r micro-batches' activations at once, or every micro-batch when there are fewer
    for pp in (2, 3, 4):
        for n in (1, 2, 3, 8):
            assert [most_in_flight(pp, 1, n, r) for r in range(pp)] == [min(pp - r, n) for r in range(pp)]
    # interleaved, pp=2 x 2 stages, 4 micro-batches: rank 0 runs F(s0: m0, m1) F(s2: m0, m1) F(s0: m2) before
    # its first backward, the last rank one forward fewer (Megatron's warm-up 2 (pp - r - 1) + (v - 1) pp)
    assert [most_in_flight(2, 2, 4, r) for r in range(2)] == [5, 3]


ONE_F_ONE_B = SimpleNamespace(pp_schedule="1f1b", activation_checkpointing="none")
INTERLEAVED = SimpleNamespace(pp_schedule="interleaved_1f1b", pp_stages_per_rank=2, activation_checkpointing="full")


@pytest.mark.distributed
@pytest.mark.parametrize("cfg,kind,packed", [(ONE_F_ONE_B, "mla_moe", True),
                                             pytest.param(ONE_F_ONE_B, "tied", False, marks=pytest.mark.slow),
                                             pytest.param(INTERLEAVED, "mla_moe", False, marks=pytest.mark.slow)],
                         ids=["1f1b_packed", "1f1b_tied", "interleaved"])
def test_pipeline_matches_one_process(cfg, kind, packed):
    run_world(_pipeline_step, 2, {"pp": 2}, cfg, kind, packed)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("dims_kw,kind", [({"pp": 2, "dp_shard": 2}, "mla_moe"), ({"pp": 2, "tp": 2}, "tied")],
                         ids=["fsdp2", "tp2_tied"])
def test_pipeline_over_other_dims_matches_one_process(dims_kw, kind):
    run_world(_pipeline_step, 4, dims_kw, ONE_F_ONE_B, kind, True)


def _sft_steps(rank, world, kind):
    """train_sft on a pp=2 pipeline against train_sft on the plain model: every step's loss and the
    weights after 3 steps (several packed micro-batches a step: a token budget of 24)."""
    dims = ParallelDims(world, pp=2)
    dims.build_mesh("cpu")
    ref = _model(kind)
    pipe = pipeline_parallelize(copy.deepcopy(ref), dims, ONE_F_ONE_B)
    gen = torch.Generator().manual_seed(2)
    lengths = torch.randint(3, 9, (12,), generator=gen).tolist()
    examples = [(torch.randint(VOCAB, (n,), generator=gen).tolist(), torch.randint(VOCAB, (6,), generator=gen).tolist())
                for n in lengths]
    kw = dict(steps=3, batch_size=6, lr=1e-2, token_budget=24, seed=0, warmup_steps=1)
    torch.testing.assert_close(train_sft(pipe, examples, **kw), train_sft(ref, examples, **kw), atol=1e-5, rtol=0)
    exported = dict(pipe.engine_weights())
    for name, tensor in ref.state_dict().items():
        torch.testing.assert_close(exported[name], tensor, atol=1e-5, rtol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mla_moe", "tied"])
def test_sft_pipeline_matches_one_process(kind):
    run_world(_sft_steps, 2, kind)
