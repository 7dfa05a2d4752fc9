"""Alternative implementations of r1mega's models for large-scale training: `megatron` (megatron-core,
with Transformer Engine when installed). Each backend builds the architectures of `r1mega.models` and
maps weights to and from the native layout, so checkpoints, rollout weight sync and tests stay shared.
"""
