"""The planner's micro-batch size against the trainer's own packing: the largest micro-batch that
ShardedRolloutBatch (what update_policy runs on each data-parallel rank) packs from a mini-batch."""

import pytest
import torch

from r1mega.plan.workload import micro_batch_tokens
from r1mega.trainers.rollout_batch import RolloutBatch
from r1mega.trainers.sharded_batch import ShardedRolloutBatch


def _largest_packed(samples: int, prompt: int, response: int, budget: int, dp: int) -> int:
    prompts = [[3 + i] * prompt for i in range(samples)]  # each sample its own prompt: nothing shared
    fields = dict(prompt_ids=prompts, response_ids=torch.full((samples, response), 5), mask=torch.ones(samples, response),
                  engine_logp=torch.zeros(samples, response), rewards=torch.zeros(samples))
    largest = 0
    for rank in range(dp):
        batch = ShardedRolloutBatch(**fields, dp_rank=rank, dp_size=dp) if dp > 1 else RolloutBatch(**fields)
        lengths = batch.lengths()
        largest = max([largest] + [sum(lengths[i] for i in micro) for micro in batch.micro_batches(budget)])
    return largest


@pytest.mark.parametrize("samples, budget, dp", [(64, 8192, 1), (64, 8192, 2), (16, 2048, 2), (32, 1024, 2),
                                                 (8, 64, 2)])
def test_micro_batch_tokens_is_what_the_trainer_packs(samples, budget, dp):
    prompt, response = 8, 120
    assert micro_batch_tokens(budget, prompt + response, samples // dp) == _largest_packed(
        samples, prompt, response, budget, dp)
