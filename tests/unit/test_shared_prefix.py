"""Shared prompts in the trainer's packed forward (models/shared_prefix.py, token_batch.response_hidden):
each sample's logprobs equal Hugging Face's forward of the sample alone, every parameter's gradient
that of the native model's unpacked forwards, MoE expert loads count a shared prompt once per sample,
and micro-batches keep a prompt's samples together within the token budget."""

import dataclasses

import pytest
import torch
import transformers

from r1mega.models import hf
from r1mega.models import shared_prefix
from r1mega.models.shared_prefix import SharedPrefixRow
from r1mega.trainers.sharded_batch import ShardedRolloutBatch
from r1mega.trainers.token_batch import TokenBatch, response_logprobs
from tiny_models import make_hf_dir

# Two samples of prompt A, one of B, a third of A with an empty response, and a lone C.
PROMPTS = [[5, 6, 7, 8, 9], [5, 6, 7, 8, 9], [11, 12], [5, 6, 7, 8, 9], [20, 21, 22]]
RESPONSES = [[30, 31, 32], [33], [34, 35, 36, 37], [], [38, 39]]


def logprobs_alone(model, prompts, responses, *, grads: bool):
    """Per-sample forwards, each sample alone in a batch of one (Hugging Face's model or the native one
    without packing): logprobs [S, R] and, if `grads`, the parameters' gradients of their sum."""
    model.zero_grad(set_to_none=True)
    out = torch.zeros(len(prompts), max(map(len, responses)))
    total = 0.0
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        if not response:
            continue
        logits = model(torch.tensor([prompt + response]))
        logits = getattr(logits, "logits", logits)[0].float().log_softmax(-1)
        logp = logits[len(prompt) - 1:-1].gather(-1, torch.tensor(response)[:, None])[:, 0]
        out[i, :len(response)] = logp.detach()
        total = total + logp.sum()
    if grads:
        total.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["qwen2", "deepseek_v3"])
@pytest.mark.parametrize("layout", ["batched", "per_sequence", "distinct_prompts"])
def test_shared_prompts_match_each_sample_alone(arch, layout, tmp_path, monkeypatch):
    prompts = PROMPTS
    if layout == "per_sequence":  # every group's mask over the limit: one causal call per sequence
        monkeypatch.setattr(shared_prefix, "MASK_ELEMENTS", 1)
    if layout == "distinct_prompts":  # no prompt shared (SFT): the row is plain causal segments
        prompts = [prompt + [40 + i] for i, prompt in enumerate(PROMPTS)]
    path = make_hf_dir(arch, tmp_path / arch)
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    expected, _ = logprobs_alone(reference, prompts, RESPONSES, grads=False)
    model, _ = hf.load(path)
    _, expected_grads = logprobs_alone(model, prompts, RESPONSES, grads=True)  # the unpacked path

    model.zero_grad(set_to_none=True)
    batch = TokenBatch(prompts, *TokenBatch.pad(RESPONSES))
    logp = response_logprobs(model, batch, temperature=1.0, device="cpu")
    torch.testing.assert_close(logp.detach(), expected, atol=2e-5, rtol=0)
    logp.sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=2e-5, rtol=1e-4, msg=name)


def test_expert_loads_count_a_shared_prompt_once_per_sample(tmp_path):
    model, _ = hf.load(make_hf_dir("deepseek_v3", tmp_path / "m"))
    moes = [block.ffn for block in model.layers if hasattr(block.ffn, "router")]
    with torch.no_grad():
        response_logprobs(model, TokenBatch(PROMPTS, *TokenBatch.pad(RESPONSES)), temperature=1.0, device="cpu")
        shared = [moe.last_expert_load.clone() for moe in moes]
        separate = [torch.zeros_like(load) for load in shared]
        for prompt, response in zip(PROMPTS, RESPONSES):  # each sample alone, its prompt a copy of its own
            model(torch.tensor([prompt + response]))
            for total, moe in zip(separate, moes):
                total += moe.last_expert_load
    for got, want in zip(shared, separate):
        assert torch.equal(got, want)
    assert int(shared[0].sum()) == sum(map(len, PROMPTS + RESPONSES)) * model.config.num_experts_per_tok


