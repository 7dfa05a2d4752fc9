"""Per-rank parameter, gradient and optimizer bytes, read from the shards the real `parallelize` makes.

The model is built on the meta device (no storage, no init cost) and handed to the same
`r1mega.parallel.parallelize` the trainer calls, under a fake process group of the layout's world size
(torch's "fake" backend: every collective returns at once, no processes, no GPU), with this process
pretending to be one rank. The resulting DTensors carry each rank's local shard shape, and their meta
storages the bytes FSDP2 really allocates (its shards are padded to equal chunks over the FSDP group).

- parameters: the distinct storages behind the local shards (the padded FSDP chunks; a plain tensor
  where nothing shards it);
- gradients: as many bytes as the parameter storages (FSDP2 reduce-scatters into padded chunks of the
  same size and dtype; without FSDP a gradient is a plain tensor of the parameter's shape);
- optimizer: AdamW's `exp_avg` and `exp_avg_sq` are `zeros_like` the local shard (unpadded), in the
  parameter's dtype, on the device; its `step` is one float32 scalar per parameter, on the host unless
  AdamW runs `capturable` or `fused` (the trainer runs neither), so it is reported separately.
- FSDP units: the bytes each unit gathers for its forward and backward (the local shard times the FSDP
  degree: what remains split over tp and ep), to size the all-gather buffers.

Pipeline parallelism (pp > 1) cuts the model with `r1mega.parallel.pipeline`'s own `StageModule` and
`stage_layers` and parallelizes this rank's stages, as `pipeline_parallelize` does (the schedule is
not built: it holds no parameters).

Deliberately left out: running with a real process group initialised in the same process (the fake
one would replace it; `shard_bytes` refuses), and float8 or any other parameter dtype than the
trainer's float32 (param_dtype comes from the config it is given).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from r1mega.models.config import ModelConfig
from r1mega.models.transformer import Transformer
from r1mega.parallel.dims import ParallelDims

# Mesh dimension names FSDP shards over (the rest, tp and ep, stay split when a unit is gathered).
FSDP_DIMS = {"fsdp", "efsdp", "dp_replicate"}
ADAM_STEP_BYTES = 4  # torch.optim.AdamW keeps `step` as a float32 scalar tensor per parameter


@dataclass
class RankShards:
    """What one rank holds of a parallelized model (bytes unless named otherwise)."""

    rank: int
    coords: dict[str, int]  # this rank's coordinate on each mesh dimension
    params: int  # distinct storages behind the local shards (FSDP's padded chunks)
    params_numel: int  # elements of the local shards (unpadded)
    grads: int
    optimizer: int  # exp_avg + exp_avg_sq on the device
    optimizer_host: int  # AdamW's `step` scalars (host memory)
    units: dict[str, int] = field(default_factory=dict)  # FSDP unit -> bytes it gathers on this rank
    layers: list[int] = field(default_factory=list)  # the global layer indices this rank holds
    first_stage: bool = True  # holds the embedding
    last_stage: bool = True  # holds the final norm and output head

    def profile(self) -> tuple:
        """What two ranks must share to be the same rank type."""
        return (self.params, self.grads, self.optimizer, tuple(sorted(self.units.values())), tuple(self.layers),
                self.first_stage, self.last_stage)


@contextlib.contextmanager
def fake_world(world: int, rank: int) -> Iterator[None]:
    """A fake default process group of `world` ranks in which this process is `rank`."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("r1mega.plan: a process group is already initialised; plan in a process of its own")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def meta_model(config: ModelConfig, dtype: torch.dtype = torch.float32) -> Transformer:
    with torch.device("meta"):
        return Transformer(config).to(dtype)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _gathered_bytes(p: torch.Tensor) -> int:
    """Bytes of `p` once FSDP has gathered it on this rank: split over tp/ep only."""
    if not isinstance(p, DTensor):
        return p.numel() * p.element_size()
    names = p.device_mesh.mesh_dim_names or ()
    split = 1
    for i, placement in enumerate(p.placements):
        if placement.is_shard() and names[i] not in FSDP_DIMS:
            split *= p.device_mesh.size(i)
    return p.numel() * p.element_size() // split


def read_shards(modules: list[nn.Module], rank: int, coords: dict[str, int]) -> RankShards:
    """Sums what the parallelized `modules` (one model, or this rank's pipeline stages) hold."""
    storages: dict[int, int] = {}
    numel = optimizer = n_params = 0
    units: dict[str, int] = {}
    for module in modules:
        for name, p in module.named_parameters():
            local = _local(p)
            # keyed by the storage itself (meta storages have no address): views of one storage count once
            storage = local.untyped_storage()
            storages[storage._cdata] = storage.nbytes()
            numel += local.numel()
            optimizer += 2 * local.numel() * local.element_size()
            n_params += 1
        for unit_name, unit in module.named_modules():
            if isinstance(unit, FSDPModule):
                own = [p for p in unit.parameters() if not _owned_by_child_unit(unit, p)]
                units[unit_name or "root"] = sum(_gathered_bytes(p) for p in own)
    params = sum(storages.values())
    return RankShards(rank=rank, coords=coords, params=params, params_numel=numel, grads=params, optimizer=optimizer,
                      optimizer_host=ADAM_STEP_BYTES * n_params, units=units)


