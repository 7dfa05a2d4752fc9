"""What r1mega and SGLang exchange, as pure functions: requests, responses, weight buckets, names.

- Requests: one SGLang request per sample (a prompt with n=4 becomes four requests of n=1), so each
  sample can carry its own seed and the outputs map back without relying on SGLang's ordering of
  parallel samples; SGLang's radix cache still shares the prompt's prefill between them.
  `sglang_sampling` turns `SamplingParams` into SGLang's `sampling_params` dict: top_k 0 -> -1 (off),
  `no_stop_trim` and `skip_special_tokens=False` (the text is rebuilt here anyway), and
  `ignore_eos` when the request lists no stop token ids, because SGLang otherwise also stops at the
  model's EOS, which the native engine does not (with `ignore_eos` SGLang ignores `stop_token_ids`
  too, so it is only set when there are none). With stop token ids, SGLang additionally stops at
  the model's own EOS ids (generation_config / tokenizer): list them (the trainer lists the EOS).
- Responses: `parse_output` reads `meta_info["output_token_logprobs"]`, a list of
  (logprob, token_id, text-or-None): SGLang's default logprob is log softmax(logits / temperature)
  before top-k / top-p, and log softmax(logits) for greedy requests, the meaning of
  `Sample.logprobs` (engine.py), as long as the server does not set SGLANG_RETURN_ORIGINAL_LOGPROB
  (the in-process engine refuses to start with it). SGLang also decodes a temperature in (0, 1e-6)
  greedily, with temperature-1 logprobs: such requests are refused here.
  Finish reasons: {"type": "stop" | "length" | "abort", ...}; SGLang checks the length before the
  stop conditions, so a stop token drawn as the last allowed token reads "length" there and "stop"
  here (as in the native engine). Text follows the native engine exactly (stop.py's `finalize`)
  when a tokenizer is given; without one, SGLang's text cut after the first stop string.
- Weights: `to_hf` renames a native or HF stream to HF names (SGLang loads HF checkpoints);
  `flat_buckets` groups it into buckets of about `bucket_bytes` and one dtype each, never
  splitting a fused pair (`loading_units`: DeepSeek-V3's q_a_proj and kv_a_proj_with_mqa, which
  SGLang's loader concatenates only when both arrive in the same `load_weights` call; one alone is
  held in that call's cache and dropped, leaving the old fused weight in place);
  `flatten` / `unflatten` are the `load_format="flattened_bucket"` layout (one 1-D tensor plus,
  per tensor, name, shape, dtype, start_idx, end_idx, numel: the fields of SGLang's
  `FlattenedTensorMetadata`); `bucket_payloads` serialises a bucket once per tensor-parallel rank
  (each rank opens its own CUDA IPC handle); `broadcast_meta` is what
  `update_weights_from_distributed` needs before the tensors are broadcast in the same order.

Deliberately left out: anything that imports SGLang (the serialiser and metadata class are passed
in), streaming responses, top logprobs, multimodal inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch

from r1mega.models.hf import native_to_hf
from r1mega.rollout.engine import Sample, SamplingParams
from r1mega.rollout.sampling import sample_seed
from r1mega.rollout.stop import StopChecker, validate_stop
from r1mega.rollout.weight_sync import peek_naming, unit_buckets


# ---- requests
GREEDY_BELOW = 1e-6  # SGLang samples a lower temperature greedily (top_k 1) and reports log softmax(logits)


def sglang_sampling(p: SamplingParams, seed: Optional[int] = None) -> dict[str, Any]:
    """SGLang's sampling_params for one sample of `p` (n is always 1, see module docstring)."""
    stop_ids, stop = validate_stop(p.stop_token_ids, p.stop)
    if 0 < p.temperature < GREEDY_BELOW:  # the native engine samples it, reporting log softmax(logits / t)
        raise ValueError(f"temperature={p.temperature} is below SGLang's {GREEDY_BELOW}, which it decodes greedily "
                         "with temperature-1 logprobs, unlike the native engine: use 0 for greedy")
    params = {"temperature": float(p.temperature), "top_p": float(p.top_p), "top_k": p.top_k if p.top_k > 0 else -1,
              "max_new_tokens": p.max_new_tokens, "stop_token_ids": sorted(stop_ids), "stop": list(stop),
              "ignore_eos": not stop_ids, "no_stop_trim": True, "skip_special_tokens": False, "n": 1}
    if seed is not None:
        params["sampling_seed"] = seed
    return params


