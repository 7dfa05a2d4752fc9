"""One GRPO training step as the trainer runs it, timed: tokens/s and MFU.

    python benchmarks/grpo_step.py                                  # moe_0p7b, bf16, 16,384-token micro-batches
    python benchmarks/grpo_step.py --model toy --device cpu --dtype float32 --prompt 16 --response 48 \\
        --token-budget 256 --questions 2 --group 2 --steps 1          # the dry run's toy size

A step is what `GRPOTrainer.train_step` does after generation and scoring, on a synthetic rollout:
`--questions` prompts of `--prompt` random tokens, `--group` responses of `--response` tokens each,
random 0/1 rewards. It computes the reference model's logprobs (`sequence_logprobs`, no grad), the
group advantages, then one on-policy `update_policy` (one mini-batch of the whole rollout: packed
micro-batches of `--token-budget` tokens, each a forward with shared prompts, the fused
`linear_grpo_loss`, a backward; gradient clipping and an AdamW step). The defaults make each
micro-batch exactly one group: 8 sequences of 512 + 1,536 tokens = 16,384 tokens by the trainer's
budget (which counts every sequence's prompt), 512 + 8 x 1,536 = 12,800 tokens through the model.

- tokens/s: prompt + response tokens of every sample (the trainer's `throughput/train_tokens_per_s`)
  over the step's wall time (reference pass + advantages + update), median of `--steps` after one
  warm-up step.
- MFU: model FLOPs (model_flops.py: the reference pass 1 x forward, the update 3 x, from the config and
  the batch's layout) over the step's time, against the peak dense rate: `--peak-tflops`, else the
  datasheet's for a known GPU (H100/H200 SXM: 989 TFLOP/s dense bf16), and against a bf16 (on the
  CPU: the model's dtype) [8192, 8192] x [8192, 8192] matmul timed in the same run.

The weights and AdamW run in `--dtype` (bf16 by default on CUDA): r1mega's trainer itself keeps fp32
weights (AdamW without a master copy, r1mega/config.py), so this measures the step's arithmetic in the
dtype a GPU run would compute in, not the trainer's fp32 run. Deliberately left out: generation,
scoring, weight sync to the engine (their own benchmarks), data parallelism, activation checkpointing.
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import random
import statistics
import sys
import time

import torch

_HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE), str(_HERE.parent)]  # bench_models, model_flops and r1mega from a checkout

import bench_models  # noqa: E402
import model_flops  # noqa: E402
from r1mega.config import AlgoConfig  # noqa: E402
from r1mega.models import Transformer  # noqa: E402
from r1mega.ops.group_advantages import group_advantages  # noqa: E402
from r1mega.trainers.policy_update import sequence_logprobs, update_policy  # noqa: E402
from r1mega.trainers.rollout_batch import RolloutBatch  # noqa: E402

DATASHEET_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16, SXM parts (NVIDIA's datasheets, no sparsity)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def synthetic_rollout(vocab: int, questions: int, group: int, prompt: int, response: int) -> RolloutBatch:
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, vocab, (prompt,), generator=gen).tolist() for _ in range(questions)]
    samples = questions * group
    ids = torch.randint(1, vocab, (samples, response), generator=gen)
    rewards = (torch.rand(samples, generator=gen) > 0.5).float()
    return RolloutBatch([prompts[i // group] for i in range(samples)], ids, torch.ones(samples, response),
                        torch.zeros(samples, response), rewards)


def step_flops(cfg, batch: RolloutBatch, token_budget: int) -> int:
    """Model FLOPs of one step: the reference pass (1 x forward) and the update (3 x forward), over the
    micro-batches the trainer packs: each reads one copy of every prompt it holds (token_batch.py)."""
    forward = 0
    for index in batch.micro_batches(token_budget):
        micro = batch.select(index)
        responses = micro.mask.sum(1).long().tolist()
        trunk = head = pairs = 0
        for members in micro.prompt_groups():
            prompt, own = len(micro.prompt_ids[members[0]]), [responses[i] for i in members]
            trunk += prompt + sum(own)
            head += sum(own)
            pairs += model_flops.shared_prefix_pairs(prompt, own)
        forward += model_flops.forward_flops(cfg, trunk_tokens=trunk, head_tokens=head, attention_pairs=pairs)
    return 4 * forward


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, repeat: int = 5) -> float:
    """TFLOP/s of an [n, n] x [n, n] product in `dtype` on `device`, median of `repeat` after a warm-up."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    a @ b
    times = []
    for _ in range(repeat):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e12


