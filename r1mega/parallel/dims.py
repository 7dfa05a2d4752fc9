"""`ParallelDims`: the one object that owns the device meshes.

The world is factorised as pp x dp_replicate x dp_shard x cp x tp. Expert parallelism borrows ranks
instead of adding a factor: the ep group spans cp x tp and, when ep is larger, part of dp_shard, so
the one world mesh has the dimensions

    pp, dp_replicate, dp_shard_mod_ep, dp_shard_in_ep, cp, tp      (dp_shard = mod_ep * in_ep)

and every group anyone needs is a named (sometimes flattened) dimension of it:

| name           | dims                                        | used by                              |
|----------------|---------------------------------------------|--------------------------------------|
| "pp"           | pp                                          | pipeline stages                      |
| "tp"           | tp                                          | tensor parallel, vocab-parallel loss |
| "cp"           | cp                                          | context parallel (mesh only)         |
| "dp"           | dp_replicate, dp_shard_mod_ep, dp_shard_in_ep | splitting the batch                |
| "fsdp"         | dp_shard_mod_ep, dp_shard_in_ep, cp         | FSDP of dense parameters             |
| "ep"           | dp_shard_in_ep, cp, tp                      | expert all_to_all                    |
| "efsdp"        | dp_shard_mod_ep                             | FSDP of expert parameters            |
| "dp_replicate" | dp_replicate                                | HSDP replication                     |

Deliberately left out: context parallel itself (the mesh dimension exists so plans can grow into it)
and expert-tensor parallel (experts are never split inside one expert).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

_BASE = ("pp", "dp_replicate", "dp_shard_mod_ep", "dp_shard_in_ep", "cp", "tp")
_FLAT = {
    "dp": ("dp_replicate", "dp_shard_mod_ep", "dp_shard_in_ep"),
    "fsdp": ("dp_shard_mod_ep", "dp_shard_in_ep", "cp"),
    "ep": ("dp_shard_in_ep", "cp", "tp"),
    "efsdp": ("dp_shard_mod_ep",),
}


@dataclass
class ParallelDims:
    world_size: int
    dp_replicate: int = 1
    dp_shard: int = -1  # -1: whatever the other factors leave
    cp: int = 1
    tp: int = 1
    ep: int = 1
    pp: int = 1
    _mesh: DeviceMesh | None = field(default=None, init=False, repr=False)
    _meshes: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        for name in ("dp_replicate", "cp", "tp", "ep", "pp"):
            if getattr(self, name) < 1:
                raise ValueError(f"ParallelDims: {name} must be >= 1, got {getattr(self, name)}")
        rest = self.dp_replicate * self.cp * self.tp * self.pp
        if self.dp_shard == -1:
            if self.world_size % rest:
                raise ValueError(f"ParallelDims: dp_replicate*cp*tp*pp={rest} does not divide world size {self.world_size}")
            self.dp_shard = self.world_size // rest
        if self.dp_shard < 1 or rest * self.dp_shard != self.world_size:
            raise ValueError(
                f"ParallelDims: pp*dp_replicate*dp_shard*cp*tp = {self.pp}*{self.dp_replicate}*{self.dp_shard}*"
                f"{self.cp}*{self.tp} must equal the world size {self.world_size}"
            )
        if self.ep > 1 and (self.ep % (self.cp * self.tp) or self.dp_shard % (self.ep // (self.cp * self.tp))):
            raise ValueError(
                f"ParallelDims: ep={self.ep} must be cp*tp={self.cp * self.tp} times a divisor of dp_shard={self.dp_shard}"
            )

    @classmethod
    def from_config(cls, cfg, world_size: int) -> "ParallelDims":
        """From an r1mega.config.ParallelConfig (or anything with the same fields)."""
        return cls(world_size, dp_replicate=cfg.dp_replicate, dp_shard=cfg.dp_shard, tp=cfg.tp, ep=cfg.ep,
                   pp=cfg.pp, cp=getattr(cfg, "cp", 1))

    @property
    def ep_in_dp(self) -> int:
        """How many dp_shard ranks the ep group spans (the rest of it is cp x tp)."""
        return self.ep // (self.cp * self.tp) if self.ep > 1 else 1

    def sizes(self) -> dict[str, int]:
        return {"pp": self.pp, "dp_replicate": self.dp_replicate, "dp_shard_mod_ep": self.dp_shard // self.ep_in_dp,
                "dp_shard_in_ep": self.ep_in_dp, "cp": self.cp, "tp": self.tp}

    def build_mesh(self, device_type: str | None = None) -> DeviceMesh:
        """Creates the world mesh and its flattened dimensions (collective: every rank calls it)."""
        if device_type is None:
            device_type = "cuda" if torch.cuda.is_available() else "cpu"
        if not dist.is_initialized():
            raise RuntimeError("ParallelDims.build_mesh needs an initialised process group (r1mega.parallel.launch)")
        if dist.get_world_size() != self.world_size:
            raise ValueError(f"ParallelDims: world size {self.world_size} != process group size {dist.get_world_size()}")
        sizes = self.sizes()
        mesh = init_device_mesh(device_type, tuple(sizes[n] for n in _BASE), mesh_dim_names=_BASE)
        # _flatten is the (still underscored) API torchtitan uses to name a group of dimensions.
        self._meshes = {name: mesh[dims]._flatten(name) for name, dims in _FLAT.items()}
        self._mesh = mesh
        return mesh

    @property
    def world_mesh(self) -> DeviceMesh:
        if self._mesh is None:
            self.build_mesh()
        return self._mesh

    def mesh(self, *names: str) -> DeviceMesh:
        """The (sub)mesh of the named dimensions, e.g. mesh("tp") or mesh("dp_replicate", "fsdp")."""
        world = self.world_mesh
        if len(names) == 1:
            return self._meshes.get(names[0]) or world[names[0]]
        return world[names]  # e.g. the 2-D HSDP mesh (dp_replicate, fsdp)

    def rank(self, name: str) -> int:
        return self.mesh(name).get_local_rank()

    def size(self, name: str) -> int:
        return self.mesh(name).size()

    @property
    def fsdp_enabled(self) -> bool:
        return self.dp_shard * self.cp > 1 or self.dp_replicate > 1

    @property
    def dp_size(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def dense_fsdp_dims(self) -> tuple[str, ...]:
        """FSDP mesh dims for dense parameters: HSDP (replicate, shard) when dp_replicate > 1."""
        return ("dp_replicate", "fsdp") if self.dp_replicate > 1 else ("fsdp",)

    @property
    def expert_fsdp_dims(self) -> tuple[str, ...]:
        return ("dp_replicate", "efsdp") if self.dp_replicate > 1 else ("efsdp",)
