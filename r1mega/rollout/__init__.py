"""Rollout engines: the `Engine` protocol, its data types, and the native engine (imported lazily by
name so that `r1mega.rollout.engine` stays free of model imports)."""

from r1mega.rollout.engine import Engine, Sample, SamplingParams, TokenizerLike

__all__ = ["Engine", "Sample", "SamplingParams", "TokenizerLike"]
