"""Data-parallel scaling of a training step on CPU: tokens/s at world size 1 and 2 (gloo, FSDP2).

    python benchmarks/scaling.py                         # worlds 1 2, 5 timed steps, JSON to scaling.json
    python benchmarks/scaling.py --worlds 1 2 4 --steps 10 --batch 4 --seq 256 --json out.json

One step is forward + backward + AdamW step of the tiny DeepSeek-V3 preset on random tokens, next-token
cross-entropy. Weak scaling: every rank gets its own `batch` x `seq` tokens, so a world of P processes
`P * batch * seq` tokens per step; tokens/s divides that by the slowest rank's time per step (median
of the timed steps, after `warmup` untimed ones, each step between barriers). Each rank is one process
with one intra-op thread; world 1 is the plain model in one process (parallelize applies no FSDP to a
world of one), world > 1 shards it with FSDP2 over all ranks. The efficiency column is
tokens/s(P) / (P * tokens/s(1)).

On a shared machine the number is what the cores gave while others used them too: the load average
before each run is printed and saved next to the numbers.
Deliberately left out: tensor/expert/pipeline layouts, GPUs (NCCL), and any assertion on the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, args, out_path: str) -> None:
    from types import SimpleNamespace

    from r1mega.models import Transformer, preset
    from r1mega.parallel import ParallelDims, parallelize

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        dims = ParallelDims(world, dp_shard=world)
        dims.build_mesh("cpu")
        torch.manual_seed(0)  # the same initial weights on every rank
        model = parallelize(Transformer(preset("tiny_deepseek_v3", vocab_size=args.vocab)), dims,
                            SimpleNamespace(activation_checkpointing="none"))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(1 + rank)  # each rank its own share of the data

        def step() -> float:
            ids = torch.randint(args.vocab, (args.batch, args.seq + 1), generator=gen)  # [B, T+1]
            dist.barrier()
            start = time.perf_counter()
            logits = model(ids[:, :-1])  # [B, T, V]
            F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            dist.barrier()
            return time.perf_counter() - start

        for _ in range(args.warmup):
            step()
        seconds = torch.tensor(statistics.median(step() for _ in range(args.steps)))
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # the step is as slow as its slowest rank
        if rank == 0:
            Path(out_path).write_text(json.dumps({"step_s": seconds.item()}))
    finally:
        dist.destroy_process_group()


def run(world: int, args) -> dict:
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(_rank_main, args=(world, _free_port(), args, out), nprocs=world, join=True)
        step_s = json.loads(Path(out).read_text())["step_s"]
    tokens = world * args.batch * args.seq
    return {"world": world, "tokens_per_step": tokens, "step_s": step_s, "tokens_per_s": tokens / step_s,
            "load_avg_1min_before": load}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=4, help="rows per rank per step")
    parser.add_argument("--seq", type=int, default=128, help="tokens per row")
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", default="scaling.json")
    args = parser.parse_args()

    cores = os.cpu_count()
    note = (f"note: {cores} CPU cores on this machine, shared with whatever else runs on it; each rank uses "
            f"1 thread, so world sizes above {cores} oversubscribe, and the numbers move with the load.")
    print(note, flush=True)
    print(f"{'world':>5} {'tokens/step':>12} {'step s':>9} {'tokens/s':>10} {'vs world 1':>10} {'efficiency':>10} "
          f"{'load':>6}", flush=True)
    rows = []
    for world in args.worlds:
        row = run(world, args)
        base = next((r for r in rows if r["world"] == 1), None)
        if base is not None:
            row["ratio_vs_world1"] = row["tokens_per_s"] / base["tokens_per_s"]
            row["efficiency"] = row["ratio_vs_world1"] / world
        rows.append(row)
        ratio = f"{row['ratio_vs_world1']:10.2f}" if "ratio_vs_world1" in row else f"{'':10}"
        eff = f"{row['efficiency']:10.2f}" if "efficiency" in row else f"{'':10}"
        print(f"{world:>5} {row['tokens_per_step']:>12} {row['step_s']:9.3f} {row['tokens_per_s']:10.0f} {ratio} {eff} "
              f"{row['load_avg_1min_before']:6.1f}", flush=True)
    with open(args.json, "w") as f:
        json.dump({"torch": torch.__version__, "cpu_count": cores, "note": note, "batch_per_rank": args.batch,
                   "seq": args.seq, "model": "tiny_deepseek_v3", "rows": rows}, f, indent=2)
    print(f"saved {args.json}")


if __name__ == "__main__":
    main()
