"""Test helper, run as a subprocess: builds megatron-core GPTModels on the CPU for tiny configs of every
architecture, loads native weights through r1mega's mapping, and prints one JSON line per config with
the largest logit difference against the native `Transformer` (fp32) and whether megatron's state-dict
names are exactly the mapping's.

megatron-core allocates on `torch.cuda.current_device()`; this helper (never the package) points that
at the CPU and skips megatron's CUDA-RNG weight init (weights are loaded anyway). It runs in its own
process because it initialises torch.distributed (gloo, world of one) and megatron's parallel state.
Usage: python tests/megatron_cpu_parity.py PORT NAME...
(NAME: a config of CONFIGS; policy:NAME runs `run_policy`, replay:NAME `run_replay`; trainer:PRESET runs
`run_trainer`)
"""

import json
import os
import sys
import warnings

import torch

warnings.filterwarnings("ignore")
torch.cuda.current_device = lambda: "cpu"  # test-only: megatron-core hard-codes CUDA allocations

from r1mega.backends.megatron import compat, config as mconfig, loss as mloss, mapping, model as mmodel  # noqa: E402
from r1mega.models.config import ModelConfig, tiny_deepseek_v3  # noqa: E402
from r1mega.models.transformer import Transformer  # noqa: E402

_BASE = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
             max_position_embeddings=256)
CONFIGS = {
    "qwen2_tied": lambda: ModelConfig(architecture="Qwen2ForCausalLM", num_key_value_heads=2, attention_bias=True,
                                      tie_word_embeddings=True, **_BASE),
    "llama3_rope": lambda: ModelConfig(architecture="LlamaForCausalLM", num_key_value_heads=1, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}, **_BASE),
    "qwen2_yarn": lambda: ModelConfig(architecture="Qwen2ForCausalLM", num_key_value_heads=1, attention_bias=True,
                                      rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                    "original_max_position_embeddings": 32}, **_BASE),
    "qwen3": lambda: ModelConfig(architecture="Qwen3ForCausalLM", num_key_value_heads=2, head_dim=16, qk_norm=True,
                                 **_BASE),
    "qwen3_moe": lambda: ModelConfig(architecture="Qwen3MoeForCausalLM", num_key_value_heads=2, head_dim=8,
                                     qk_norm=True, n_routed_experts=6, num_experts_per_tok=2, moe_intermediate_size=16,
                                     norm_topk_prob=True, scoring_func="softmax", mlp_only_layers=[0], **_BASE),
    "qwen3_moe_unnormed": lambda: ModelConfig(architecture="Qwen3MoeForCausalLM", num_key_value_heads=4, qk_norm=True,
                                              n_routed_experts=4, num_experts_per_tok=3, moe_intermediate_size=16,
                                              norm_topk_prob=False, scoring_func="softmax", **_BASE),
    "deepseek_v3": lambda: tiny_deepseek_v3(vocab_size=97, hidden_size=64, num_hidden_layers=3,
                                            routed_scaling_factor=2.5),
    "deepseek_v3_no_q_lora_halves": lambda: tiny_deepseek_v3(
        vocab_size=97, hidden_size=64, num_hidden_layers=2, q_lora_rank=None, rope_interleave=False,
        tie_word_embeddings=True, n_group=1, topk_group=1, n_shared_experts=2),
    "deepseek_v3_yarn": lambda: tiny_deepseek_v3(
        vocab_size=97, hidden_size=64, num_hidden_layers=2, max_position_embeddings=1280, rope_scaling={
            "rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 32, "beta_fast": 32,
            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}),
}


def build(cfg: ModelConfig, parallel=None):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    kw = mconfig.transformer_config_kwargs(cfg, parallel or mconfig.ParallelConfig(), dtype=torch.float32)
    kw.update(perform_initialization=False, use_cpu_initialization=True)
    tc = (MLATransformerConfig if cfg.is_mla else TransformerConfig)(**kw)
    pos, extra = mconfig.position_embedding(cfg)
    for k, v in extra.items():
        setattr(tc, k, v)
    m = GPTModel(config=tc, transformer_layer_spec=mmodel.layer_specs(tc, use_te=False), vocab_size=cfg.vocab_size,
                 max_sequence_length=cfg.max_position_embeddings,
                 share_embeddings_and_output_weights=cfg.tie_word_embeddings, parallel_output=True, **pos)
    mmodel._set_rope_frequencies(m, cfg)
    return m.eval()


