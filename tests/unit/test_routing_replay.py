"""MoE routing replay (R3): a replayed MoE layer against the layer written out by hand, the native engine's
routing record against the trainer's own routing in fp32 (packed, shared-prompt and chunked-prefill rows),
the trainer's replayed logprobs against the engine's, a forced record that must change them, and the
GRPO trainer's loss pass replaying what the engine recorded."""

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from r1mega.cli.train import CONF_DIR
from r1mega.config import RolloutConfig, register_configs
from r1mega.models.config import tiny_deepseek_v3
from r1mega.models.moe import MoE
from r1mega.models.routing import NO_RECORD, Routing
from r1mega.models.transformer import Transformer
from r1mega.rollout.engine import SamplingParams
from r1mega.rollout.native import NativeEngine
from r1mega.trainers.components import build_engine
from r1mega.trainers.grpo import GRPOTrainer
from r1mega.trainers.policy_update import sequence_logprobs
from r1mega.trainers.rollout_batch import RolloutBatch

E, K = 8, 2
CONFIG = tiny_deepseek_v3(64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                          q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                          n_routed_experts=E, num_experts_per_tok=K, moe_intermediate_size=16, n_group=2,
                          topk_group=1, routed_scaling_factor=2.0, max_position_embeddings=128)
MOE_LAYERS = 2  # layers 1 and 2 (the first is dense)
PROMPTS = [[5, 17, 3, 9, 22, 1, 40], [8, 2], [30] * 11]


def model() -> Transformer:
    torch.manual_seed(0)
    m = Transformer(CONFIG)
    m.init_weights(std=0.3)  # experts and router far from uniform: another expert changes the output
    for block in m.layers:
        if isinstance(block.ffn, MoE):
            block.ffn.router.expert_bias.normal_(std=0.05)
    return m.eval()


def distinct_experts(shape, generator) -> torch.Tensor:
    """[*shape, K] distinct experts per row, at random (not necessarily the group-limited choice)."""
    return torch.rand(*shape, E, generator=generator).argsort(-1)[..., :K]


def test_replayed_layer_equals_the_layer_written_out():
    moe = model().layers[1].ffn
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, CONFIG.hidden_size, generator=g)
    record = distinct_experts((6, MOE_LAYERS), g)
    record[4] = NO_RECORD  # token 4 routes itself
    routing = Routing(replay=record)
    y = moe(x, routing=routing)

    probs = torch.sigmoid(x @ moe.router.weight.T)  # [N, E]: weights use the scores without the bias
    own = moe(x)  # the layer routing itself
    for n in range(6):
        if n == 4:
            torch.testing.assert_close(y[n], own[n])
            continue
        experts = record[n, moe.moe_index]
        w = probs[n, experts] / probs[n, experts].sum() * CONFIG.routed_scaling_factor
        want = moe.shared(x[n])
        for weight, e in zip(w, experts.tolist()):
            hidden = F.silu(moe.experts.gate[e] @ x[n]) * (moe.experts.up[e] @ x[n])
            want = want + weight * (moe.experts.down[e] @ hidden)
        torch.testing.assert_close(y[n], want, atol=1e-5, rtol=1e-5)
        assert routing.chosen[moe.moe_index][n].tolist() == experts.tolist()
    y.sum().backward()
    assert moe.router.weight.grad.abs().sum() > 0, "the router's weights must still get gradients"


def generate(policy, **engine_kw):
    # 4 slots for 3 prompts x 3 samples: groups split across admissions, slots compacted; 3-token prefill chunks
    engine = NativeEngine(policy, max_slots=4, max_len=64, prefill_chunk=3, record_routing=True, **engine_kw)
    groups = engine.generate(PROMPTS, SamplingParams(n=3, max_new_tokens=9, seed=3))
    return [s for group in groups for s in group]


@pytest.fixture(scope="module")
def rollout():
    """The policy and its engine's samples with routing records (fp32 on both sides)."""
    policy = model()
    return policy, generate(policy)


def own_routing(policy, sample) -> torch.Tensor:
    """The trainer's own experts [P + n, L, k] for one sample, from a plain forward of its sequence."""
    routing = Routing()
    with torch.no_grad():
        policy(torch.tensor(sample.prompt_ids + sample.token_ids)[None], routing=routing)
    return routing.stacked()


