"""r1mega-plan's predicted peak training memory against the measured peak of a CPU run (target: within 15%).

    python benchmarks/plan_vs_measured.py                       # tiny default, 8192-token budget, 3 modes, 4 layouts
    python benchmarks/plan_vs_measured.py --layouts fsdp2 --modes full --token-budget 4096

Layouts: `1proc` (one process) and, each under torchrun on 2 gloo processes (this script's --worker),
`tp2` (tp=2), `ep2` (ep=2 over dp_shard=2) and `fsdp2` (dp_shard=2). A run holds what GRPOTrainer
holds while it trains (r1mega/trainers/grpo.py): the policy and the reference (its deep copy), both
parallelized by DataParallel.parallelize (activation checkpointing, and the layout's FSDP/tp/ep, as
the trainer does), the native engine's own float32 copy with its KV cache released (as
`release_memory` leaves it for training), AdamW, then `update_policy` on a synthetic rollout of
`--samples` samples of `--prompt` + `--response` tokens (each sample its own prompt), packed into
micro-batches of `--token-budget` tokens and dealt to the data-parallel ranks (dp.shard). One warm-up
step creates the gradients and AdamW states; the second step runs with everything in place.

Measured, per rank: every CPU allocation and free from before the models are built to the end of the
second step (torch.profiler's allocation events, profile_memory=True), paired by address; the peak of
the live bytes. A free made on a thread the profiler does not watch (gloo's threads drop the last
reference to a collective's buffers) is never reported: the address being handed out again closes it.
Predicted, per rank: the plan's training-phase total for the same config and layout (cluster.device=cpu,
unbounded memory, no reserve), from that rank's shards (r1mega.plan.shards.shard_bytes).
Writes benchmarks/results/plan_vs_measured.json; rows of layouts and modes not run this time stay.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import pathlib
import random
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch._C._profiler import _EventType  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402


# The multi-process layouts (ParallelDims keywords at world size 2), as tests/distributed/test_plan_shards.py.
LAYOUTS = {"tp2": {"tp": 2}, "ep2": {"dp_shard": 2, "ep": 2}, "fsdp2": {"dp_shard": 2}, "pp2": {"pp": 2}}
WORLD = 2


def _walk(nodes):
    for node in nodes:
        yield node
        yield from _walk(node.children)


def measured_peak(mode: str, args, layout: str = "") -> int:
    """This process's peak; with `layout`, this rank's, in a gloo process group torchrun started."""
    from r1mega.config import AlgoConfig, ParallelConfig
    from r1mega.parallel import ParallelDims
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

    gc.collect()  # an earlier mode's models (reference cycles) must not be freed inside this profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.manual_seed(0)
        policy = Transformer(config)
        parallel = ParallelConfig(activation_checkpointing=mode, **LAYOUTS.get(layout, {}))
        if layout:
            dims = ParallelDims(dist.get_world_size(), **LAYOUTS[layout])
            dims.build_mesh("cpu")
            dp = DataParallel(dims, torch.device("cpu"), parallel)
        else:
            dp = DataParallel(parallel_cfg=parallel)
        reference = dp.parallelize(copy.deepcopy(policy).requires_grad_(False).eval())
        engine = NativeEngine(policy, max_slots=4, max_len=p + r)
        engine.release_memory()
        policy = dp.parallelize(policy)
        optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4)
        kw = dict(max_new_tokens=r, temperature=1.0, device="cpu", generator=random.Random(0))
        update_policy(policy, optimizer, dp.shard(batch()), algo, **kw)  # warm-up: gradients and AdamW states exist
        update_policy(policy, optimizer, dp.shard(batch()), algo, **kw)
        keep = (reference, engine)  # alive to the end, as in the trainer
    events = sorted((e.start_time_ns, e.extra_fields.ptr, e.extra_fields.alloc_size)
                    for e in _walk(prof.profiler.kineto_results.experimental_event_tree())
                    if e.tag == _EventType.Allocation)
    del keep
    live: dict[int, int] = {}  # address -> bytes of every allocation made since before the models existed
    now = peak = 0
    for _, ptr, nbytes in events:
        if nbytes > 0:
            # A free made on a thread the profiler does not watch (gloo's, which drops the last reference
            # to a collective's buffers) is never reported; the allocator handing the address out again
            # says it happened.
            now += nbytes - live.pop(ptr, 0)
            live[ptr] = nbytes
        else:
            now -= live.pop(ptr, 0)  # memory allocated before the profile started is not counted
        peak = max(peak, now)
    return peak


def predicted_peak(mode: str, args, layout: str = "", rank: int = 0) -> dict:
    """The plan's training-phase memory of `rank` in `layout` (one process when empty), for the same config."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from r1mega.cli.train import CONF_DIR
    from r1mega.plan.config import register_plan_configs
    from r1mega.plan.memory import memory_table
    from r1mega.plan.shards import param_counts, shard_bytes
    from r1mega.plan.workload import workload

    register_plan_configs()
    world = WORLD if layout else 1
    overrides = [f"parallel.activation_checkpointing={mode}", f"algo.token_budget={args.token_budget}",
                 f"plan.prompt_tokens={args.prompt}", f"rollout.max_new_tokens=[[0,{args.response}]]",
                 f"algo.train_batch_size={args.samples}", f"algo.ppo_mini_batch_size={args.samples}",
                 "algo.group_size=1", "rollout.max_slots=4", f"cluster.gpus_per_node={world}", "cluster.device=cpu",
                 "cluster.reserved_bytes=0", f"cluster.hbm_bytes={1 << 40}", "model.preset=tiny_deepseek_v3"]
    overrides += [f"parallel.{key}={value}" for key, value in LAYOUTS.get(layout, {}).items()]
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = OmegaConf.to_object(compose(config_name="plan", overrides=overrides))
    w = workload(cfg, world, cfg.plan)
    shards = shard_bytes(w.model, cfg.parallel, world, rank)
    table = memory_table(w, shards, param_counts(w.model), cfg.cluster.hbm_bytes, cfg.cluster.device)
    return {"total": table.total("training"), "terms": {t: row["training"] for t, row in table.terms.items()}}


