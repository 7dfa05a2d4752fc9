"""Checks and times the SGLang engine on a GPU: generation, logprob agreement with the trainer, a weight
update, a release/resume cycle. Needs a CUDA device and SGLang (`pip install r1mega[sglang]`).

    python benchmarks/sglang_engine.py [--preset tiny_deepseek_v3] [--model-path HF_DIR] [--url URL]

Steps, each printed with its wall time (and GPU memory in use after it, from torch's view of the
device, which includes SGLang's subprocess: `torch.cuda.mem_get_info`):
1. start the engine from the policy (in process, or `--url` for a running server launched with
   `--enable-memory-saver` on this node);
2. generate G samples for a few prompts; the engine's logprobs against the policy's own at the same
   temperature (mean and max |difference| over tokens: the trainer's mismatch metric);
3. perturb the policy's weights, update the engine, check greedy outputs now follow the new weights
   (greedy tokens equal the policy's argmax chain) and time the update;
4. release memory (free memory must grow), update weights, resume, generate again.
Exits non-zero when a check fails. Deliberately left out: throughput sweeps, tensor parallel > 1.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def free_gib() -> float:
    return torch.cuda.mem_get_info()[0] / 2**30


def step(name: str, fn):
    start = time.perf_counter()
    result = fn()
    print(f"{name:<28} {time.perf_counter() - start:8.3f} s   free {free_gib():6.2f} GiB", flush=True)
    return result


@torch.no_grad()
def policy_logprobs(policy, prompt: list[int], tokens: list[int], temperature: float) -> torch.Tensor:
    ids = torch.tensor([prompt + tokens], device="cuda")
    logits = policy(ids)[0, len(prompt) - 1:-1].float() / (temperature or 1.0)  # [T, V]
    return logits.log_softmax(-1).gather(-1, ids[0, len(prompt):, None])[:, 0]


@torch.no_grad()
def greedy_chain(policy, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(policy(torch.tensor([ids], device="cuda"))[0, -1].argmax()))
    return ids[len(prompt):]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny_deepseek_v3")
    parser.add_argument("--model-path", default="", help="a HF directory instead of a random preset")
    parser.add_argument("--url", default="", help="a running SGLang server (HTTP mode)")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--mem-fraction", type=float, default=0.4)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2

    from r1mega.data.tokenizer import Tokenizer, build_default_tokenizer
    from r1mega.models import Transformer, hf, preset
    from r1mega.rollout.engine import SamplingParams
    from r1mega.config import SGLangConfig
    from r1mega.rollout.sglang import SGLangEngine

    dtype = getattr(torch, args.dtype)
    if args.model_path:
        policy, _ = hf.load(args.model_path, dtype=dtype, device="cuda")
        tokenizer = Tokenizer.from_dir(args.model_path)
    else:
        tokenizer = build_default_tokenizer()
        torch.manual_seed(0)
        policy = Transformer(preset(args.preset, vocab_size=tokenizer.vocab_size)).to("cuda", dtype)
    policy.eval()
    options = SGLangConfig(url=args.url, dtype=args.dtype, mem_fraction_static=args.mem_fraction)
    engine = step("start engine", lambda: SGLangEngine.from_policy(policy, tokenizer, options=options))
    failures = []
    try:
        prompts = [tokenizer.encode(q) for q in ("What is 17 + 25?", "Count down from 9.", "Name a prime.")]
        sampling = SamplingParams(n=args.samples, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                                  stop_token_ids=[tokenizer.eos_token_id], seed=1)
        groups = step("generate", lambda: engine.generate(prompts, sampling))
        diffs = [(torch.tensor(s.logprobs, device="cuda") - policy_logprobs(policy, s.prompt_ids, s.token_ids,
                                                                            args.temperature)).abs()
                 for g in groups for s in g if s.finish_reason != "error"]
        errors = [s.error for g in groups for s in g if s.finish_reason == "error"]
        diff = torch.cat(diffs) if diffs else torch.zeros(0)
        tokens = int(diff.numel())
        print(f"samples {sum(map(len, groups))}, tokens {tokens}, errors {len(errors)}; logprob mismatch "
              f"mean {float(diff.mean()) if tokens else float('nan'):.4f} max {float(diff.max()) if tokens else 0:.4f}")
        if errors or not tokens or float(diff.mean()) > 0.05:
            failures.append(f"generation: errors {errors[:2]}, mismatch too large or no tokens")

        with torch.no_grad():
            for p in policy.parameters():
                p.add_(0.05 * torch.randn_like(p))
        step("update_weights", lambda: engine.update_weights(policy.state_dict().items(), version=1))
        greedy = SamplingParams(temperature=0.0, max_new_tokens=16)
        [[s]] = engine.generate([prompts[0]], greedy)
        expected = greedy_chain(policy, prompts[0], len(s.token_ids))
        agree = sum(a == b for a, b in zip(s.token_ids, expected)) / max(len(expected), 1)
        print(f"greedy agreement with the updated policy: {agree:.2f} (version {engine.version})")
        if agree < 0.75:  # bf16 ties may flip a late token, not most of them
            failures.append(f"update_weights: greedy tokens follow the old weights ({agree:.2f} agreement)")

        before = free_gib()
        step("release_memory", engine.release_memory)
        if free_gib() <= before:
            failures.append("release_memory freed nothing")
        step("update_weights (released)", lambda: engine.update_weights(policy.state_dict().items(), version=2))
        step("resume_memory", engine.resume_memory)
        [[again]] = step("generate after resume", lambda: engine.generate([prompts[0]], greedy))
        if again.token_ids != s.token_ids:
            failures.append("greedy output changed across release/resume with the same weights")
    finally:
        engine.shutdown()
    for f in failures:
        print("FAIL:", f)
    print("OK" if not failures else f"{len(failures)} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
