"""Sampling and stop conditions against references: top-k / top-p masks against Hugging Face's logits
warpers, the exponential race against the softmax probabilities it should draw from, seeded generators,
and stop strings against a brute-force search over token prefixes."""

import math

import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from r1mega.rollout.sampling import filter_logits, sample, sample_generator
from r1mega.rollout.stop import StopChecker, validate_stop


def hf_kept(logits: torch.Tensor, k: int, p: float) -> torch.Tensor:
    """Tokens of one row that Hugging Face keeps: TopKLogitsWarper, then TopPLogitsWarper on what it left
    (the nucleus taken on the softmax of the kept logits, as vLLM and SGLang do too)."""
    scores = logits[None].clone()
    if k > 0:
        scores = TopKLogitsWarper(top_k=k)(None, scores)
    if p < 1:
        scores = TopPLogitsWarper(top_p=p)(None, scores)
    return torch.isfinite(scores[0])


@pytest.mark.parametrize("k,p", [(0, 1.0), (3, 1.0), (0, 0.5), (5, 0.8), (3, 0.6), (2, 0.7), (1, 0.3), (0, 1e-6)])
def test_filter_matches_transformers(k, p):
    logits = torch.randn(4, 17, generator=torch.Generator().manual_seed(k))
    out = filter_logits(logits, torch.full((4,), k), torch.full((4,), p))
    for row in range(4):
        kept = torch.isfinite(out[row])
        assert torch.equal(kept, hf_kept(logits[row], k, p)), (row, k, p)
        torch.testing.assert_close(out[row][kept], logits[row][kept])


def test_top_p_is_taken_over_the_top_k():
    # Softmax 0.5, 0.3, 0.2 over the top 2 is 0.625, 0.375: top-p 0.6 keeps one token once renormalised,
    # two on the full softmax (0.5 < 0.6).
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    out = filter_logits(logits, torch.tensor([2]), torch.tensor([0.6]))
    assert torch.equal(torch.isfinite(out[0]), torch.tensor([True, False, False]))
    assert torch.equal(torch.isfinite(out[0]), hf_kept(logits[0], 2, 0.6))


def test_top_p_one_keeps_the_whole_top_k():
    # exp(-30) is below float32's resolution at 1: the cumulative sum is 1.0 from the first token on
    logits = torch.tensor([[0.0, -30.0, -31.0, -32.0]])
    out = filter_logits(logits, torch.tensor([3]), torch.tensor([1.0]))
    assert torch.equal(torch.isfinite(out[0]), hf_kept(logits[0], 3, 1.0))


def test_rows_use_their_own_settings():
    logits = torch.randn(3, 11, generator=torch.Generator().manual_seed(0))
    k, p = torch.tensor([0, 2, 4]), torch.tensor([1.0, 1.0, 0.6])
    out = filter_logits(logits, k, p)
    for row in range(3):
        assert torch.equal(torch.isfinite(out[row]), hf_kept(logits[row], int(k[row]), float(p[row])))


def test_exponential_race_draws_from_softmax_of_scaled_logits():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    temperature = 0.7
    n = 20000
    gens = [sample_generator(0, [1, 2], j, "cpu") for j in range(n)]
    tokens, logp = sample(logits.expand(n, 5), torch.full((n,), temperature), torch.zeros(n, dtype=torch.long),
                          torch.ones(n), gens)
    expected = (logits[0] / temperature).softmax(-1)
    freq = torch.bincount(tokens, minlength=5).float() / n
    # binomial standard error is below 0.0036 here; 5 sigma
    assert (freq - expected).abs().max() < 0.018
    torch.testing.assert_close(logp, expected.log()[tokens])


def test_greedy_rows_take_the_argmax_and_report_temperature_one_logprobs():
    logits = torch.randn(3, 9, generator=torch.Generator().manual_seed(3))
    tokens, logp = sample(logits, torch.zeros(3), torch.zeros(3, dtype=torch.long), torch.ones(3), [None] * 3)
    assert torch.equal(tokens, logits.argmax(-1))
    torch.testing.assert_close(logp, logits.log_softmax(-1).gather(-1, tokens[:, None])[:, 0])


def test_seeded_generators_depend_on_seed_prompt_and_index_only():
    draw = lambda *a: torch.empty(8).exponential_(generator=sample_generator(*a, "cpu"))  # noqa: E731
    assert torch.equal(draw(7, [1, 2, 3], 0), draw(7, [1, 2, 3], 0))
    others = [draw(8, [1, 2, 3], 0), draw(7, [1, 2, 4], 0), draw(7, [1, 2, 3], 1)]
    assert all(not torch.equal(draw(7, [1, 2, 3], 0), o) for o in others)


class PieceTokenizer:
    """Token i decodes to PIECES[i]: pieces of 1 to 3 letters, so stop strings straddle tokens."""

    PIECES = ["a", "bc", "d", "efg", "h", "ij", "k", "lmn", "o", "pq"]

    def encode(self, text):
        raise NotImplementedError

    def decode(self, ids):
        return "".join(self.PIECES[i] for i in ids)

    eos_token_id = 0


def test_stop_string_cut_matches_brute_force():
    tok = PieceTokenizer()
    tokens = [2, 9, 3, 5, 7, 1, 3, 4, 3]  # "dpqefgijlmnbcefghefg"
    for stop in ["gij", "fgi", "mnbc", "nb", "e", "hef", "zz"]:
        checker = StopChecker(*validate_stop((), [stop]), tok)
        # the engine checks after every token and stops at the first hit
        cut = next((m for m in range(1, len(tokens) + 1) if checker.check(tokens[:m])), len(tokens))
        brute = next((m for m in range(1, len(tokens) + 1) if stop in tok.decode(tokens[:m])), len(tokens))
        assert cut == brute, stop
        full = tok.decode(tokens)
        want = full[:full.index(stop) + len(stop)] if stop in full else full
        assert checker.finalize(tokens[:cut]) == want


def test_stop_token_ids_end_the_sequence_and_leave_the_text():
    checker = StopChecker(*validate_stop([0], ()), PieceTokenizer())
    assert checker.check([3, 4]) is None and checker.check([3, 4, 0]) == "stop"
    assert checker.finalize([3, 4, 0]) == "efgh"


@pytest.mark.parametrize("ids,stop", [([1.5], ()), (["x"], ()), ((), [3]), ((), [""]), ((), 3)])
def test_bad_stop_settings_are_rejected(ids, stop):
    with pytest.raises(ValueError):
        validate_stop(ids, stop)


def test_temperature_scaling_is_in_the_reported_logprob():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    _, logp = sample(logits, torch.tensor([2.0]), torch.zeros(1, dtype=torch.long), torch.ones(1),
                     [sample_generator(1, [0], 0, "cpu")])
    probs = (logits[0] / 2).softmax(-1)
    assert any(math.isclose(float(logp), math.log(float(q)), rel_tol=1e-5) for q in probs)
