"""grpo_worker.py's run with the policy as a megatron-core GPTModel on the CPU (model.backend=megatron
is added by the caller): megatron's CUDA allocations are pointed at the CPU as in
tests/megatron_cpu_parity.py (test code only; the package never does this), and `build_model`, which
refuses to run without CUDA, is replaced by that helper's CPU build after the package's own
parallel-state set-up. argv: as grpo_worker.py's."""

import runpy
from pathlib import Path

import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

import megatron_cpu_parity  # noqa: F401  (points torch.cuda.current_device at the CPU)
from r1mega.backends.megatron import compat
from r1mega.backends.megatron import model as megatron_model

# megatron's CUDA RNG trackers need a GPU; the weights are loaded from the native model and nothing
# draws random numbers in the forward (no dropout), so there is nothing for them to seed.
tensor_parallel.model_parallel_cuda_manual_seed = lambda seed: None


def cpu_build(cfg, parallel, dtype):
    compat.apply()
    megatron_model.ensure_model_parallel(parallel)
    # each tensor-parallel group one data-parallel replica, as the trainer's DDP replicates the policy
    assert parallel_state.get_data_parallel_world_size() == dist.get_world_size() // parallel.tensor_parallel
    return megatron_cpu_parity.build(cfg, parallel).train()


megatron_model.build_model = cpu_build

if __name__ == "__main__":
    runpy.run_path(str(Path(__file__).with_name("grpo_worker.py")), run_name="__main__")
