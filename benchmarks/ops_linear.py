"""Benchmark cases for `linear_logprob` and `linear_grpo_loss`: forward + backward against the
materialised path (logits [N, V] -> log_softmax -> gather (-> grpo_loss)), time and peak memory.

CPU: N=8192 tokens, H=1024, V=65,536 in fp32 (targets: extra peak memory <= 1/8 of the naive path,
time <= 1.3x for linear_logprob and <= 1.0x for linear_grpo_loss). CUDA: DeepSeek-V3's output layer,
H=7168, V=129,280, N=16,384 tokens in bf16; the `target` column gives the flops per call (4 GEMMs of
2*N*H*V: logits, recomputed logits, grad_hidden, grad_weight), so TFLOP/s = flops / kernel time.
Deliberately left out: the vocabulary-parallel path (it adds only all-reduces of [N] vectors).
"""

from __future__ import annotations

import torch

from harness import Case
from r1mega.ops.linear_grpo_loss import linear_grpo_loss, linear_grpo_loss_reference
from r1mega.ops.linear_logprob import linear_logprob, linear_logprob_reference

SHAPES = {  # device -> (N, H, V, dtype, tokens per sequence)
    "cpu": (8192, 1024, 65_536, torch.float32, 1024),
    "cuda": (16_384, 7168, 129_280, torch.bfloat16, 4096),
}


def _inputs(device: str):
    n, h, v, dtype, t = SHAPES[device]
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=gen).to(dtype).to(device).requires_grad_()
    weight = (torch.randn(v, h, generator=gen) / h**0.5).to(dtype).to(device).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen).to(device)
    return hidden, weight, targets, t


def _target(device: str, flop_gemms: int, cpu_target: str) -> str:
    n, h, v, _, _ = SHAPES[device]
    if device == "cpu":
        return cpu_target
    return f"{flop_gemms * 2 * n * h * v / 1e12:.2f} TFLOP/call; >= 480 TFLOP/s"


def _logprob_case(device: str) -> Case:
    def setup():
        hidden, weight, targets, _ = _inputs(device)

        def run(kernel: bool):
            if kernel:
                logp, entropy = linear_logprob(hidden, weight, targets)
            else:
                logp, entropy = linear_logprob_reference(hidden, weight, targets)
            return torch.autograd.grad((logp + 0.01 * entropy).sum(), (hidden, weight))

        return (lambda: run(False)), (lambda: run(True))

    n, h, v, dtype, _ = SHAPES[device]
    target = _target(device, 4, "mem <= 1/8 ref, time <= 1.3x ref")
    return Case("linear_logprob_fwd_bwd", f"N{n} H{h} V{v} {str(dtype)[6:]}", setup, device, target)


def _grpo_case(device: str) -> Case:
    def setup():
        hidden, weight, targets, t = _inputs(device)
        b = hidden.shape[0] // t
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():  # old/ref policies near the current one, as in training
            logp = linear_logprob(hidden, weight, targets)[0].view(b, t).cpu()
        old = (logp + 0.1 * torch.randn(b, t, generator=gen)).to(device)
        ref = (logp + 0.1 * torch.randn(b, t, generator=gen)).to(device)
        adv = torch.randn(b, generator=gen).to(device)
        mask = (torch.rand(b, t, generator=gen) > 0.1).to(device)
        args = (targets.view(b, t), old, ref, adv, mask)
        h3 = hidden.view(b, t, -1)

        def run(fn):
            loss, _ = fn(h3, weight, *args)
            return torch.autograd.grad(loss, (hidden, weight))

        return (lambda: run(linear_grpo_loss_reference)), (lambda: run(linear_grpo_loss))

    n, h, v, dtype, _ = SHAPES[device]
    target = _target(device, 4, "mem <= 1/8 ref, time <= 1.0x ref")
    return Case("linear_grpo_loss_fwd_bwd", f"N{n} H{h} V{v} {str(dtype)[6:]}", setup, device, target)


def cases(device: str) -> list[Case]:
    return [_logprob_case(device), _grpo_case(device)]
