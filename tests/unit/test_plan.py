"""r1mega.plan on the big presets and its verdict, against numbers it does not compute itself:
DeepSeek-V3's published 671B total / 37B activated parameters, per-rank bytes from a formula written
here from the parallel plans (tensor_parallel.py's column/row splits, expert_parallel's Shard(0),
FSDP2's padded dim-0 chunks), and a layout made not to fit."""

import math
from types import SimpleNamespace

import pytest
from hydra import compose, initialize_config_dir

from r1mega.cli.train import CONF_DIR
from r1mega.models.config import preset
from r1mega.models.transformer import Transformer
from r1mega.plan.shards import param_counts, shard_bytes

COLWISE = ("attn.wq.", "attn.wq_b.", "attn.wk.", "attn.wv.", "attn.wkv_b.", "ffn.gate.", "ffn.up.",
           "ffn.shared.gate.", "ffn.shared.up.")
ROWWISE = ("attn.wo.", "ffn.down.", "ffn.shared.down.")


def _parallel(**kw):
    return SimpleNamespace(**{**dict(dp_shard=-1, dp_replicate=1, tp=1, ep=1, pp=1, activation_checkpointing="none"),
                              **kw})


def expected_rank0_bytes(config, tp: int, ep: int, world: int) -> int:
    """Rank 0's parameter bytes by hand: tp splits column-parallel weights on dim 0 and row-parallel ones
    on dim 1, ep splits the routed experts on dim 0; FSDP then takes ceil(dim0 / degree) rows of what is
    left, over the dense group (world / tp ranks) or, for experts, the efsdp group (world / ep)."""
    import torch

    with torch.device("meta"):
        model = Transformer(config)
    total = 0
    for name, p in model.named_parameters():
        shape = list(p.shape)
        fsdp = world // tp
        if ".ffn.experts." in name:
            shape[0] //= ep
            fsdp = world // ep
        elif name.startswith("layers.") and any(f".{s}" in name for s in COLWISE):
            shape[0] //= tp
        elif name.startswith("layers.") and any(f".{s}" in name for s in ROWWISE):
            shape[1] //= tp
        rows = math.ceil(shape[0] / fsdp)
        total += rows * math.prod(shape[1:]) * 4
    return total


def test_deepseek_v3_counts_are_the_papers():
    counts = param_counts(preset("deepseek_v3_671b"))
    assert counts.total == pytest.approx(671e9, rel=0.001)  # DeepSeek-V3 report: 671B (without the MTP module)
    assert counts.active == pytest.approx(37e9, rel=0.02)  # 37B activated per token


def test_deepseek_v3_rank_bytes_match_the_plans():
    config = preset("deepseek_v3_671b")
    shards = shard_bytes(config, _parallel(tp=8, ep=64), 512, 0)
    assert shards.params == expected_rank0_bytes(config, tp=8, ep=64, world=512)


def test_tiny_rank_bytes_match_the_plans_at_four_ranks():
    config = preset("tiny_deepseek_v3")
    shards = shard_bytes(config, _parallel(tp=2, ep=2), 4, 0)
    assert shards.params == expected_rank0_bytes(config, tp=2, ep=2, world=4)


def _plan(*overrides):
    from r1mega.plan.config import register_plan_configs
    from r1mega.plan.report import make_plan
    from r1mega.plan.workload import workload
    from omegaconf import OmegaConf

    register_plan_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = OmegaConf.to_object(compose(config_name="plan", overrides=list(overrides)))
    return make_plan(workload(cfg, cfg.cluster.world, cfg.plan), cfg.cluster)


def test_a_layout_that_does_not_fit_names_the_overflowing_term():
    # 2 GB GPUs, 0 reserved: the tiny model's training activations at 8192 tokens (~1 GiB) plus the
    # native engine's KV cache (128 slots) overflow the rollout phase first
    plan = _plan("cluster.gpus_per_node=1", "cluster.hbm_bytes=100000000", "cluster.reserved_bytes=0")
    assert not plan.fits
    verdict = plan.verdict()
    assert verdict.startswith("does not fit: ")
    rank = plan.ranks[0].table
    phase = max(("rollout", "logprobs", "training", "weight sync"), key=rank.total)
    term = max(rank.terms, key=lambda t: rank.terms[t][phase])
    assert f"{phase} on" in verdict and f"largest term: {term}" in verdict


def test_a_layout_that_fits_says_so():
    plan = _plan("cluster.gpus_per_node=2")
    assert plan.fits and plan.verdict().startswith("fits: ")
