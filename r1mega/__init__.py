"""r1mega: DeepSeek-R1-style reinforcement learning for MoE and dense transformers."""

__version__ = "0.1.0"
