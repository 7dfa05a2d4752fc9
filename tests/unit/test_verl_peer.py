"""RLOO, REINFORCE++ (with and without the group baseline), TIS weights and the rejection masks against
verl 0.9.1's own functions, a peer reference. Skipped unless R1MEGA_VERL_SRC names an unpacked verl wheel:

    pip download verl==0.9.1 --no-deps -d /tmp/verl && unzip -q /tmp/verl/verl-0.9.1-*.whl -d /tmp/verl/src
    R1MEGA_VERL_SRC=/tmp/verl/src pytest tests/unit/test_verl_peer.py

verl runs in a subprocess (tests/verl_peer.py), which stubs the libraries its package imports and these
functions never use."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from r1mega.ops.outcome_advantages import reinforce_pp_advantages, rloo_advantages
from r1mega.ops.rollout_correction import importance_weights, rejection_mask

VERL = os.environ.get("R1MEGA_VERL_SRC", "")
pytestmark = pytest.mark.skipif(not (VERL and Path(VERL, "verl").is_dir()),
                                reason="R1MEGA_VERL_SRC is not set to an unpacked verl wheel (module docstring)")
PEER = Path(__file__).resolve().parents[1] / "verl_peer.py"


def test_matches_verl(tmp_path):
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 12, (12,), generator=gen)
    mask = (torch.arange(12)[None] < lengths[:, None]).float()
    engine = (-2.0 + torch.randn(12, 12, generator=gen)) * mask
    inputs = {"rewards": torch.randint(0, 3, (12,), generator=gen).float() / 2, "mask": mask, "group_size": 4,
              "engine_logp": engine, "old_logp": (engine + 0.4 * torch.randn(12, 12, generator=gen)) * mask,
              "threshold": 1.5}
    torch.save(inputs, tmp_path / "in.pt")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([VERL, os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, str(PEER), str(tmp_path / "in.pt"), str(tmp_path / "out.pt")], env=env,
                   check=True, timeout=600)
    verl = torch.load(tmp_path / "out.pt")
    rewards, old = inputs["rewards"], inputs["old_logp"]
    ours = {"rloo": rloo_advantages(rewards, 4), "reinforce_pp": reinforce_pp_advantages(rewards, mask),
            "reinforce_pp_baseline": reinforce_pp_advantages(rewards, mask, group_size=4)}
    for name, value in ours.items():  # verl's are per token, the sample's value on each valid token
        torch.testing.assert_close(value[:, None] * mask, verl[name].float(), rtol=1e-5, atol=1e-5, msg=name)
    for level in ("token", "sequence"):
        torch.testing.assert_close(importance_weights(old, engine, mask, level=level, cap=1.5),
                                   verl[f"weights_{level}"].float(), rtol=1e-5, atol=1e-6, msg=level)
    for level in ("token", "sequence", "geometric"):
        torch.testing.assert_close(rejection_mask(old, engine, mask, level=level, threshold=1.5),
                                   verl[f"mask_{level}"].float(), msg=level)
