"""Pipeline parallelism for training: the `Transformer` cut by layers into stages over the pp mesh.

The model is cut into `pp * stages_per_rank` stages: stage s holds a contiguous run of blocks, the
first stage also the embedding, the last the final norm and the output head. A `StageModule` takes
the model's own submodules (no copy) and `PipelinedModel` holds this rank's stages under the parameter
names of the whole model (`embed.weight`, `layers.{i}.…`, `norm.weight`, `lm_head.weight`), so
distributed checkpoints (which then load at another pp, or none), the tensor-parallel plans, the
optimizer and the expert-bias updates see the same names and layer indices as in one process.

What travels: micro-batches are the trainer's packed rows (token_batch.PackedRow: sequences side by
side in one [1, T] row, with their positions and, as layout, the shared-prompt row of
models/shared_prefix.py, or `Segments`). Every pp rank holds the whole batch, so every stage builds the row's attention
context itself from the same arguments (`attn_context`) and only the activations [1, T, H] and their
gradients are sent between stages (pipeline_schedule.py, which also says why the schedules are not
`torch.distributed.pipelining`'s: those fix the activation shape at the first micro-batch).

The last stage ends in the caller's head (`run_micro_batches`): the final-normed hidden states and the
output weight go to the fused `linear_grpo_loss` (training) or `linear_logprob` (old and reference
logprobs, forward only, no backward), so no stage ever holds [T, V] logits; the heads' results
(statistics, per-token logprobs) are broadcast from the last stage to every rank of the pipeline, and
`expert_load_stats` gathers the MoE loads from the stages that own them.

Tied input/output embeddings (Qwen2-style): the last stage holds its own copy of the embedding as its
output matrix; after the backward the two copies' gradients are summed between the first and the last
stage (Megatron's embedding group), so both take the same optimizer step and stay equal. Weight export
(`engine_weights`) streams every stage's full tensors, bucket by bucket, to every rank of the pipeline,
the tied copy once.

Schedules (`cfg.pp_schedule`): "1f1b", one stage per rank; "interleaved_1f1b",
`cfg.pp_stages_per_rank` (>= 2) stages per rank in loop order (pp rank r holds stages r, r + pp, ...).
Each stage is then `parallelize`d (TP -> EP -> checkpointing -> compile -> FSDP) on the other mesh
dimensions.

Deliberately left out: zero-bubble and looped-BFS schedules, uneven layer costs (the embedding and the
head count as no layers), and sending the attention layout instead of rebuilding it on each stage.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn

from r1mega.models import balance
from r1mega.models.transformer import attn_context
from r1mega.parallel import pipeline_schedule
from r1mega.parallel.dims import ParallelDims
from r1mega.parallel.grad_clip import clip_grad_norm
from r1mega.parallel.native_policy import NativePolicy
from r1mega.parallel.parallelize import parallelize
from r1mega.parallel.weight_gather import gathered_state_dict

SCHEDULES = ("1f1b", "interleaved_1f1b")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class StageModule(nn.Module):
    """Blocks `layers` of `model` (a range of global indices); the embedding if `first`, the final norm
    and the output head if `last` (with tied embeddings, a copy of the embedding as the output matrix).
    forward(x, input_ids, **row): input ids [B, T] (first) or hidden [B, T, H] -> hidden [B, T, H],
    final-normed on the last stage; `input_ids` and `row` (layout, position_ids, routing) describe
    the row, as Transformer.forward's arguments do."""

    def __init__(self, model: nn.Module, layers: range, first: bool, last: bool):
        super().__init__()
        self.config, self.first = model.config, first
        tied_copy = last and not first and model.lm_head is None
        self.embed = model.embed if first else copy.deepcopy(model.embed) if tied_copy else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layers})
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last else None

    @property
    def output_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor, **row) -> torch.Tensor:
        h = self.embed(x) if self.first else x  # [B, T, H]
        ctx = attn_context(self.config, input_ids, h.dtype, **row)
        for block in self.layers.values():
            h = block(h, ctx)
        return h if self.norm is None else self.norm(h)


