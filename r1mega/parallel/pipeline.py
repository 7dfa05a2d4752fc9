"""Pipeline parallelism for training with `torch.distributed.pipelining`.

The `Transformer` is cut by layers into `pp * stages_per_rank` stages: stage s holds a contiguous run
of blocks, the first stage also the embedding, the last the final norm and the output head. A
`StageModule` takes the model's own submodules (no copy), keeping the parameter names of the whole
model (`embed.weight`, `layers.{i}.…`, `norm.weight`, `lm_head.weight`), so distributed checkpoints,
weight gathering and the tensor-parallel plans see the same names and layer indices.

Schedules (`cfg.pp_schedule`):
- "1f1b": `Schedule1F1B`, one stage per rank; stage r on pp rank r.
- "interleaved_1f1b": `ScheduleInterleaved1F1B`, `cfg.pp_stages_per_rank` (>= 2) stages per rank in
  loop order: pp rank r holds stages r, r + pp, r + 2 pp, ... (smaller bubble, more messages).
The batch is split into `cfg.pp_microbatches` equal micro-batches along dim 0 (default: the number
of stages, the least the interleaved schedule accepts). The loss on the last stage is a mean per
micro-batch and the schedule divides the gradients by the number of micro-batches, so gradients are
those of the mean over the whole batch, as in one process.

Each stage is then `parallelize`d (TP -> EP -> checkpointing -> compile -> FSDP) on the other mesh
dimensions; the stages talk over `dims.mesh("pp")`.

Deliberately left out: packed rows (segment ids would have to travel with the activations between
stages; every row here uses positions 0..T-1), tied input/output embeddings split over stages (they
would need a gradient all-reduce between the first and last stage: rejected), zero-bubble and
looped-BFS schedules, uneven layer costs (embedding and head count as no layers), and the
memory-saving hidden-state output for `linear_grpo_loss` (the last stage returns logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

from r1mega.models import rope
from r1mega.models.attention import AttnContext
from r1mega.parallel.dims import ParallelDims
from r1mega.parallel.parallelize import parallelize

SCHEDULES = {"1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B}


class StageModule(nn.Module):
    """Blocks `layers` of `model` (a range of global indices); the embedding if `first`, the final norm
    and output head if `last`. forward: input ids [B, T] (first) or hidden [B, T, H] -> hidden
    [B, T, H], or float logits [B, T, V] on the last stage."""

    def __init__(self, model: nn.Module, layers: range, first: bool, last: bool):
        super().__init__()
        self.config = model.config
        self.embed = model.embed if first else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layers})
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) if self.embed is not None else x  # [B, T, H]
        b, t = h.shape[:2]
        positions = torch.arange(t, device=h.device).expand(b, t)  # [B, T]
        cos, sin = rope.cos_sin(self.config, positions, h.dtype)
        ctx = AttnContext(cos=cos, sin=sin)
        for block in self.layers.values():
            h = block(h, ctx)
        if self.norm is None:
            return h
        return self.lm_head(self.norm(h)).float()  # [B, T, V]


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits [B, T, V] against targets [B, T]: the last stage's loss_fn."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def stage_layers(n_layers: int, n_stages: int) -> list[range]:
    """Contiguous layer ranges, as even as possible; the earlier stages take the remainder."""
    if n_stages > n_layers:
        raise ValueError(f"pipeline: {n_stages} stages need at least as many layers, the model has {n_layers}")
    base, extra = divmod(n_layers, n_stages)
    bounds = [0]
    for s in range(n_stages):
        bounds.append(bounds[-1] + base + (s < extra))
    return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def _settings(cfg, pp: int) -> tuple[str, int, int]:
    schedule = getattr(cfg, "pp_schedule", "1f1b")
    if schedule not in SCHEDULES:
        raise ValueError(f"pp_schedule={schedule!r}: must be one of {tuple(SCHEDULES)}")
    per_rank = getattr(cfg, "pp_stages_per_rank", 1 if schedule == "1f1b" else 2)
    if (schedule == "1f1b") != (per_rank == 1):
        raise ValueError(f"pp_schedule={schedule!r} with pp_stages_per_rank={per_rank}: 1f1b runs one stage per "
                         "rank, interleaved_1f1b two or more")
    microbatches = getattr(cfg, "pp_microbatches", None) or pp * per_rank
    return schedule, per_rank, microbatches


@dataclass
class Pipeline:
    """This rank's stages and the schedule that runs them."""

    schedule: object  # a torch.distributed.pipelining schedule
    modules: list[StageModule]  # this rank's stages, in stage order
    has_first: bool
    has_last: bool

    def parameters(self):
        return [p for m in self.modules for p in m.parameters()]

    def named_parameters(self):
        return [item for m in self.modules for item in m.named_parameters()]

    def step(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """Forward and backward of the whole batch (input_ids, targets [B, T]); every pp rank calls it.
        Returns the mean loss on the rank holding the last stage, None elsewhere."""
        losses: list[torch.Tensor] = []
        args = (input_ids,) if self.has_first else ()
        self.schedule.step(*args, target=targets if self.has_last else None, losses=losses)
        return torch.stack(losses).detach().mean() if self.has_last else None


def pipeline_parallelize(model: nn.Module, dims: ParallelDims, cfg, loss_fn=next_token_loss,
                         device: torch.device | str = "cpu") -> Pipeline:
    """Cuts `model` into stages, keeps this pp rank's, parallelizes each on the other mesh dimensions and
    builds the schedule. `model` must not be used afterwards: the stages own its modules."""
    if dims.pp < 2:
        raise ValueError("pipeline_parallelize needs pp >= 2; use parallelize for pp == 1")
    if model.lm_head is None:
        raise ValueError("pipeline: tied input/output embeddings cannot be split over stages (tie_word_embeddings)")
    schedule_name, per_rank, microbatches = _settings(cfg, dims.pp)
    n_stages = dims.pp * per_rank
    ranges = stage_layers(len(model.layers), n_stages)
    pp_rank, pp_group = dims.rank("pp"), dims.mesh("pp").get_group()
    ids = [pp_rank + k * dims.pp for k in range(per_rank)]  # loop order
    modules = [parallelize(StageModule(model, ranges[s], s == 0, s == n_stages - 1), dims, cfg) for s in ids]
    stages = [PipelineStage(m, s, n_stages, torch.device(device), group=pp_group) for m, s in zip(modules, ids)]
    if schedule_name == "1f1b":
        schedule = Schedule1F1B(stages[0], microbatches, loss_fn=loss_fn)
    else:
        schedule = ScheduleInterleaved1F1B(stages, microbatches, loss_fn=loss_fn)
    return Pipeline(schedule, modules, has_first=0 in ids, has_last=n_stages - 1 in ids)