def perturbed_native(cfg: ModelConfig) -> Transformer:
    """A random native model with norms, biases and the expert bias away from their constant init."""
    torch.manual_seed(0)
    native = Transformer(cfg).eval()
    with torch.no_grad():
        for n, t in list(native.named_parameters()) + list(native.named_buffers()):
            if "norm" in n:
                t.copy_(1 + 0.2 * torch.randn_like(t))
            elif n.endswith("bias"):
                t.copy_(0.1 * torch.randn_like(t))
    return native


def build_loaded(cfg: ModelConfig, native: Transformer):
    m = build(cfg)
    m.load_state_dict(dict(mapping.native_to_megatron(cfg, native.state_dict().items())), strict=False)
    return m


def run(name: str) -> dict:
    cfg = CONFIGS[name]()
    native = perturbed_native(cfg)
    m = build_loaded(cfg, native)
    names = sorted(k for k in m.state_dict() if not k.endswith("_extra_state"))
    same_names = names == sorted(mapping.megatron_names(cfg))
    ids = torch.randint(0, cfg.vocab_size, (2, 11))
    with torch.no_grad():
        ref = native(ids)
        logits = m(ids, torch.arange(11).expand(2, 11), None)
        hidden = mloss.hidden_states(m, ids)
    return dict(name=name, same_names=same_names, logits_diff=(logits.float() - ref).abs().max().item(),
                hidden_diff=(hidden - native(ids, return_hidden=True)).abs().max().item(),
                scale=ref.abs().max().item())


def run_policy(name: str) -> dict:
    """The trainer's path through `MegatronPolicy` against the native model on the same weights: packed
    micro-batch hidden states, on-policy GRPO loss and gradient norm, an SGD step (plain, so weight
    differences are gradient differences), the expert-bias update and the weights exported for the
    rollout engine."""
    from r1mega.backends.megatron.policy import MegatronPolicy
    from r1mega.models.balance import update_expert_bias
    from r1mega.ops.linear_grpo_loss import linear_grpo_loss
    from r1mega.trainers.token_batch import TokenBatch, response_hidden

    cfg = CONFIGS[name]()
    native = perturbed_native(cfg).train()
    policy = MegatronPolicy(cfg, build_loaded(cfg, native).train())
    gen = torch.Generator().manual_seed(1)
    lengths = [5, 9, 3]
    prompts = [torch.randint(0, cfg.vocab_size, (4,), generator=gen).tolist() for _ in lengths]
    ids, mask = TokenBatch.pad([torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist() for n in lengths])
    batch, advantages = TokenBatch(prompts, ids, mask), torch.randn(len(lengths), generator=gen)
    results = {}
    for label, model in (("native", native), ("megatron", policy)):
        hidden = response_hidden(model, batch, "cpu")
        loss, _ = linear_grpo_loss(hidden, model.output_weight, ids, None, None, advantages, mask, beta=0.0)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
        torch.optim.SGD(model.parameters(), lr=0.1).step()
        results[label] = (hidden.detach(), loss.item(), grad_norm.item())
    update_expert_bias(native, 0.01)
    policy.update_expert_bias(0.01)
    exported, want = dict(policy.engine_weights()), native.state_dict()
    (h_n, loss_n, norm_n), (h_m, loss_m, norm_m) = results["native"], results["megatron"]
    return dict(name=name, mode="policy", hidden_diff=(h_m - h_n).abs().max().item(), loss_diff=abs(loss_m - loss_n),
                grad_norm_rel_diff=abs(norm_m - norm_n) / norm_n, same_keys=sorted(exported) == sorted(want),
                weights_diff=max((exported[k] - t).abs().max().item() for k, t in want.items() if k in exported),
                bias_moved=any("expert_bias" in k and t.abs().max() > 0.1 + 1e-3 for k, t in want.items()))