def stage_layers(n_layers: int, n_stages: int) -> list[range]:
    """Contiguous layer ranges, as even as possible; the earlier stages take the remainder."""
    if n_stages > n_layers:
        raise ValueError(f"parallel.pp: {n_stages} pipeline stages need at least as many layers, the model has "
                         f"{n_layers} (a stage without layers)")
    base, extra = divmod(n_layers, n_stages)
    bounds = [0]
    for s in range(n_stages):
        bounds.append(bounds[-1] + base + (s < extra))
    return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def schedule_settings(cfg, pp: int) -> tuple[str, int]:
    """(schedule, stages per rank) from `cfg` (pp_schedule, pp_stages_per_rank), checked."""
    schedule = getattr(cfg, "pp_schedule", "1f1b")
    if schedule not in SCHEDULES:
        raise ValueError(f"parallel.pp_schedule={schedule!r}: must be one of {SCHEDULES}")
    per_rank = getattr(cfg, "pp_stages_per_rank", 1 if schedule == "1f1b" else 2)
    if (schedule == "1f1b") != (per_rank == 1):
        raise ValueError(f"parallel.pp_schedule={schedule!r} with parallel.pp_stages_per_rank={per_rank}: 1f1b runs "
                         "one stage per rank, interleaved_1f1b two or more")
    return schedule, per_rank


def rank_stage_ids(pp: int, per_rank: int, pp_rank: int) -> list[int]:
    return [pp_rank + k * pp for k in range(per_rank)]  # loop order


def cut_stages(model: nn.Module, n_stages: int, ids: list[int]) -> dict[int, StageModule]:
    """The stages `ids` of `model` cut into `n_stages`."""
    ranges = stage_layers(len(model.layers), n_stages)
    return {s: StageModule(model, ranges[s], s == 0, s == n_stages - 1) for s in ids}


