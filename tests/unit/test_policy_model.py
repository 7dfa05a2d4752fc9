"""policy_model.policy_for_backend's refusals: the megatron backend under torchrun runs data parallel only."""

from types import SimpleNamespace

import pytest
from torch import nn

from r1mega.trainers.policy_model import policy_for_backend


@pytest.mark.parametrize("split", [{"tp": 2}, {"ep": 2}])
def test_megatron_under_torchrun_refuses_tensor_and_expert_parallel(split):
    dims = SimpleNamespace(**{"tp": 1, "ep": 1, **split})
    dp = SimpleNamespace(distributed=True, dims=dims, parallel_cfg=None)
    key = next(iter(split))
    with pytest.raises(ValueError, match=f"parallel.{key}=2"):
        policy_for_backend(SimpleNamespace(backend="megatron"), nn.Linear(2, 2), dp)