@dataclass
class PendingSample:
    """One request sent to SGLang: sample `index` of prompt `prompt_index`."""
    prompt_index: int
    index: int
    prompt: list[int]
    params: SamplingParams
    request: dict[str, Any]  # {"input_ids": [...], "sampling_params": {...}}


def expand(prompt_index: int, prompt: list[int], p: SamplingParams, *, send_seed: bool,
           default_seed: Callable[[], int]) -> list[PendingSample]:
    """The n per-sample requests of one validated prompt."""
    seed = (p.seed if p.seed is not None else default_seed()) if send_seed else None
    return [PendingSample(prompt_index, j, prompt, p,
                          {"input_ids": prompt,
                           "sampling_params": sglang_sampling(p, None if seed is None else sample_seed(seed, prompt, j))})
            for j in range(p.n)]


# ---- responses
def cut_after_stop(text: str, stop: Sequence[str]) -> str:
    """`text` cut right after the earliest stop string it contains."""
    ends = [text.find(s) + len(s) for s in stop if s in text]
    return text[:min(ends)] if ends else text


def parse_output(out: dict[str, Any], prompt: list[int], p: SamplingParams, tokenizer=None) -> Sample:
    """One SGLang output dict -> a Sample with the native engine's conventions (module docstring)."""
    meta = out.get("meta_info") or {}
    finish = meta.get("finish_reason") or {}
    kind = finish.get("type") if isinstance(finish, dict) else finish
    if kind == "abort" or kind not in ("stop", "length"):
        message = finish.get("message") if isinstance(finish, dict) else None
        return Sample(prompt_ids=prompt, finish_reason="error",
                      error=f"SGLang {'aborted the request' if kind == 'abort' else f'finish reason {finish!r}'}"
                            + (f": {message}" if message else ""))
    entries = meta.get("output_token_logprobs")
    if not entries or any(e[0] is None for e in entries):
        return Sample(prompt_ids=prompt, finish_reason="error",
                      error="SGLang returned no per-token logprobs (return_logprob was not honoured)")
    tokens = [int(e[1]) for e in entries]
    logprobs = [float(e[0]) for e in entries]
    stop_ids, stop = validate_stop(p.stop_token_ids, p.stop)
    checker = StopChecker(stop_ids, stop if tokenizer is not None else (), tokenizer)
    if kind == "length" and checker.check(tokens) == "stop":
        kind = "stop"  # the last allowed token was a stop: the native engine says "stop"
    text = checker.finalize(tokens) if tokenizer is not None else cut_after_stop(out.get("text", ""), stop)
    return Sample(prompt_ids=prompt, token_ids=tokens, text=text, logprobs=logprobs, finish_reason=kind)


class RequestRejected(ValueError):
    """SGLang refused a generate request (a bad prompt or parameter); the message is SGLang's."""


class SGLangError(RuntimeError):
    """An SGLang call failed; the message names the call and carries SGLang's reason."""


def error_message(body: Any) -> str:
    """The message of an SGLang error body ({"error": {"message": ...}} or {"message": ...})."""
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and "message" in inner:
            return str(inner["message"])
    return str(body)


