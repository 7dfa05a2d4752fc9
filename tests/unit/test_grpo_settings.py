"""Settings of the GRPO trainer that are honoured or refused, never silently ignored: model.init and
model.dtype, the KL folded into the reward (logged as what was folded in), activation checkpointing
in one process, and pipeline layouts that cannot run, refused before any work with the key named."""

import copy

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from grpo_runs import grpo_config, plain_logprobs
from r1mega.cli.train import CONF_DIR
from r1mega.config import DataConfig, ModelConfig, register_configs
from r1mega.data.tokenizer import build_default_tokenizer
from r1mega.models.balance import moe_layers
from r1mega.trainers.base_model import pretrained_base
from r1mega.trainers.data_parallel import check_layout
from r1mega.trainers.grpo import GRPOTrainer
from r1mega.trainers.rollout_batch import RolloutBatch
from r1mega.trainers.token_batch import response_logprobs


@pytest.mark.parametrize("override,message", [
    ("model.init=pretrained", "model.init='pretrained' needs model.path"),
    ("model.dtype=bfloat16", "model.dtype='bfloat16': the trainer holds its weights in float32 only"),
])
def test_model_settings_the_trainer_cannot_honour_are_refused(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        GRPOTrainer(grpo_config(tmp_path, override))


def test_pipeline_micro_batches_are_not_a_setting():
    """The trainer's micro-batches are packed by algo.token_budget, under pp as without it."""
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        with pytest.raises(ConfigCompositionException, match="pp_microbatches"):
            compose("config", overrides=["parallel.pp_microbatches=4"])


@pytest.mark.parametrize("overrides,world,message", [
    (["parallel.pp=8"], 8, "parallel.pp=8 x parallel.pp_stages_per_rank=1 pipeline stages, but the model has 4 "),
    (["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_stages_per_rank=4"], 2,
     "parallel.pp=2 x parallel.pp_stages_per_rank=4 pipeline stages, but the model has 4 layers: a stage would hold"),
    (["parallel.pp=2"], 3, "parallel.pp=2 x parallel.tp=1 .* does not divide the world size 3"),
    (["parallel.pp=2", "parallel.tp=2"], 6, "parallel.pp=2 x parallel.tp=2 .* does not divide the world size 6"),
    (["parallel.pp=2", "parallel.pp_schedule=zigzag"], 2, "parallel.pp_schedule='zigzag'"),
    (["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b"], 2, "parallel.pp_stages_per_rank=1"),
    (["parallel.pp=2", "model.backend=megatron"], 2, "model.backend=megatron: pipeline parallelism runs the native"),
])
def test_bad_pipeline_layouts_stop_before_any_work(tmp_path, overrides, world, message):
    with pytest.raises(ValueError, match=message):
        check_layout(grpo_config(tmp_path, *overrides), world)



def test_kl_in_reward_logs_the_kl_it_folds_in(tmp_path):
    beta = 0.5
    trainer = GRPOTrainer(grpo_config(tmp_path, "algo.kl_in_reward=true", f"algo.beta={beta}"))
    with torch.no_grad():  # a reference away from the policy, so that the KL is not 0
        generator = torch.Generator().manual_seed(0)
        for p in trainer.reference.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    policy, reference = copy.deepcopy(trainer.policy), copy.deepcopy(trainer.reference)  # as the rollout saw them
    sampled = []
    generate = trainer.engine.generate
    trainer.engine.generate = lambda prompts, sampling: sampled.append(generate(prompts, sampling)) or sampled[-1]
    try:
        metrics = trainer.train_step()
    finally:
        trainer.scorer.close()
    # k1 per token, log pi_old - log pi_ref, in plain PyTorch; each sample's sum is what beta scales
    with torch.no_grad():
        k1 = [plain_logprobs(policy, s.prompt_ids, s.token_ids) - plain_logprobs(reference, s.prompt_ids, s.token_ids)
              for group in sampled[0] for s in group]
    tokens = sum(len(k) for k in k1)
    per_token = float(sum(k.sum() for k in k1)) / tokens
    penalty = beta * float(sum(k.sum() for k in k1)) / len(k1)
    assert abs(per_token) > 1e-3, "the reference should differ from the policy, or the test compares nothing"
    # fp32 logprobs of the packed path and the plain forward differ by ~1e-6 a token
    assert metrics["train/kl"] == pytest.approx(per_token, abs=1e-5)
    assert metrics["reward/kl_penalty"] == pytest.approx(penalty, abs=beta * 1e-5 * tokens / len(k1))


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_in_one_process_recomputes_and_keeps_the_gradients(tmp_path, mode):
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 200, (5,), generator=gen).tolist() for _ in range(3)]
    responses, mask = RolloutBatch.pad([torch.randint(3, 200, (n,), generator=gen).tolist() for n in (4, 7, 2)])
    batch = RolloutBatch(prompts, responses, mask, torch.zeros_like(mask), torch.zeros(3))
    gradients, forwards = {}, {}
    for setting in ("none", mode):
        trainer = GRPOTrainer(grpo_config(tmp_path / setting, f"parallel.activation_checkpointing={setting}"))
        trainer.scorer.close()
        calls = []
        trainer.policy.layers[0].attn.register_forward_hook(lambda *args: calls.append(1))
        logp = response_logprobs(trainer.policy, batch, temperature=1.0, device="cpu")
        in_forward = len(calls)
        (logp * torch.linspace(-1, 1, logp.numel()).view_as(logp)).sum().backward()
        forwards[setting] = (in_forward, len(calls))
        gradients[setting] = {name: p.grad for name, p in trainer.policy.named_parameters() if p.grad is not None}
    assert forwards == {"none": (1, 1), mode: (1, 2)}  # the checkpointed block ran again in backward
    assert gradients[mode].keys() == gradients["none"].keys()
    for name, grad in gradients["none"].items():  # the same ops on the same inputs: the same bits
        assert torch.equal(gradients[mode][name], grad), name


def test_the_pretraining_run_starts_from_the_cached_base_model(tmp_path, monkeypatch):
    tokenizer = build_default_tokenizer()  # from the usual cache
    monkeypatch.setenv("R1MEGA_CACHE", str(tmp_path))
    model_cfg, data = ModelConfig(base_steps=2, base_batch_size=4), DataConfig(task="chain", train_size=64)
    pretrained = pretrained_base(model_cfg, tokenizer, data, seed=0)  # pretrains, then caches
    cached = pretrained_base(model_cfg, tokenizer, data, seed=0)  # reads the cache
    for (name, a), b in zip(pretrained.state_dict().items(), cached.state_dict().values()):
        assert torch.equal(a, b), name
    # no MoE load counted in pretraining left for RL's first expert-bias update
    left = [m.load_since_update for _, m in moe_layers(pretrained)]
    assert left == [m.load_since_update for _, m in moe_layers(cached)] == [None] * len(left)
