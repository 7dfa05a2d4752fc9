"""r1mega.parallel.grad_clip in one process (plain tensors): the norm and the clipped gradients of
torch.nn.utils.clip_grad_norm_, and a non-finite norm returned as it is. The distributed layouts (TP,
EP, FSDP and their mixes) are checked in tests/distributed/parity.py."""

import math

import torch
from torch import nn

from r1mega.parallel.grad_clip import clip_grad_norm


def _model_with_grads(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    model(torch.randn(4, 5)).square().sum().backward()
    return model


def test_matches_torch_when_clipping_and_when_not():
    for max_norm in (0.1, 1e6):
        ours, ref = _model_with_grads(), _model_with_grads()
        norm = clip_grad_norm(ours.parameters(), max_norm)
        torch.testing.assert_close(norm, torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm))
        for p, q in zip(ours.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad)


def test_parameters_without_gradients_are_skipped():
    model = _model_with_grads()
    model[0].weight.grad = None
    assert clip_grad_norm(model.parameters(), 1.0) > 0
    assert clip_grad_norm([nn.Parameter(torch.ones(2))], 1.0) == 0  # no gradient at all


def test_non_finite_norm_is_returned():
    for bad, check in ((float("nan"), math.isnan), (float("inf"), math.isinf)):
        model = _model_with_grads()
        model[2].bias.grad[0] = bad
        assert check(clip_grad_norm(model.parameters(), 1.0))