# ---- weights
def to_hf(config, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """HF (name, tensor) pairs from a stream of native or HF ones. Tied models drop `lm_head.weight` (SGLang
    ties it itself)."""
    hf_names, stream = peek_naming(named_tensors)
    if hf_names:
        return ((n, t) for n, t in stream if not (n == "lm_head.weight" and config.tie_word_embeddings))
    return native_to_hf(config, stream)


@dataclass
class FlatMeta:
    """Where one tensor lies in a flattened bucket; the fields of SGLang's FlattenedTensorMetadata."""
    name: str
    shape: torch.Size
    dtype: torch.dtype
    start_idx: int
    end_idx: int
    numel: int


_FUSED_PAIRS = (("self_attn.q_a_proj.", "self_attn.kv_a_proj_with_mqa."),)  # fused by SGLang's DeepSeek loader


def _partner(name: str) -> Optional[str]:
    for first, second in _FUSED_PAIRS:
        if first in name:
            return name.replace(first, second)
        if second in name:
            return name.replace(second, first)
    return None


def loading_units(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """The stream as units that must reach one `load_weights` call together: a fused pair (the first
    held back until its partner arrives), or a single tensor. A pair member without its partner is
    refused: SGLang would drop it silently."""
    held: dict[str, tuple[str, torch.Tensor]] = {}
    for name, t in named_tensors:
        partner = _partner(name)
        if partner is None:
            yield [(name, t)]
        elif partner in held:
            first = held.pop(partner)
            if first[1].dtype != t.dtype:
                raise ValueError(f"{first[0]} ({first[1].dtype}) and {name} ({t.dtype}) are fused by SGLang: "
                                 "send them in one dtype")
            yield [first, (name, t)]
        else:
            held[name] = (name, t)
    if held:
        lone = sorted(held)
        raise ValueError(f"{lone[0]} arrived without {_partner(lone[0])}: SGLang loads the two only together "
                         f"(fused), so an update must carry both ({len(lone)} unpaired)")


def loading_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]],
                    bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Buckets of about `bucket_bytes` made of whole `loading_units`."""
    return unit_buckets(loading_units(named_tensors), bucket_bytes)


def flat_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]],
                 bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """`loading_buckets`, each split by dtype (a flattened bucket is one tensor; a fused pair has one dtype),
    keeping the stream's order within a dtype."""
    for bucket in loading_buckets(named_tensors, bucket_bytes):
        by_dtype: dict[torch.dtype, list] = {}
        for name, t in bucket:
            by_dtype.setdefault(t.dtype, []).append((name, t))
        yield from by_dtype.values()


def flatten(bucket: list[tuple[str, torch.Tensor]]) -> tuple[torch.Tensor, list[FlatMeta]]:
    """One dtype's tensors -> (1-D tensor [sum numel], their FlatMeta)."""
    dtypes = {t.dtype for _, t in bucket}
    if len(dtypes) != 1:
        raise ValueError(f"a flattened bucket holds one dtype, got {sorted(map(str, dtypes))}")
    metas, start = [], 0
    for name, t in bucket:
        metas.append(FlatMeta(name, t.shape, t.dtype, start, start + t.numel(), t.numel()))
        start += t.numel()
    return torch.cat([t.reshape(-1) for _, t in bucket]), metas


def unflatten(flat: torch.Tensor, metas: Sequence) -> list[tuple[str, torch.Tensor]]:
    """The inverse of `flatten` (views into `flat`); accepts SGLang's metadata objects too."""
    return [(m.name, flat[m.start_idx:m.end_idx].view(m.shape)) for m in metas]


def bucket_payloads(flat: torch.Tensor, metas: list[FlatMeta], tp_size: int, serialize: Callable[[Any], str],
                    metadata_cls: type = SimpleNamespace) -> list[str]:
    """`serialized_named_tensors` of a flattened_bucket update: one serialisation per TP rank. The metadata
    class must be one SGLang's SafeUnpickler accepts (its FlattenedTensorMetadata, or SimpleNamespace,
    which it reads by the same attributes); FlatMeta itself would be refused."""
    def payload():
        return {"flattened_tensor": flat,
                "metadata": [metadata_cls(name=m.name, shape=m.shape, dtype=m.dtype, start_idx=m.start_idx,
                                          end_idx=m.end_idx, numel=m.numel) for m in metas]}
    return [serialize(payload()) for _ in range(tp_size)]


def broadcast_meta(bucket: list[tuple[str, torch.Tensor]]) -> tuple[list[str], list[str], list[list[int]]]:
    """(names, dtype names as "bfloat16", shapes) of a bucket, for update_weights_from_distributed."""
    return ([n for n, _ in bucket], [str(t.dtype).removeprefix("torch.") for _, t in bucket],
            [list(t.shape) for _, t in bucket])
