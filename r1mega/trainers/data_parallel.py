"""Data parallelism for the GRPO trainer: the process group, the sharded policy, and the few collectives a
step needs, so that N processes compute what one process computes with the same global batch.

Under torchrun (WORLD_SIZE > 1) `DataParallel.launch` starts the process group (r1mega.parallel.launch:
gloo on CPU, nccl on GPUs, the dead-rank watchdog) and builds `ParallelDims` from `cfg.parallel`;
`parallelize` applies FSDP2 (HSDP with parallel.dp_replicate > 1). At world size 1 there is no process
group and every method below returns its input. One step:

- rollouts: every rank draws the same questions (same seed, same stream) and generates and scores only
  its contiguous share (`local`); `gather` all-gathers samples and scores, so every rank holds the batch
  one process would, in the same order. Sampling is seeded per (seed, prompt, sample index), so the
  samples are the same as one process's too.
- logprobs and loss: `shard` turns the batch into a `ShardedRolloutBatch` that knows the group (each
  rank runs its share of the micro-batches, and the batch sums what the ranks computed: the per-token
  logprobs, zeros outside a rank's rows, and the statistics). policy_update.py weights each micro-batch's loss by its share of the global mini-batch's
  sequences or tokens, so the ranks' losses add up to the global loss: FSDP is set to sum gradients
  over ranks (parallel.fsdp.sum_gradients) instead of averaging them.
- statistics: the loss and the token means are share-weighted sums, so the batch sums them over
  ranks; the ratio's extremes are min- and max-reduced; the gradient norm is already global
  (r1mega.parallel.grad_clip reduces it over every mesh), and the ranks agree on skipping a step
  (policy_update.py).
- MoE: expert loads are summed over the data-parallel `group` before the bias update (the policy's
  `sum_expert_load`, policy_model.py), so every rank keeps the same biases and reports the global load.

`parallelize` is for the native policy and the reference; the megatron backend's policy is replicated
instead, its gradients summed by DDP (policy_model.policy_for_backend, r1mega.parallel.replicate).

Tensor and expert parallelism (parallel.tp, parallel.ep) apply too: `parallelize` splits the policy and
the reference over the tp and ep meshes before FSDP shards them over the data-parallel one. The ranks of
one tp group share a data-parallel rank: they draw, generate and train on the same samples (the
engines hold full weights), and their statistics are the same. Expert parallelism borrows data-parallel
ranks (and tp ranks): the ep group's tokens meet at the experts through all_to_all inside the forward.

Pipeline parallelism (parallel.pp > 1, r1mega/parallel/pipeline.py): the policy and the reference are
cut into stages over the pp mesh; the ranks of one pipeline share a data-parallel rank, so they draw,
generate and hold the same samples, and every micro-batch of theirs runs through the schedule, the
fused loss (or logprob) head on the last stage, whose results every rank of the pipeline receives.
A layout the model cannot take (more stages than layers) or the world cannot hold stops in `launch`,
before any work. Rollouts generated beside training (rollout.staleness) keep every collective on the
main thread: rollout_source.py gathers after the step.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.distributed as dist

from r1mega.models import preset
from r1mega.parallel import ParallelDims, init_distributed, parallelize, pipeline_parallelize
from r1mega.parallel.pipeline import schedule_settings
from r1mega.parallel.checkpointing import apply_activation_checkpointing
from r1mega.parallel.fsdp import sum_gradients
from r1mega.rewards import ScoreResult
from r1mega.trainers.rollout_batch import RolloutBatch
from r1mega.trainers.sharded_batch import ShardedRolloutBatch

def model_layers(model_cfg) -> int:
    """The policy's layer count, from its config alone (no weights read)."""
    if model_cfg.path:
        path = Path(model_cfg.path) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"model.path={model_cfg.path} has no config.json")
        return int(json.loads(path.read_text())["num_hidden_layers"])
    return preset(model_cfg.preset).num_hidden_layers


def check_layout(cfg, world: int) -> None:
    """The parallel layout against the world size and the model, before any work, the key named."""
    parallel = cfg.parallel
    if parallel.pp < 1:
        raise ValueError(f"parallel.pp={parallel.pp}: must be >= 1")
    if parallel.pp > 1:
        if cfg.model.backend != "native":
            raise ValueError(f"parallel.pp={parallel.pp} with model.backend={cfg.model.backend}: pipeline parallelism "
                             "runs the native backend only")
        _, per_rank = schedule_settings(parallel, parallel.pp)
        layers = model_layers(cfg.model)
        if parallel.pp * per_rank > layers:
            raise ValueError(f"parallel.pp={parallel.pp} x parallel.pp_stages_per_rank={per_rank} pipeline stages, "
                             f"but the model has {layers} layers: a stage would hold none")
    rest = parallel.pp * parallel.tp * parallel.dp_replicate * (parallel.dp_shard if parallel.dp_shard > 0 else 1)
    if world % rest:
        raise ValueError(f"parallel.pp={parallel.pp} x parallel.tp={parallel.tp} x parallel.dp_replicate="
                         f"{parallel.dp_replicate} x parallel.dp_shard={parallel.dp_shard} does not divide the world "
                         f"size {world}")