def run_replay(name: str) -> dict:
    """Routing replay through `MegatronPolicy` against the native model on the same weights: a packed
    micro-batch whose samples share prompts, both replaying one random routing record (R3), its hidden
    states, on-policy GRPO loss and gradient norm; and how far replay moved megatron's hidden states."""
    from r1mega.backends.megatron.policy import MegatronPolicy
    from r1mega.ops.linear_grpo_loss import linear_grpo_loss
    from r1mega.trainers.token_batch import TokenBatch, response_hidden

    cfg = CONFIGS[name]()
    native = perturbed_native(cfg).train()
    policy = MegatronPolicy(cfg, build_loaded(cfg, native).train())
    gen = torch.Generator().manual_seed(1)
    lengths = [5, 9, 3, 6]
    shared = [torch.randint(0, cfg.vocab_size, (4,), generator=gen).tolist() for _ in range(2)]
    prompts = [shared[0], shared[0], shared[1], shared[1]]
    ids, mask = TokenBatch.pad([torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist() for n in lengths])
    batch, advantages = TokenBatch(prompts, ids, mask), torch.randn(len(lengths), generator=gen)
    layers = sum(map(cfg.is_moe_layer, range(cfg.num_hidden_layers)))
    # what an engine records: every token of prompt + response but the last
    records = [torch.rand(len(p) + n - 1, layers, cfg.n_routed_experts, generator=gen).argsort(-1)[
        ..., :cfg.num_experts_per_tok] for p, n in zip(prompts, lengths)]
    results = {}
    for label, model in (("native", native), ("megatron", policy)):
        hidden = response_hidden(model, batch, "cpu", records)
        loss, _ = linear_grpo_loss(hidden, model.output_weight, ids, None, None, advantages, mask, beta=0.0)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
        results[label] = (hidden.detach(), loss.item(), grad_norm.item())
    with torch.no_grad():
        unreplayed = response_hidden(policy, batch, "cpu")
    (h_n, loss_n, norm_n), (h_m, loss_m, norm_m) = results["native"], results["megatron"]
    # masked columns hold a response's last token, which megatron routes to experts 0..k-1 and the native
    # model by itself (neither record covers it); no logprob reads it
    valid = mask[..., None]
    return dict(name=name, mode="replay", hidden_diff=((h_m - h_n) * valid).abs().max().item(),
                loss_diff=abs(loss_m - loss_n),
                grad_norm_rel_diff=abs(norm_m - norm_n) / norm_n,
                replay_moved=((unreplayed - h_m) * valid).abs().max().item())


def run_trainer(preset: str) -> dict:
    """Three GRPO steps of the trainer with model.backend=megatron and with the native backend, from
    the same random model and prompts: per-step metrics of both. megatron's model is built by `build`
    (on the CPU) in place of `build_model` (GPU only)."""
    from grpo_runs import grpo_steps

    from r1mega.backends.megatron import model as megatron_model

    megatron_model.build_model = lambda cfg, parallel, dtype: build(cfg).train()
    keys = ("reward/mean", "response_length/mean", "train/loss", "train/grad_norm", "train/kl",
            "rollout/logprob_mismatch", "moe/max_over_mean_load")
    rows = {}
    for backend in ("native", "megatron"):
        steps, policy_type = grpo_steps(f"model.preset={preset}", f"model.backend={backend}")
        rows[backend] = [{k: row.get(k) for k in keys} for row in steps]
    return dict(name=preset, mode="trainer", policy_type=policy_type.__name__, **rows)


def main() -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(1, 1)
    compat.apply()
    for name in sys.argv[2:]:
        mode, _, name = name.rpartition(":")
        runner = {"policy": run_policy, "replay": run_replay, "trainer": run_trainer}.get(mode, run)
        print(json.dumps(runner(name)), flush=True)


if __name__ == "__main__":
    main()
