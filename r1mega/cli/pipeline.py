"""`r1mega-pipeline`: the whole DeepSeek-R1 recipe, stages 0-6, each evaluated, ending with a report.

    r1mega-pipeline                                     # embedded tiny default, 2-core CPU, <= 20 minutes
    r1mega-pipeline pipeline.start_stage=3              # rerun from rejection sampling, reuse stages 0-2
    r1mega-pipeline pipeline.out_dir=runs/p2 pipeline.r1_zero.steps=100 pipeline.eval.sampling.n=16

Every key of r1mega/pipeline/config.py can be overridden; the report is <pipeline.out_dir>/report.md.
"""

from __future__ import annotations

import hydra
from omegaconf import OmegaConf

from r1mega.cli.train import CONF_DIR
from r1mega.pipeline.config import PipelineConfig, register_pipeline_configs

register_pipeline_configs()


@hydra.main(config_path=CONF_DIR, config_name="pipeline", version_base=None)
def main(cfg) -> None:
    config: PipelineConfig = OmegaConf.to_object(cfg)
    from r1mega.pipeline.runner import run_pipeline

    report = run_pipeline(config)
    print(f"report: {report}")


if __name__ == "__main__":
    main()