def _owned_by_child_unit(unit: nn.Module, p: torch.Tensor) -> bool:
    for child in unit.modules():
        if child is not unit and isinstance(child, FSDPModule) and any(q is p for q in child.parameters()):
            return True
    return False


def rank_coords(dims: ParallelDims) -> dict[str, int]:
    return {name: dims.world_mesh.get_coordinate()[i] for i, name in enumerate(dims.world_mesh.mesh_dim_names)}


def _parallel_cfg(parallel) -> SimpleNamespace:
    """The fields parallelize reads (compile is irrelevant to memory and skipped on meta)."""
    return SimpleNamespace(activation_checkpointing=getattr(parallel, "activation_checkpointing", "none"),
                           param_dtype=getattr(parallel, "param_dtype", "float32"),
                           reduce_dtype=getattr(parallel, "reduce_dtype", "float32"))


def shard_bytes(config: ModelConfig, parallel, world: int, rank: int, *,
                dtype: torch.dtype = torch.float32) -> RankShards:
    """Rank `rank`'s shards of `config` parallelized by `parallel` (an r1mega.config.ParallelConfig or
    anything with its fields, plus optionally pp_schedule / pp_stages_per_rank) over `world` ranks."""
    from r1mega.parallel.parallelize import parallelize
    from r1mega.parallel.pipeline import cut_stages, rank_stage_ids, schedule_settings

    with fake_world(world, rank):
        dims = ParallelDims.from_config(parallel, world)
        dims.build_mesh("cpu")
        coords = rank_coords(dims)
        model = meta_model(config, dtype)
        cfg = _parallel_cfg(parallel)
        if dims.pp == 1:
            parallelize(model, dims, cfg)
            shards = read_shards([model], rank, coords)
            shards.layers = list(range(config.num_hidden_layers))
            return shards
        _, per_rank = schedule_settings(parallel, dims.pp)
        n_stages = dims.pp * per_rank
        ids = rank_stage_ids(dims.pp, per_rank, coords["pp"])
        stages = [parallelize(stage, dims, cfg) for stage in cut_stages(model, n_stages, ids).values()]
        shards = read_shards(stages, rank, coords)
        shards.layers = [int(i) for stage in stages for i in stage.layers]
        shards.first_stage, shards.last_stage = 0 in ids, n_stages - 1 in ids
        return shards


def representative_ranks(parallel, world: int) -> list[int]:
    """Ranks that cover every rank type: for each pp stage, the first and the last rank of its slice of
    the world (torch.chunk gives the first FSDP ranks the full chunks and the last one the remainder;
    the middle ranks equal the first)."""
    dims = ParallelDims.from_config(parallel, world)
    per_stage = world // dims.pp
    ranks = []
    for stage in range(dims.pp):
        ranks += [stage * per_stage, stage * per_stage + per_stage - 1]
    return sorted(set(ranks))


def rank_types(config: ModelConfig, parallel, world: int, *, dtype: torch.dtype = torch.float32) -> list[RankShards]:
    """One RankShards per distinct rank type (representative ranks with equal profiles merged)."""
    seen: dict[tuple, RankShards] = {}
    for rank in representative_ranks(parallel, world):
        shards = shard_bytes(config, parallel, world, rank, dtype=dtype)
        seen.setdefault(shards.profile(), shards)
    return list(seen.values())


@dataclass
class ParamCounts:
    total: int  # every parameter of the model
    active: int  # what one token uses: all but the routed experts it is not sent to
    embedding: int  # the input embedding (looked up, no matmul FLOPs)
    routed_experts: int


def param_counts(config: ModelConfig) -> ParamCounts:
    """Counts from a meta-device build of the model (not from a formula)."""
    model = meta_model(config)
    total = sum(p.numel() for p in model.parameters())
    routed = inactive = 0
    for i, block in enumerate(model.layers):
        experts = getattr(block.ffn, "experts", None)
        if experts is None:
            continue
        n = sum(p.numel() for p in experts.parameters())
        routed += n
        inactive += n * (config.n_routed_experts - config.num_experts_per_tok) // config.n_routed_experts
    return ParamCounts(total=total, active=total - inactive, embedding=model.embed.weight.numel(),
                       routed_experts=routed)
