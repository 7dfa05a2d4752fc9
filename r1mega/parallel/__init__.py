"""Parallelism for r1mega's `Transformer`: meshes (ParallelDims), parallelize (TP -> EP -> activation
checkpointing -> compile -> FSDP2), pipeline stages, distributed checkpoints, weight gathering, and
process-group launch."""

from r1mega.parallel.dims import ParallelDims
from r1mega.parallel.launch import init_distributed, shutdown
from r1mega.parallel.parallelize import parallelize
from r1mega.parallel.pipeline import PipelinedModel, pipeline_parallelize
from r1mega.parallel.weight_gather import gathered_state_dict

__all__ = ["ParallelDims", "PipelinedModel", "gathered_state_dict", "init_distributed", "parallelize",
           "pipeline_parallelize", "shutdown"]