class PipelinedModel(NativePolicy, nn.Module):
    """This rank's stages, under the whole model's parameter names (module docstring); a trainer's
    Policy, whose weight export and load metrics reach over every stage."""

    def __init__(self, model: nn.Module, stages: dict[int, StageModule], n_stages: int, per_rank: int,
                 peers: pipeline_schedule.Peers, tied_group, activation_dtype: torch.dtype):
        super().__init__()
        self.config = model.config
        first, last = stages.get(0), stages.get(n_stages - 1)
        self.embed = first.embed if first is not None else last.embed if last is not None else None
        self.layers = nn.ModuleDict({k: block for s in sorted(stages) for k, block in stages[s].layers.items()})
        self.norm = last.norm if last is not None else None
        self.lm_head = last.lm_head if last is not None else None
        self.stages = stages  # a plain dict, not submodules: their parameters are registered above
        self.n_stages, self.per_rank, self.peers = n_stages, per_rank, peers
        self.tied_group, self.activation_dtype = tied_group, activation_dtype
        self.has_first, self.has_last = first is not None, last is not None

    @property
    def _tied_copy(self) -> list[torch.Tensor]:
        """The last stage's copy of tied embeddings (another rank holds the original)."""
        return [self.embed.weight] if self.tied_group is not None and not self.has_first else []

    @property
    def _last_rank(self) -> int:
        return dist.get_global_rank(self.peers.group, (self.n_stages - 1) % self.peers.pp)

    def run_micro_batches(self, inputs: list[tuple[torch.Tensor, dict]], heads: list, *, backward: bool) -> list:
        """Every micro-batch ((input_ids [1, T], row kwargs)) through the pipeline, ending in its head
        (hidden [1, T, H] final-normed, output weight [V, H]) -> (loss or None, result); with `backward`,
        the losses' backward, and tied embeddings' gradients summed. Every pp rank calls it with the same
        micro-batches; each gets the heads' results."""
        results = pipeline_schedule.run(self.stages, self.n_stages, self.peers, inputs, heads, self.config.hidden_size,
                                        self.activation_dtype, backward=backward, per_rank=self.per_rank)
        if backward and self.tied_group is not None and (self.has_first or self.has_last):
            grad = self.embed.weight.grad
            local = grad.to_local() if hasattr(grad, "to_local") else grad
            dist.all_reduce(local, group=self.tied_group)
        box = [results]
        dist.broadcast_object_list(box, src=self._last_rank, group=self.peers.group)
        return box[0]

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """The whole model's gradient norm (the stages' squares summed over pp, a tied embedding counted
        once), clipped to `max_norm`."""
        return clip_grad_norm(self.parameters(), max_norm, uncounted=self._tied_copy, group=self.peers.group)

    def expert_load_stats(self) -> dict[str, float]:
        """balance.expert_load_stats over every stage's MoE layers, in layer order, on every pp rank."""
        own = [(name, None if load is None else load.cpu())
               for name, load in ((name, moe.pending_load()) for name, moe in balance.moe_layers(self))]
        parts: list = [None] * self.peers.pp
        dist.all_gather_object(parts, own, group=self.peers.group)
        loads = sorted((item for part in parts for item in part), key=lambda item: int(item[0].split(".")[1]))
        return balance.load_stats(loads)

    @torch.no_grad()
    def engine_weights(self, bucket_bytes: int = 256 << 20):
        """(name, full tensor) of the whole model on every rank of the pipeline: stage by stage, each
        stage's ranks gather their tensors a bucket at a time (weight_gather.py) and broadcast them over
        pp; a tied embedding's copy is left out. Every rank must run the iterator to the end."""
        skip = {"embed.weight"} if self._tied_copy else set()
        device = next(self.parameters()).device
        for source in range(self.peers.pp):
            src = dist.get_global_rank(self.peers.group, source)
            mine = source == self.peers.rank
            box = [[(n, t.shape, t.dtype) for n, t in self.state_dict().items() if n not in skip] if mine else None]
            dist.broadcast_object_list(box, src=src, group=self.peers.group)  # what the others receive
            if mine:
                for name, tensor in gathered_state_dict(self, bucket_bytes):
                    if name not in skip:
                        tensor = tensor.to(device).contiguous()
                        dist.broadcast(tensor, src=src, group=self.peers.group)
                        yield name, tensor
                continue
            for name, shape, dtype in box[0]:
                tensor = torch.empty(shape, dtype=dtype, device=device)
                dist.broadcast(tensor, src=src, group=self.peers.group)
                yield name, tensor


def _tied_group(dims: ParallelDims):
    """The groups of the first and the last pp rank with the same other coordinates (collective: every
    rank creates every group); this rank's, or None when it holds neither end."""
    columns = dims.world_mesh.mesh.reshape(dims.pp, -1)
    mine = None
    for j in range(columns.shape[1]):
        ranks = [int(columns[0, j]), int(columns[-1, j])]
        group = dist.new_group(ranks)
        if dist.get_rank() in ranks:
            mine = group
    return mine


def pipeline_parallelize(model: nn.Module, dims: ParallelDims, cfg) -> PipelinedModel:
    """Cuts `model` into stages, keeps this pp rank's and parallelizes each on the other mesh dimensions.
    `model` must not be used afterwards: the stages own its modules."""
    if dims.pp < 2:
        raise ValueError("pipeline_parallelize needs pp >= 2; use parallelize for pp == 1")
    _, per_rank = schedule_settings(cfg, dims.pp)
    n_stages = dims.pp * per_rank
    stages = cut_stages(model, n_stages, rank_stage_ids(dims.pp, per_rank, dims.rank("pp")))
    tied = _tied_group(dims) if model.lm_head is None else None
    for stage in stages.values():
        parallelize(stage, dims, cfg)
    dtype = _DTYPES[getattr(cfg, "param_dtype", "float32")]
    return PipelinedModel(model, stages, n_stages, per_rank, pipeline_schedule.Peers.of(dims.mesh("pp").get_group()),
                          tied, dtype)
