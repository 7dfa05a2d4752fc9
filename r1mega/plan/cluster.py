"""The machine a plan is for: nodes of GPUs, their memory, FLOP/s and links, and the efficiencies the
times are stated at. Defaults are one H100 SXM node (80 GB HBM3 at 3.35 TB/s, 989 dense bf16 TFLOP/s,
NVLink 450 GB/s per GPU per direction, 400 Gb/s InfiniBand per GPU = 50 GB/s).

Deliberately left out: heterogeneous nodes, and overlap of communication with compute (phase times
add their compute and communication: an upper bound a real run improves on)."""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1 << 30


@dataclass
class ClusterConfig:
    nodes: int = 1
    gpus_per_node: int = 8
    hbm_bytes: int = 80 * 10**9  # per GPU
    hbm_bandwidth: float = 3.35e12  # bytes/s per GPU
    intra_node_bandwidth: float = 450e9  # bytes/s per GPU, one direction (NVLink)
    inter_node_bandwidth: float = 50e9  # bytes/s per GPU, one direction (one 400 Gb/s NIC per GPU)
    bf16_flops: float = 989e12  # dense, per GPU
    # What the CUDA context, NCCL buffers and the allocator's fragmentation take of every GPU.
    reserved_bytes: int = 4 * GiB
    device: str = "cuda"  # "cpu" for a plan of a CPU run (the loss op's buffer size differs)
    mfu: float = 0.4  # share of bf16_flops the matmuls reach
    comm_efficiency: float = 0.7  # share of the link bandwidth collectives reach
    hbm_efficiency: float = 0.7  # share of hbm_bandwidth decoding reaches

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def usable_bytes(self) -> int:
        return self.hbm_bytes - self.reserved_bytes

    def link(self, extent: int) -> float:
        """Bandwidth (bytes/s, after comm_efficiency) of a group spanning `extent` consecutive ranks."""
        raw = self.intra_node_bandwidth if extent <= self.gpus_per_node else self.inter_node_bandwidth
        return raw * self.comm_efficiency
