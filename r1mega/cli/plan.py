"""`r1mega-plan`: before launching, the memory of every rank type and the time of every phase of a GRPO
rollout for a layout and a cluster (r1mega/plan), from the same config as r1mega-train.

    r1mega-plan                                                     # the tiny default on one 8-GPU node
    r1mega-plan experiment=r1_zero model.preset=deepseek_v3_671b cluster.nodes=64 \
        'rollout.max_new_tokens=[[0,65536]]' parallel.tp=8 parallel.ep=64
    r1mega-plan model.preset=qwen3_30b_a3b parallel.ep=8 --search  # the layouts that fit, fastest first

Prints markdown tables and a verdict; plan.json=PATH also writes JSON. Exits 1 when the layout does
not fit (the table names the overflowing term), 0 when it fits.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import OmegaConf

from r1mega.cli.train import CONF_DIR
from r1mega.plan.config import PlanConfig, register_plan_configs

register_plan_configs()


def run(config: PlanConfig) -> int:
    from pathlib import Path

    from r1mega.plan.memory import PHASES
    from r1mega.plan.report import layout_name, make_plan, markdown, to_json
    from r1mega.plan.search import search
    from r1mega.plan.workload import workload

    w = workload(config, config.cluster.world, config.plan)
    plan = make_plan(w, config.cluster, imbalance=config.plan.expert_imbalance)
    print(markdown(plan))
    if config.plan.json:
        Path(config.plan.json).write_text(to_json(plan) + "\n")
    if config.plan.search:
        ranked = search(w, config.cluster, imbalance=config.plan.expert_imbalance)
        fitting = [p for p in ranked if p.fits]
        print(f"## Search: {len(fitting)} of {len(ranked)} layouts fit\n")
        print("| # | layout | peak GiB | rollout s | largest phase |\n|---:|---|---:|---:|---|")
        for i, p in enumerate(fitting[:config.plan.top], 1):
            peak = max(r.table.total(ph) for r in p.ranks for ph in PHASES)
            slow = max(p.ranks, key=lambda r: r.seconds)
            phase = max(slow.times, key=lambda t: t.seconds)
            print(f"| {i} | {layout_name(p.workload)} | {peak / (1 << 30):.1f} | {p.step_seconds:,.0f} | "
                  f"{phase.phase} |")
        if not fitting and ranked:
            closest = min(ranked, key=lambda p: max(r.table.total(ph) for r in p.ranks for ph in PHASES))
            print(f"none fits; the closest ({layout_name(closest.workload)}): {closest.verdict()}")
    return 0 if plan.fits else 1


@hydra.main(config_path=CONF_DIR, config_name="plan", version_base=None)
def _main(cfg) -> None:
    sys.exit(run(OmegaConf.to_object(cfg)))


def main() -> None:
    # `--search` reads better than Hydra's plan.search=true; both work.
    if "--search" in sys.argv:
        sys.argv = [a for a in sys.argv if a != "--search"] + ["plan.search=true"]
    _main()


if __name__ == "__main__":
    main()