def test_engine_record_is_the_trainer_routing_and_replay_keeps_the_logprobs_in_fp32(rollout):
    policy, samples = rollout
    for s in samples:
        record = s.routed_experts.long()
        assert record.shape == (len(s.prompt_ids) + len(s.token_ids) - 1, MOE_LAYERS, K)
        own = own_routing(policy, s)[:-1]  # the last token was never fed to the engine
        assert torch.equal(record.sort(-1).values, own.sort(-1).values)

    batch = RolloutBatch.from_samples(samples, torch.zeros(len(samples)))
    kw = dict(temperature=1.0, device="cpu")
    for budget in (30, 1000):  # several micro-batches, or one row with every group sharing its prompt
        replayed = sequence_logprobs(policy, batch, token_budget=budget, replay_routing=True, **kw)
        own = sequence_logprobs(policy, batch, token_budget=budget, **kw)
        # same experts, same weights: only the order of fp32 sums differs (cache vs packed row)
        torch.testing.assert_close(replayed, batch.engine_logp * batch.mask, atol=2e-5, rtol=0)
        torch.testing.assert_close(replayed, own, atol=2e-5, rtol=0)


def test_a_different_record_changes_the_logprobs(rollout):
    policy, samples = rollout
    batch = RolloutBatch.from_samples(samples, torch.zeros(len(samples)))
    kw = dict(temperature=1.0, token_budget=1000, device="cpu", replay_routing=True)
    replayed = sequence_logprobs(policy, batch, **kw)
    g = torch.Generator().manual_seed(2)
    batch.routing = [distinct_experts(r.shape[:2], g) for r in batch.routing]
    forced = sequence_logprobs(policy, batch, **kw)
    assert (forced - replayed).abs().max() > 0.05


def test_replay_is_refused_where_it_is_not_done():
    policy = model()
    with pytest.raises(ValueError, match="algo.routing_replay.*rollout.engine=native"):
        build_engine(RolloutConfig(engine="sglang"), policy, None, 64, "cpu", record_routing=True)
    unrecorded = NativeEngine(policy, max_slots=2, max_len=32).generate([[1, 2]], SamplingParams(max_new_tokens=3))[0]
    batch = RolloutBatch.from_samples(unrecorded, torch.zeros(1))
    with pytest.raises(ValueError, match="algo.routing_replay=true, but the rollout batch has no routing record"):
        sequence_logprobs(policy, batch, temperature=1.0, token_budget=100, device="cpu", replay_routing=True)


def trainer_config(tmp_path, *overrides):
    # One rollout of 2 questions x 4 samples, one optimizer step (on-policy: the loss pass's logprobs
    # are the old ones the rollout metrics compare with the engine's).
    register_configs()
    fast = ["model.init=random", "algo.train_batch_size=2", "algo.ppo_mini_batch_size=2", "algo.group_size=4",
            "rollout.max_new_tokens=[[0,6]]", "data.train_size=64", "data.test_size=4", "train.progress=false",
            "train.tensorboard=false", "algo.beta=0.0", f"train.out_dir={tmp_path}", *overrides]
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return OmegaConf.to_object(compose("config", overrides=fast))


def test_the_trainer_replays_the_engine_record(tmp_path):
    trainer = GRPOTrainer(trainer_config(tmp_path, "algo.routing_replay=true"))
    trainer.scorer.close()
    with torch.no_grad():  # a policy whose experts differ, so that other experts change the logprobs
        trainer.policy.init_weights(std=0.3)
        trainer.engine.update_weights(trainer.policy.state_dict().items(), version=0)
    assert trainer.train_step()["rollout/logprob_mismatch"] < 1e-4  # fp32 on both sides, the same experts

    generate = trainer.engine.generate
    experts = trainer.policy.config.n_routed_experts

    def other_experts(*args, **kwargs):  # each recorded expert replaced by the next one (still k distinct)
        groups = generate(*args, **kwargs)
        for sample in (s for group in groups for s in group):
            sample.routed_experts = (sample.routed_experts + 1) % experts
        return groups

    trainer.engine.generate = other_experts
    assert trainer.train_step()["rollout/logprob_mismatch"] > 1e-2  # the loss pass routed by the record


def test_routing_replay_under_pipeline_parallelism_is_refused_before_any_work():
    from r1mega.config import Config
    from r1mega.trainers.grpo import GRPOTrainer

    cfg = Config()
    cfg.algo.routing_replay, cfg.parallel.pp = True, 2
    with pytest.raises(ValueError, match=r"algo\.routing_replay.*parallel\.pp=2"):
        GRPOTrainer(cfg)
