"""Training throughput of the two backends on the same model: tokens/s of forward + GRPO loss + backward.

    python benchmarks/megatron_vs_native.py                      # both models, bf16, 8 x 1024 tokens
    python benchmarks/megatron_vs_native.py --batch 4 --seq 2048 --json out.json

Two ~100-200M-parameter models (a DeepSeek-V3-style MLA + MoE one and a Qwen2-style dense one), each
built natively (`r1mega.models.Transformer`) and with megatron-core (`r1mega.backends.megatron`, TE
when installed, else the local spec with SDPA core attention), the megatron one loaded with the native
weights. Each step is what the trainer runs: final hidden states, `linear_grpo_loss` against the
output matrix (no [B, T, V] logits), backward. Medians of `--repeat` steps after `--warmup` steps;
peak memory is the allocator's peak above what was live before the step. One GPU, one process (world
of one, TP=1). Prints a table and, with --json, writes the rows.

Deliberately left out: the optimizer step (identical for both), activation checkpointing, tensor or
expert parallelism (one GPU), CPU runs (megatron-core needs CUDA).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import bench_models  # noqa: E402  (benchmarks/, this script's folder)
from r1mega.models.config import ModelConfig  # noqa: E402

MODELS = {
    # bench_models' 0.7 B MoE, shallower and with half the experts (the shape RESULTS.md's numbers are of).
    "deepseek_v3_moe": lambda: dataclasses.replace(bench_models.config("moe_0p7b"), vocab_size=32000,
                                                   num_hidden_layers=8, n_routed_experts=16),
    "qwen2_dense": lambda: ModelConfig(
        architecture="Qwen2ForCausalLM", vocab_size=32000, hidden_size=1024, intermediate_size=2816,
        num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4, attention_bias=True,
        rope_theta=1e6, max_position_embeddings=4096),
}


def _step_fn(kind: str, model, mb, batch: dict):
    from r1mega.ops.linear_grpo_loss import linear_grpo_loss

    def step():
        if kind == "native":
            loss, _ = linear_grpo_loss(model(batch["ids"], return_hidden=True), model.output_weight, batch["targets"],
                                       batch["old"], batch["ref"], batch["adv"], batch["mask"])
        else:
            loss, _ = mb.grpo_loss(model, batch["ids"], batch["targets"], batch["old"], batch["ref"], batch["adv"],
                                   batch["mask"])
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def measure(step, warmup: int, repeat: int) -> tuple[float, int]:
    """(median seconds per step, peak bytes above the live baseline)."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), torch.cuda.max_memory_allocated() - baseline


def run(names: list[str], batch: int, seq: int, warmup: int, repeat: int) -> list[dict]:
    from r1mega.backends import megatron as mb
    from r1mega.models.transformer import Transformer

    rows = []
    for name in names:
        cfg = MODELS[name]()
        torch.manual_seed(0)
        native = Transformer(cfg).to(device="cuda", dtype=torch.bfloat16).train()
        megatron = mb.build_model(cfg, dtype=torch.bfloat16)
        mb.load_native_weights(megatron, cfg, native.state_dict().items())
        megatron.train()
        ids = torch.randint(0, cfg.vocab_size, (batch, seq), device="cuda")
        data = dict(ids=ids, targets=torch.roll(ids, -1, 1), old=torch.full((batch, seq), -5.0, device="cuda"),
                    ref=torch.full((batch, seq), -5.0, device="cuda"), adv=torch.randn(batch, device="cuda"),
                    mask=torch.ones(batch, seq, device="cuda"))
        params = sum(p.numel() for p in native.parameters())
        for kind, model in (("native", native), ("megatron", megatron)):
            seconds, peak = measure(_step_fn(kind, model, mb, data), warmup, repeat)
            rows.append(dict(model=name, backend=kind, params_m=params / 1e6, tokens=batch * seq,
                             step_ms=seconds * 1e3, tokens_per_s=batch * seq / seconds, peak_gib=peak / 2**30,
                             te=mb.have_transformer_engine() if kind == "megatron" else None))
            print(json.dumps(rows[-1]), flush=True)
        del native, megatron
        torch.cuda.empty_cache()
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'model':<18} {'backend':<9} {'params M':>9} {'step ms':>9} {'tokens/s':>11} {'peak GiB':>9}"]
    for r in rows:
        lines.append(f"{r['model']:<18} {r['backend']:<9} {r['params_m']:9.1f} {r['step_ms']:9.1f} "
                     f"{r['tokens_per_s']:11.0f} {r['peak_gib']:9.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("megatron_vs_native: needs a CUDA device (megatron-core allocates on the GPU)", file=sys.stderr)
        return 1
    torch.cuda.set_device(0)
    if not torch.distributed.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port))
        torch.distributed.init_process_group("nccl", rank=0, world_size=1)
    rows = run(args.models, args.batch, args.seq, args.warmup, args.repeat)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