def test_micro_batches_keep_a_prompt_s_samples_together():
    # samples 0, 2, 4 share prompt A (10 tokens), 1 and 3 prompt B (6); responses of 3 and 5 tokens
    responses = [[3] * 3, [4] * 5, [3] * 3, [4] * 5, [3] * 3]
    batch = TokenBatch([[1] * 10, [2] * 6, [1] * 10, [2] * 6, [1] * 10], *TokenBatch.pad(responses))
    assert batch.lengths() == [13, 11, 13, 11, 13]
    assert batch.micro_batches(100) == [[0, 2, 4, 1, 3]]
    assert batch.micro_batches(39) == [[0, 2, 4], [1, 3]]
    assert batch.micro_batches(37) == [[0, 2], [1, 3, 4]]  # by sequence alone: [[0, 2, 1], [4, 3]]
    assert batch.micro_batches(26) == [[0, 2], [1, 3], [4]]  # a prompt's samples beyond the budget split
    assert batch.micro_batches(5) == [[0], [2], [4], [1], [3]]  # longer than the budget: alone


def test_sharded_micro_batches_deal_the_grouped_bins():
    ids, mask = TokenBatch.pad([[3] * 3, [4] * 5] * 3)
    batch = ShardedRolloutBatch([[1] * 10, [2] * 6] * 3, ids, mask, engine_logp=torch.zeros_like(mask),
                                rewards=torch.zeros(6), dp_size=2)
    ranks = [dataclasses.replace(batch, dp_rank=r).micro_batches(40) for r in range(2)]
    assert ranks == [[[0, 2, 4]], [[1, 3, 5]]]


def test_row_layout_and_its_refusals():
    # prefix [0, 2) read by suffixes [2, 3) and [3, 5), prefix [5, 6) by an empty suffix and [6, 7)
    row = SharedPrefixRow.from_groups([((0, 2), [(2, 3), (3, 5)]), ((5, 6), [(6, 6), (6, 7)])], num_tokens=7)
    assert row.expand.tolist() == [0, 1, 2, 0, 1, 3, 4, 5, 5, 6]
    assert row.spans == [(0, 3), (3, 7), (7, 8), (8, 10)]
    assert row.first_read.tolist() == [0, 1, 2, 5, 6, 7, 9]
    assert row.repeats.tolist() == [2, 2, 1, 1, 1, 2, 1]
    # each prefix is a segment of its own; the first group's two suffixes make one block padded to 2 queries,
    # the second group's non-empty one a block of its own (its group has two sequences)
    assert row.segments == [(0, 2), (5, 6)] and row.segment_tokens.tolist() == [0, 1, 5]
    first = row.blocks[0]
    assert first.segment == 0 and first.tokens.tolist() == [[2, 1], [3, 4]] and first.output_rows == 4
    assert first.mask[:, 0].tolist() == [[[True, True, True, False], [True, True, True, False]],
                                         [[True, True, True, False], [True, True, True, True]]]
    # attention outputs end to end: segments (3 rows), block 1 (2 x 2 rows), block 2 (1 x 1)
    assert row.collect.tolist() == [0, 1, 3, 5, 6, 2, 7]
    lone = SharedPrefixRow.from_groups([((0, 2), [(2, 4)]), ((4, 5), [(5, 5)])], num_tokens=5)
    assert lone.segments == [(0, 4), (4, 5)] and lone.segment_tokens is None and lone.blocks == []
    assert lone.collect.tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"stored tokens \[3\] are read by no sequence"):
        SharedPrefixRow.from_groups([((0, 2), [(2, 3)])], num_tokens=4)
    with pytest.raises(ValueError, match=r"stored tokens \[2\] lie in several spans"):
        SharedPrefixRow.from_groups([((0, 2), [(2, 3), (2, 4)])], num_tokens=4)
    with pytest.raises(ValueError, match="prefix .* is empty"):
        SharedPrefixRow.from_groups([((0, 0), [(0, 2)])], num_tokens=2)
