"""policy_model.policy_for_backend's refusals: the megatron backend under torchrun runs tensor parallel
for dense models only, and no expert parallelism."""

from types import SimpleNamespace

import pytest
from torch import nn

from r1mega.models.config import tiny_deepseek_v3
from r1mega.trainers.policy_model import policy_for_backend


@pytest.mark.parametrize("split, match", [({"tp": 2}, "parallel.tp=2 with model.backend=megatron runs dense models"),
                                          ({"ep": 2}, "parallel.ep=2 is not supported")])
def test_megatron_under_torchrun_refuses_moe_tensor_and_expert_parallel(split, match):
    dims = SimpleNamespace(**{"tp": 1, "ep": 1, **split})
    dp = SimpleNamespace(distributed=True, dims=dims, parallel_cfg=None)
    moe_policy = nn.Linear(2, 2)
    moe_policy.config = tiny_deepseek_v3()
    with pytest.raises(ValueError, match=match):
        policy_for_backend(SimpleNamespace(backend="megatron"), moe_policy, dp)
