"""`r1mega-train`: GRPO from a Hydra config (default: the embedded tiny R1-Zero experiment).

    r1mega-train                                    # tiny DeepSeek-V3-style MoE, CPU, minutes
    r1mega-train algo.lr=1e-5 train.steps=100       # any key of r1mega/config.py
    r1mega-train experiment=r1_zero model.path=/ckpt/base data.path=/data/math.jsonl
    torchrun --nproc-per-node 8 -m r1mega.cli.train parallel.tp=2 ...
"""

from __future__ import annotations

import os
from pathlib import Path

import hydra
from omegaconf import OmegaConf

from r1mega.config import Config, register_configs

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
register_configs()


@hydra.main(config_path=CONF_DIR, config_name="config", version_base=None)
def main(cfg) -> None:
    config: Config = OmegaConf.to_object(cfg)
    from r1mega.trainers.evaluate import held_out_report
    from r1mega.trainers.grpo import train

    final = train(config)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return
    initial = {k.removesuffix("_initial"): v for k, v in final.items() if k.endswith("_initial")}
    lines = held_out_report(final, initial or None)
    if lines:
        print("\n".join(["base -> after GRPO:" if initial else "after GRPO:", *lines]))
    print(f"metrics and plots in {config.train.out_dir}")


if __name__ == "__main__":
    main()
