"""Peak memory and time of one forward+backward of the tiny model at long sequence lengths.

    python benchmarks/long_seq.py                      # 8,192 .. 65,536 tokens
    python benchmarks/long_seq.py --lengths 1024 2048  # a quick look
    python benchmarks/long_seq.py --pp 2 --vocab 65536 --lengths 8192   # two pipeline stages (gloo)

One packed row of T tokens; full activation checkpointing; the loss is the mean log-probability of the
next token from the final hidden states through `r1mega.ops.linear_logprob`'s compiled kernel in
vocabulary chunks of 128 rows, so no [T, V] logits tensor exists (the plain-PyTorch fallback would
build one, so the benchmark refuses to run without the kernel). Each length runs in a fresh
process: on CUDA the peak is `torch.cuda.max_memory_allocated`, on CPU the growth of the peak
resident set size over the size before the step (the libraries' fixed footprint left out). Memory
should grow linearly: the check printed at the end is peak(65,536) <= 8.5 x peak(8,192).

With `--pp N` the model is cut into N pipeline stages (r1mega.parallel.pipeline, N gloo processes under
torchrun) and the loss is the last stage's head; the peak printed is the last stage's, against the
T x V x 4 bytes that [T, V] fp32 logits would take: the last stage holds no such tensor if its peak
stays below that (at V = 65,536 the logits of 8,192 tokens would be 2 GiB).

Deliberately left out: the optimizer step (its memory does not depend on T) and other models.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

CHUNK = 128  # vocabulary rows per linear_logprob chunk: a [T, 128] buffer, a quarter of the tiny vocabulary


def one(length: int, vocab: int, pp: int) -> dict | None:
    """One step at `length` tokens; under torchrun (pp > 1) the rank holding the last stage reports."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from r1mega.ops import _extension
    from r1mega.models.config import tiny_deepseek_v3
    from r1mega.models.transformer import Transformer
    from r1mega.ops.linear_logprob import linear_logprob
    from r1mega.parallel import ParallelDims, pipeline_parallelize
    from r1mega.parallel.checkpointing import apply_activation_checkpointing

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not _extension.has_kernel("linear_logprob", device):
        raise SystemExit(f"long_seq: no compiled linear_logprob kernel for {device.type}; its fallback builds [T, V]")
    torch.manual_seed(0)
    model = Transformer(tiny_deepseek_v3(vocab, max_position_embeddings=max(length, 4096))).to(device)
    if pp > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
        dims = ParallelDims(pp, pp=pp)
        dims.build_mesh(device.type)
        model = pipeline_parallelize(model, dims, SimpleNamespace(activation_checkpointing="full"))
    else:
        apply_activation_checkpointing(model, "full")
    ids = torch.randint(vocab, (1, length + 1), device=device)

    def head(hidden, weight):  # hidden [1, T, H] -> the mean logprob's negative, through [T, CHUNK] buffers
        logp, _ = linear_logprob(hidden[0], weight, ids[0, 1:], chunk_size=CHUNK)  # [T]
        return -logp.mean(), None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    if pp > 1:
        model.run_micro_batches([(ids[:, :-1], {})], [head], backward=True)
    else:
        head(model(ids[:, :-1], return_hidden=True), model.output_weight)[0].backward()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    row = {"tokens": length, "seconds": time.perf_counter() - start, "peak_bytes": peak, "device": device.type,
           "logits_bytes": length * vocab * 4}
    if pp > 1:
        last = model.has_last
        dist.destroy_process_group()
        return row if last else None
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--pp", type=int, default=1, help="pipeline stages (processes under torchrun)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one length, print JSON
    args = parser.parse_args()
    if args.one:
        row = one(args.one, args.vocab, args.pp)
        if row is not None:
            print(json.dumps(row))
        return
    launch = [sys.executable] if args.pp == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    f"--nproc-per-node={args.pp}", "--master-port=29577"]
    rows = []
    for length in args.lengths:
        command = [*launch, __file__, "--one", str(length), "--vocab", str(args.vocab), "--pp", str(args.pp)]
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(next(line for line in out.stdout.splitlines()[::-1] if line.startswith("{"))))
        r = rows[-1]
        stage = "  (last stage)" if args.pp > 1 else ""
        print(f"{r['tokens']:>7} tokens  {r['seconds']:8.2f} s  peak {r['peak_bytes'] / 2**20:9.1f} MiB  "
              f"({r['device']}){stage}  [T, V] fp32 logits would be {r['logits_bytes'] / 2**20:.1f} MiB", flush=True)
    if len(rows) > 1:
        ratio = rows[-1]["peak_bytes"] / rows[0]["peak_bytes"]
        scale = rows[-1]["tokens"] / rows[0]["tokens"]
        bound = 8.5 * scale / 8
        print(f"peak ratio {ratio:.2f} for {scale:.0f}x the tokens (linear: {scale:.0f}; bound {bound:.2f}): "
              f"{'OK' if ratio <= bound else 'FAIL'}")


if __name__ == "__main__":
    main()
