"""grpo_worker.py's run, then every rank's engine generates greedily from every held-out prompt and
writes the token ids to out_dir/greedy_rank{rank}.json: what the engine holds after the weight syncs."""

import json
import sys

import torch.distributed as dist

from grpo_worker import config
from r1mega.parallel.launch import shutdown
from r1mega.rollout.engine import SamplingParams
from r1mega.trainers.grpo import GRPOTrainer

if __name__ == "__main__":
    cfg = config(sys.argv[1:])
    trainer = GRPOTrainer(cfg)
    trainer.fit()
    trainer.scorer.close()
    prompts = [trainer.tokenizer.encode(row["prompt"]) for rows in trainer.held_out.values() for row in rows]
    groups = trainer.engine.generate(prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=8, seed=0))
    rank = dist.get_rank() if dist.is_initialized() else 0
    with open(f"{sys.argv[1]}/greedy_rank{rank}.json", "w") as f:
        json.dump([list(group[0].token_ids) for group in groups], f)
    shutdown()