class DataParallel:
    def __init__(self, dims: ParallelDims | None = None, device: torch.device | None = None, parallel_cfg=None):
        self.dims, self.device, self.parallel_cfg = dims, device, parallel_cfg
        self.size = dims.dp_size if dims is not None else 1
        self.rank = dims.rank("dp") if dims is not None else 0
        self.group = dims.mesh("dp").get_group() if dims is not None else None
        self.is_main = dims is None or dist.get_rank() == 0

    @property
    def distributed(self) -> bool:
        """The policy is split over ranks (any torchrun launch, also tp > 1 with one data-parallel rank):
        checkpoints are then distributed."""
        return self.dims is not None

    @classmethod
    def launch(cls, cfg, device: torch.device) -> tuple["DataParallel", torch.device]:
        """From the environment torchrun sets: (the data-parallel group, this rank's device)."""
        world = int(os.environ.get("WORLD_SIZE", 1))
        if world == 1:
            split = {key: getattr(cfg.parallel, key) for key in ("tp", "ep", "pp") if getattr(cfg.parallel, key) != 1}
            if split:
                raise ValueError(f"{', '.join(f'parallel.{k}={v}' for k, v in split.items())} needs as many processes: "
                                 "launch with torchrun --nproc-per-node N")
            return cls(parallel_cfg=cfg.parallel), device
        check_layout(cfg, world)
        _, world, device = init_distributed(backend="nccl" if device.type == "cuda" else "gloo")
        dims = ParallelDims.from_config(cfg.parallel, world)
        dims.build_mesh(device.type)
        algo = cfg.algo
        if algo.train_batch_size % dims.dp_size:
            raise ValueError(f"algo.train_batch_size={algo.train_batch_size} must be a multiple of the "
                             f"data-parallel degree {dims.dp_size}: every rank generates the same share")
        sequences = algo.ppo_mini_batch_size * algo.group_size
        if sequences % dims.dp_size:
            raise ValueError(f"algo.ppo_mini_batch_size * algo.group_size = {sequences} must be a multiple of the "
                             f"data-parallel degree {dims.dp_size}: every rank runs the same number of "
                             "micro-batches of each mini-batch")
        return cls(dims, device, cfg.parallel), device

    # ---- setup
    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (it may fill a cache: the base model, the tokenizer), then the others."""
        if self.dims is not None and not self.is_main:
            dist.barrier()
        yield
        if self.dims is not None and self.is_main:
            dist.barrier()

    def parallelize(self, model):
        """FSDP2 over the data-parallel ranks, gradients summed (each pipeline stage's, when pp > 1). The
        root's parameters (embedding, final norm, output head) stay gathered after a forward: the loss
        reads the output weight after it. In one process: activation checkpointing only
        (parallel.activation_checkpointing)."""
        if self.dims is None:
            mode = self.parallel_cfg.activation_checkpointing if self.parallel_cfg is not None else "none"
            return apply_activation_checkpointing(model, mode)
        if self.dims.pp > 1:
            pipe = pipeline_parallelize(model, self.dims, self.parallel_cfg)
            for stage in pipe.stages.values():
                sum_gradients(stage)
            return pipe
        return sum_gradients(parallelize(model, self.dims, self.parallel_cfg))

    # ---- rollouts
    def local(self, rows: Sequence) -> Sequence:
        """This rank's contiguous share of `rows` (the shares, in rank order, are `rows`)."""
        n = len(rows)
        return rows[self.rank * n // self.size:(self.rank + 1) * n // self.size]

    def gather(self, samples: list, scores: ScoreResult) -> tuple[list, ScoreResult]:
        """Every rank's samples and scores, joined in rank order."""
        if self.size == 1:
            return samples, scores
        parts: list = [None] * self.size
        dist.all_gather_object(parts, (samples, scores), group=self.group)
        return [s for part, _ in parts for s in part], ScoreResult.concat([score for _, score in parts])

    def shard(self, batch: RolloutBatch) -> RolloutBatch:
        if self.size == 1:
            return batch
        fields = {name: getattr(batch, name) for name in RolloutBatch.__dataclass_fields__}
        return ShardedRolloutBatch(**fields, dp_rank=self.rank, dp_size=self.size, group=self.group,
                                   comm_device=self.device)

    # ---- reductions
    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over data-parallel ranks (on the communication device, returned where it was)."""
        if self.size == 1:
            return tensor
        out = tensor.to(self.device)
        dist.all_reduce(out, group=self.group)
        return out.to(tensor.device)