def measured_ranks(layout: str, args) -> dict[str, list[int]]:
    """Each rank's measured peak per mode, from `WORLD` gloo processes under torchrun (this script's --worker)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
                   __file__, "--worker", layout, "--worker-out", out, "--modes", *args.modes,
                   "--token-budget", str(args.token_budget), "--samples", str(args.samples),
                   "--prompt", str(args.prompt), "--response", str(args.response)]
        subprocess.run(command, check=True)
        ranks = [json.loads((pathlib.Path(out) / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return {mode: [r[mode] for r in ranks] for mode in args.modes}


def worker(args) -> None:
    dist.init_process_group("gloo")
    try:
        peaks = {mode: measured_peak(mode, args, args.worker) for mode in args.modes}
        pathlib.Path(args.worker_out, f"rank{dist.get_rank()}.json").write_text(json.dumps(peaks))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _row(layout: str, rank: int, mode: str, measured: int, predicted: dict, args) -> dict:
    error = predicted["total"] / measured - 1
    print(f"{layout:6s} rank {rank}  {mode:9s} measured {measured / 2**20:8.1f} MiB  "
          f"predicted {predicted['total'] / 2**20:8.1f} MiB  error {error:+.1%}")
    return {"layout": layout, "rank": rank, "mode": mode, "token_budget": args.token_budget, "samples": args.samples,
            "prompt": args.prompt, "response": args.response, "measured_bytes": measured,
            "predicted_bytes": predicted["total"], "error": error, "within_15_percent": abs(error) <= 0.15,
            "predicted_terms": predicted["terms"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layouts", nargs="+", default=["1proc", *LAYOUTS], choices=["1proc", *LAYOUTS])
    ap.add_argument("--modes", nargs="+", default=["none", "selective", "full"])
    ap.add_argument("--token-budget", type=int, default=8192)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=8)
    ap.add_argument("--response", type=int, default=120)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "plan_vs_measured.json"))
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)  # a torchrun rank of this layout
    ap.add_argument("--worker-out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.worker:
        return worker(args)
    rows = []
    for layout in args.layouts:
        if layout == "1proc":
            rows += [_row(layout, 0, mode, measured_peak(mode, args), predicted_peak(mode, args), args)
                     for mode in args.modes]
            continue
        measured = measured_ranks(layout, args)
        rows += [_row(layout, rank, mode, measured[mode][rank], predicted_peak(mode, args, layout, rank), args)
                 for mode in args.modes for rank in range(WORLD)]
    out = pathlib.Path(args.out)
    kept = json.loads(out.read_text())["rows"] if out.exists() else []
    done = {(r["layout"], r["rank"], r["mode"]) for r in rows}
    rows = [r for r in kept if (r["layout"], r["rank"], r["mode"]) not in done] + rows  # earlier runs' other rows stay
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": "tiny_deepseek_v3", "torch": torch.__version__, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
