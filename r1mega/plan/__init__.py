"""r1mega-plan: before a run is launched, the memory of every rank and the time of every phase of a GRPO
step for a layout and a cluster (cluster.py: the machine; shards.py: bytes read from the real
`parallelize` on the meta device; activations.py: the training forward's saved tensors per layer
type; memory.py: the table per rank type; phases.py: FLOPs, bytes moved and times; report.py: tables
and the verdict; search.py: the layouts that fit, ranked by step time)."""
