"""Parallelism for r1mega's `Transformer`: meshes (ParallelDims), parallelize (TP -> EP -> activation
checkpointing -> compile -> FSDP2), pipeline stages, distributed checkpoints, weight gathering, and
process-group launch."""

from r1mega.parallel.dims import ParallelDims
from r1mega.parallel.launch import init_distributed, shutdown
from r1mega.parallel.parallelize import parallelize
from r1mega.parallel.pipeline import PipelinedModel, pipeline_parallelize
from r1mega.parallel.native_policy import NativePolicy, as_native_policy
from r1mega.parallel.weight_gather import gathered_state_dict, load_full_state_dict

__all__ = ["NativePolicy", "ParallelDims", "PipelinedModel", "as_native_policy", "gathered_state_dict",
           "init_distributed", "load_full_state_dict", "parallelize", "pipeline_parallelize", "shutdown"]