def run(args) -> dict:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cfg = bench_models.config(args.model)
    if args.prompt + args.response > cfg.max_position_embeddings:
        raise SystemExit(f"--prompt + --response exceeds the model's {cfg.max_position_embeddings} positions")
    torch.manual_seed(0)
    policy = Transformer(cfg).to(device=device, dtype=dtype).train()
    reference = copy.deepcopy(policy).eval()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6, betas=(0.9, 0.95))
    algo = AlgoConfig(train_batch_size=args.questions, ppo_mini_batch_size=args.questions, group_size=args.group,
                      token_budget=args.token_budget)
    shuffle = random.Random(0)

    def step() -> float:
        batch = synthetic_rollout(cfg.vocab_size, args.questions, args.group, args.prompt, args.response)
        _sync(device)
        start = time.perf_counter()
        batch.ref_logp = sequence_logprobs(reference, batch, temperature=1.0, token_budget=algo.token_budget,
                                           device=device)
        batch.advantages = group_advantages(batch.rewards, group_size=algo.group_size)
        update_policy(policy, optimizer, batch, algo, max_new_tokens=args.response, temperature=1.0, device=device,
                      generator=shuffle)
        _sync(device)
        return time.perf_counter() - start

    step()  # warm-up: allocator, cuBLAS handles, kernel caches
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = statistics.median(step() for _ in range(args.steps))
    batch = synthetic_rollout(cfg.vocab_size, args.questions, args.group, args.prompt, args.response)
    micro = batch.micro_batches(args.token_budget)
    flops = step_flops(cfg, batch, args.token_budget)
    samples = args.questions * args.group
    tokens = samples * (args.prompt + args.response)
    achieved = flops / seconds / 1e12
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or next((v for k, v in DATASHEET_TFLOPS.items() if k in name), None)
    matmul = matmul_tflops(device, torch.bfloat16 if device.type == "cuda" else dtype, args.matmul_size)
    return {
        "model": args.model, "parameters": sum(p.numel() for p in policy.parameters()),
        "active_weights_per_token": model_flops.active_weights(cfg) + cfg.hidden_size * cfg.vocab_size,
        "device": name, "dtype": args.dtype, "torch": torch.__version__,
        "questions": args.questions, "group": args.group, "prompt": args.prompt, "response": args.response,
        "token_budget": args.token_budget, "micro_batches": len(micro),
        "budget_tokens_per_micro_batch": [sum(batch.lengths()[i] for i in m) for m in micro],
        "tokens_per_step": tokens, "step_s": seconds, "steps_timed": args.steps, "tokens_per_s": tokens / seconds,
        "flops_per_step": flops, "achieved_tflops": achieved,
        "peak_tflops": peak, "mfu": achieved / peak if peak else None,
        "matmul_tflops": matmul, "matmul_size": args.matmul_size, "mfu_vs_matmul": achieved / matmul,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "flops_formula": "benchmarks/model_flops.py: 4 x forward (reference pass + 3 x for the update)",
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="moe_0p7b", help="a name in bench_models.MODELS or an r1mega preset")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on CUDA, else float32")
    parser.add_argument("--questions", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--response", type=int, default=1536)
    parser.add_argument("--token-budget", type=int, default=16384, help="tokens per micro-batch (algo.token_budget)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up (median)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak dense TFLOP/s for the MFU")
    parser.add_argument("--matmul-size", type=int, default=8192, help="n of the n x n x n matmul timed as a ceiling")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", default=None, help="where to save the result")
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    print(json.dumps(result, indent=2), flush=True)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
