"""Runs verl's own functions (verl 0.9.1, a peer reference) on the tensors in argv[1] and saves their
outputs to argv[2]; in a subprocess of tests/unit/test_verl_peer.py, with verl's source on PYTHONPATH.

verl's package imports Ray, tensordict and two small libraries at import time that the functions used
here never call: they are stubbed in this process only."""

import importlib.machinery
import sys
from unittest import mock

import numpy as np
import torch

for name in ("ray", "tensordict", "tensordict.tensorclass", "codetiming", "orjson"):
    stub = mock.MagicMock()
    stub.__path__, stub.__spec__ = [], importlib.machinery.ModuleSpec(name, None)
    sys.modules[name] = stub

from verl.trainer.ppo import core_algos, rollout_corr_helper  # noqa: E402

inputs = torch.load(sys.argv[1])
rewards, mask, group_size = inputs["rewards"], inputs["mask"], inputs["group_size"]
lengths = mask.sum(1).long()
token_rewards = torch.zeros_like(mask)  # the outcome reward on each response's last token
token_rewards[torch.arange(len(rewards)), lengths - 1] = rewards
index = np.array([i // group_size for i in range(len(rewards))])
log_ratio = inputs["old_logp"] - inputs["engine_logp"]
threshold = inputs["threshold"]
out = {
    "rloo": core_algos.compute_rloo_outcome_advantage(token_rewards, mask, index)[0],
    "reinforce_pp": core_algos.compute_reinforce_plus_plus_outcome_advantage(
        token_rewards, mask, config=mock.Mock(gamma=1.0))[0],
    "reinforce_pp_baseline": core_algos.compute_reinforce_plus_plus_baseline_outcome_advantage(
        token_rewards, mask, index)[0],
}
for level in ("token", "sequence"):
    out[f"weights_{level}"] = rollout_corr_helper.compute_rollout_correction_weights(
        log_ratio, mask, rollout_is=level, rollout_is_threshold=threshold)[0]
for level, option in (("token", "token_k1"), ("sequence", "seq_sum_k1"), ("geometric", "seq_mean_k1")):
    out[f"mask_{level}"] = rollout_corr_helper.compute_rollout_rejection_mask(
        log_ratio, mask, rollout_rs=option, rollout_rs_threshold=threshold)[0]
torch.save(out, sys.argv[2])
