"""The native rollout engine: throughput against transformers' `generate`, weight-swap time against a
plain copy of the same bytes, and one long generation's time and peak memory, all on one model.

    python benchmarks/rollout.py                       # batch 64, prompt 64, output 512; 65,536-token run
    python benchmarks/rollout.py --quick               # batch 16, prompt 32, output 64; 2,048-token run
    python benchmarks/rollout.py --long-tokens 8192 --json rollout.json
    python benchmarks/rollout.py --preset moe_0p7b --dtype bfloat16 --long-tokens 0   # a GPU's run (gpu_check.py c)

- Throughput: `batch` random prompts of `prompt` tokens, `output` new tokens each, sampled at
  temperature 1 with no stop condition (every sequence has the same length, so continuous batching
  gains nothing here: this measures the decode loop itself). transformers runs `generate` with
  do_sample=True, top_k=0, min_new_tokens=output on the same weights (saved with r1mega.models.hf).
  The two alternate `--throughput-repeat` times; each side's fastest run counts. Both hold the weights
  in `--dtype` (float32 by default; bf16 is what a GPU run decodes in).
- Weight swap: `update_weights` with a full native state_dict of another model, against a loop of
  `copy_` between the same tensors; medians of `repeat` runs.
- Long generation: one sequence of `long_tokens` new tokens in an engine sized for it (one slot); time
  and peak memory (CUDA: max_memory_allocated; CPU: peak resident set size, VmHWM), measured first,
  in a fresh process state, and the KV cache's bytes.

Deliberately left out: asserting on timings, CUDA graphs, other engines (SGLang has its own benchmarks).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # from a checkout

import bench_models  # noqa: E402
from r1mega.models import Transformer, hf  # noqa: E402
from r1mega.models.kv_cache import KVCache  # noqa: E402
from r1mega.rollout import SamplingParams  # noqa: E402
from r1mega.rollout.native import NativeEngine  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _rss_peak_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def long_generation(model, tokens: int, device) -> dict:
    prompt = torch.randint(0, model.config.vocab_size, (16,)).tolist()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    engine = NativeEngine(model, max_slots=1, max_len=len(prompt) + tokens, device=device)
    started = time.perf_counter()
    sample = engine.generate([prompt], SamplingParams(max_new_tokens=tokens, seed=0))[0][0]
    _sync(device)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _rss_peak_bytes()
    return {"new_tokens": len(sample.token_ids), "seconds": seconds, "tokens_per_s": len(sample.token_ids) / seconds,
            "peak_memory_bytes": peak, "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "rss_hwm",
            "kv_cache_bytes": KVCache.bytes_per_token(model.config) * engine.max_len}


def throughput(model, batch: int, prompt: int, output: int, device, repeat: int, dtype=torch.float32) -> dict:
    """Native engine and transformers `generate` on the same prompts, alternated `repeat` times; the
    fastest run of each, so that a burst of load from other jobs does not decide the ratio."""
    import transformers

    prompts = torch.randint(0, model.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(0))
    engine = NativeEngine(model, max_slots=batch, max_len=prompt + output, device=device)
    params = SamplingParams(temperature=1.0, max_new_tokens=output, seed=0)
    engine.generate(prompts[:2].tolist(), SamplingParams(max_new_tokens=4))  # warm-up
    with tempfile.TemporaryDirectory() as tmp:
        hf.save(model, tmp, overwrite=True)
        ref = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).to(device).eval()
    ids = prompts.to(device)
    kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0)
    with torch.no_grad():
        ref.generate(ids[:2], attention_mask=torch.ones_like(ids[:2]), max_new_tokens=4, **kw)  # warm-up

    def native():
        out = engine.generate(prompts.tolist(), params)
        return sum(len(g[0].token_ids) for g in out)

    def transformers_generate():
        with torch.no_grad():
            out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=output,
                               min_new_tokens=output, **kw)
        return (out.shape[1] - prompt) * batch

    runs = {"native": [], "transformers": []}
    for _ in range(repeat):
        for label, fn in (("native", native), ("transformers", transformers_generate)):
            started = time.perf_counter()
            tokens = fn()
            _sync(device)
            runs[label].append((time.perf_counter() - started, tokens))
    (native_s, native_tokens), (hf_s, hf_tokens) = min(runs["native"]), min(runs["transformers"])
    return {"batch": batch, "prompt": prompt, "output": output, "repeat": repeat, "dtype": str(dtype)[6:],
            "native_tokens_per_s": native_tokens / native_s, "native_seconds": native_s,
            "transformers_tokens_per_s": hf_tokens / hf_s, "transformers_seconds": hf_s,
            "speedup": (native_tokens / native_s) / (hf_tokens / hf_s),
            "all_seconds": {k: [round(t, 3) for t, _ in v] for k, v in runs.items()}}


def weight_swap(model, device, repeat: int) -> dict:
    engine = NativeEngine(model, max_slots=1, max_len=8, device=device)
    other = Transformer(model.config).to(device=device, dtype=next(model.parameters()).dtype)
    src = other.state_dict()
    dst = engine.model.state_dict()
    nbytes = sum(t.numel() * t.element_size() for t in src.values())

    def plain():
        with torch.no_grad():
            for name, t in src.items():
                dst[name].copy_(t)
        _sync(device)

    def swap():
        engine.update_weights(src.items(), version=engine.version + 1)
        _sync(device)

    times = {}
    for label, fn in (("plain_copy", plain), ("update_weights", swap)):
        fn()
        runs = []
        for _ in range(repeat):
            started = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - started)
        times[label] = statistics.median(runs)
    return {"bytes": nbytes, "plain_copy_s": times["plain_copy"], "update_weights_s": times["update_weights"],
            "ratio": times["update_weights"] / times["plain_copy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny_deepseek_v3",
                        help="a preset of r1mega.models.config or a name in benchmarks/bench_models.py")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="weights and cache")
    parser.add_argument("--quick", action="store_true", help="batch 16, prompt 32, output 64, long run 2,048")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--prompt", type=int)
    parser.add_argument("--output", type=int)
    parser.add_argument("--long-tokens", type=int, help="new tokens of the long generation (0: skip)")
    parser.add_argument("--repeat", type=int, default=5, help="weight swaps timed (median)")
    parser.add_argument("--throughput-repeat", type=int, default=2, help="alternated generation runs (fastest)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default="rollout_benchmark.json", help="where to save the results")
    args = parser.parse_args()
    sizes = dict(batch=16, prompt=32, output=64, long=2048) if args.quick else dict(batch=64, prompt=64, output=512, long=65536)
    batch, prompt, output = args.batch or sizes["batch"], args.prompt or sizes["prompt"], args.output or sizes["output"]
    long_tokens = sizes["long"] if args.long_tokens is None else args.long_tokens
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    model = Transformer(bench_models.config(args.preset)).to(device=device, dtype=dtype).eval()

    results = {"preset": args.preset, "device": str(device), "threads": torch.get_num_threads(),
               "parameters": sum(p.numel() for p in model.parameters())}
    if long_tokens:
        results["long_generation"] = long_generation(model, long_tokens, device)
        print("long generation:", json.dumps(results["long_generation"]), flush=True)
    results["throughput"] = throughput(model, batch, prompt, output, device, args.throughput_repeat, dtype)
    print("throughput:", json.dumps(results["throughput"]), flush=True)
    results["weight_swap"] = weight_swap(model, device, args.repeat)
    print("weight swap:", json.dumps(results["weight_swap"]), flush=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"saved {args.json}")


if __name__ == "__main__":
    main()
