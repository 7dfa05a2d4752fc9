"""r1mega-plan's predicted peak training memory against the measured peak of a CPU run (target: within 15%).

    python benchmarks/plan_vs_measured.py                       # tiny default, 8192-token micro-batch, 3 modes
    python benchmarks/plan_vs_measured.py --modes full --token-budget 4096

The run holds what a one-process GRPOTrainer holds while it trains (r1mega/trainers/grpo.py): the
policy (activation checkpointing applied by DataParallel.parallelize, as the trainer does), the
reference (its deep copy), the native engine's own float32 copy with its KV cache released (as
`release_memory` leaves it for training), AdamW, then `update_policy` on a synthetic rollout of
`--samples` samples of `--prompt` + `--response` tokens (each sample its own prompt), packed into
micro-batches of `--token-budget` tokens. One warm-up step creates the gradients and AdamW states;
the second step runs with everything in place.

Measured: every CPU allocation and free from before the models are built to the end of the second
step (torch.profiler's allocator events, profile_memory=True); the peak of their running sum (a
training step's: nothing else allocates as much). Predicted: the plan's training-phase total for the
same config (cluster.device=cpu, one GPU of unbounded memory, no reserve).
Writes benchmarks/results/plan_vs_measured.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import random
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402


def measured_peak(mode: str, args) -> int:
    from r1mega.config import AlgoConfig, ParallelConfig
    from r1mega.models.config import tiny_deepseek_v3
    from r1mega.models.transformer import Transformer
    from r1mega.rollout.native import NativeEngine
    from r1mega.trainers.data_parallel import DataParallel
    from r1mega.trainers.policy_update import update_policy
    from r1mega.trainers.rollout_batch import RolloutBatch

    algo = AlgoConfig(train_batch_size=args.samples, ppo_mini_batch_size=args.samples, group_size=1,
                      token_budget=args.token_budget, clip_low=0.2, clip_high=0.2)
    gen = torch.Generator().manual_seed(0)
    s, p, r = args.samples, args.prompt, args.response
    config = tiny_deepseek_v3()
    prompts = [torch.randint(3, config.vocab_size, (p,), generator=gen).tolist() for _ in range(s)]
    response_ids = torch.randint(3, config.vocab_size, (s, r), generator=gen)
    mask = torch.ones(s, r)

    def batch():
        b = RolloutBatch(prompts, response_ids, mask, engine_logp=torch.zeros(s, r),
                         rewards=torch.rand(s, generator=gen))
        b.advantages = torch.randn(s, generator=gen)
        b.ref_logp = torch.zeros(s, r) - 1.0
        return b

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.manual_seed(0)
        policy = Transformer(config)
        dp = DataParallel(parallel_cfg=ParallelConfig(activation_checkpointing=mode))
        reference = dp.parallelize(copy.deepcopy(policy).requires_grad_(False).eval())
        engine = NativeEngine(policy, max_slots=4, max_len=p + r)
        engine.release_memory()
        policy = dp.parallelize(policy)
        optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4)
        kw = dict(max_new_tokens=r, temperature=1.0, device="cpu", generator=random.Random(0))
        update_policy(policy, optimizer, batch(), algo, **kw)  # warm-up: gradients and AdamW states exist
        update_policy(policy, optimizer, batch(), algo, **kw)
        keep = (reference, engine)  # alive to the end, as in the trainer
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    del keep
    now = peak = 0
    for _, nbytes in events:  # every allocation since before the models existed: the running sum is what is live
        now += nbytes
        peak = max(peak, now)
    return peak


def predicted_peak(mode: str, args) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from r1mega.cli.train import CONF_DIR
    from r1mega.plan.config import register_plan_configs
    from r1mega.plan.report import make_plan
    from r1mega.plan.workload import workload

    register_plan_configs()
    overrides = [f"parallel.activation_checkpointing={mode}", f"algo.token_budget={args.token_budget}",
                 f"plan.prompt_tokens={args.prompt}", f"rollout.max_new_tokens=[[0,{args.response}]]",
                 f"algo.train_batch_size={args.samples}", f"algo.ppo_mini_batch_size={args.samples}",
                 "algo.group_size=1", "rollout.max_slots=4", "cluster.gpus_per_node=1", "cluster.device=cpu",
                 "cluster.reserved_bytes=0", f"cluster.hbm_bytes={1 << 40}", "model.preset=tiny_deepseek_v3"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = OmegaConf.to_object(compose(config_name="plan", overrides=overrides))
    w = workload(cfg, 1, cfg.plan)
    w.micro_tokens = args.token_budget  # the budget the run packs to (the samples fill it exactly)
    plan = make_plan(w, cfg.cluster)
    table = plan.ranks[0].table
    return {"total": table.total("training"), "terms": {t: row["training"] for t, row in table.terms.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", nargs="+", default=["none", "selective", "full"])
    ap.add_argument("--token-budget", type=int, default=8192)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=8)
    ap.add_argument("--response", type=int, default=120)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "plan_vs_measured.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for mode in args.modes:
        measured = measured_peak(mode, args)
        predicted = predicted_peak(mode, args)
        error = predicted["total"] / measured - 1
        rows.append({"mode": mode, "measured_bytes": measured, "predicted_bytes": predicted["total"],
                     "error": error, "within_15_percent": abs(error) <= 0.15, "predicted_terms": predicted["terms"]})
        print(f"{mode:9s} measured {measured / 2**20:8.1f} MiB  predicted {predicted['total'] / 2**20:8.1f} MiB  "
              f"error {error:+.1%}")
    result = {"model": "tiny_deepseek_v3", "token_budget": args.token_budget, "samples": args.samples,
              "prompt": args.prompt, "response": args.response, "torch": torch.__version__, "rows": rows}
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
