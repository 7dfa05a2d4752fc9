"""Benchmark cases for `linear_logprob` and `linear_grpo_loss`: forward + backward against the
materialised path (logits [N, V] -> log_softmax -> gather (-> grpo_loss)), time and peak memory.

CPU: N=8192 tokens, H=1024, V=65,536 in fp32 (targets: extra peak memory <= 1/8 of the naive path,
time <= 1.3x for linear_logprob and <= 1.0x for linear_grpo_loss). CUDA: DeepSeek-V3's output layer,
H=7168, V=129,280, N=16,384 tokens in bf16. Every row counts 4 GEMMs of 2*N*H*V FLOPs per call
(logits, recomputed logits, grad_hidden, grad_weight), so TFLOP/s = FLOPs / kernel time; on CUDA (and at
toy size) a plain [N, H] x [H, V] matmul of the same dtype is timed in the same rounds, the rate the
kernel is read against. `toy`: N=256, H=64, V=1024, to check that the benchmark runs.
Deliberately left out: the vocabulary-parallel path (it adds only all-reduces of [N] vectors).
"""

from __future__ import annotations

import torch

from harness import Case
from r1mega.ops.linear_grpo_loss import linear_grpo_loss, linear_grpo_loss_reference
from r1mega.ops.linear_logprob import linear_logprob, linear_logprob_reference

SHAPES = {  # the device's size, or toy -> (N, H, V, dtype, tokens per sequence)
    "cpu": (8192, 1024, 65_536, torch.float32, 1024),
    "cuda": (16_384, 7168, 129_280, torch.bfloat16, 4096),
    "toy": (256, 64, 1024, torch.float32, 64),
}


def _inputs(device: str, size: str):
    n, h, v, dtype, t = SHAPES[size]
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=gen).to(dtype).to(device).requires_grad_()
    weight = (torch.randn(v, h, generator=gen) / h**0.5).to(dtype).to(device).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen).to(device)
    return hidden, weight, targets, t


def _case(op: str, device: str, size: str, setup, cpu_target: str) -> Case:
    n, h, v, dtype, _ = SHAPES[size]
    target = cpu_target if size == "cpu" else ">= 60% of the plain matmul" if size == "cuda" else None
    matmul = None if size == "cpu" else (n, h, v, dtype)  # the CPU's would take minutes a round
    return Case(op, f"N{n} H{h} V{v} {str(dtype)[6:]}", setup, device, target, flops=4 * 2 * n * h * v,
                matmul=matmul)


def _logprob_case(device: str, size: str) -> Case:
    def setup():
        hidden, weight, targets, _ = _inputs(device, size)

        def run(kernel: bool):
            if kernel:
                logp, entropy = linear_logprob(hidden, weight, targets)
            else:
                logp, entropy = linear_logprob_reference(hidden, weight, targets)
            return torch.autograd.grad((logp + 0.01 * entropy).sum(), (hidden, weight))

        return (lambda: run(False)), (lambda: run(True))

    return _case("linear_logprob_fwd_bwd", device, size, setup, "mem <= 1/8 ref, time <= 1.3x ref")


def _grpo_case(device: str, size: str) -> Case:
    def setup():
        hidden, weight, targets, t = _inputs(device, size)
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

    return _case("linear_grpo_loss_fwd_bwd", device, size, setup, "mem <= 1/8 ref, time <= 1.0x ref")


def cases(device: str, toy: bool = False) -> list[Case]:
    size = "toy" if toy else device
    return [_logprob_case(device, size), _grpo_case(device, size)]
