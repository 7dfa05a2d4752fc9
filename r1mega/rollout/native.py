"""The native rollout engine: batched generation with the policy's own `Transformer`, in process.

- Weights: by default a private copy of the policy (same device, optionally another dtype), so
  generation never touches training parameters; `update_weights` copies new weights into that copy in
  place (weight_sync.py: native or HF names, bucketed, data pointers unchanged). `share_weights=True`
  uses the policy module itself (no copy, no sync cost).
- Memory: one preallocated `KVCache` of `num_slots` rows of `max_len` positions, the slot count taken
  from `max_slots` or a byte budget (`kv_cache_bytes`). `release_memory` frees it for training.
- Scheduling (continuous batching): samples wait in a queue; whenever slots are free, the next prompt's
  samples take as many as fit. The prompt is prefilled once into the first of them (in chunks, batched
  with the other prompts admitted at the same time, right-padded) and its cache rows are copied to the
  others. Then every step decodes one token for every running sample; a finished sample frees its
  slot at once, and the next step refills it. Running samples stay packed in slots 0..n-1 (a finished
  sample's slot takes the cache of the last one), so decode reads the cache as views, never gathers.
- Sampling (sampling.py) runs on the model's device, one seeded generator per sample; stop token ids
  and stop strings (stop.py); every sample reports the log-probability of each token it drew.
- Routing record (`record_routing=True`, for routing replay in the trainer): every sample also reports
  the experts each MoE layer chose for each token the engine fed, its prompt's (from the prefill its
  group shared) and its generated tokens' but the last (never fed), as `Sample.routed_experts`.
- A bad request (empty prompt, longer than max_len or the model's max_position_embeddings, invalid
  parameters) gets error samples; the others run.

Deliberately left out: CUDA graphs / torch.compile of the decode step (on a CPU, torch.compile of the
decode forward broke its graph at the MoE's per-expert loop, recompiled as lengths grew, and ran no
faster than eager; CUDA graphs, with batch buckets and a fixed cache length, wait for a GPU to be
measured on), cascade attention over a group's shared prompt in decode (on a CPU its extra gathers cost
more than the cache reads it saves: 121 vs 94 ms for a 4 x 8-sample rollout's attention), prefix
sharing across different prompts, speculative decoding, preemption (a sample keeps its slot until it
finishes, so max_len must hold prompt + max_new_tokens).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from r1mega.models.attention import CacheSlots
from r1mega.models.checkpoint import empty_model
from r1mega.models.kv_cache import KVCache
from r1mega.models.routing import Routing
from r1mega.rollout import weight_sync
from r1mega.rollout.engine import Prompts, Sample, SamplingParams, validate
from r1mega.rollout.sampling import sample, sample_generator
from r1mega.rollout.stop import StopChecker, validate_stop


@dataclass
class _Request:
    prompt: list[int]
    params: SamplingParams
    stop: StopChecker
    seed: int
    samples: list[Sample]
    next_sample: int = 0  # samples [0, next_sample) have been admitted


@dataclass
class _Seq:
    request: _Request
    index: int  # sample index within the request
    slot: int
    generator: Optional[torch.Generator]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    routing: list[torch.Tensor] = field(default_factory=list)  # [n, L, k] per fed token run: prompt, then decodes
    finished: bool = False

    @property
    def position(self) -> int:
        """Position of the last sampled token, the next one fed to the model."""
        return len(self.request.prompt) + len(self.tokens) - 1


class NativeEngine:
    def __init__(self, model, tokenizer=None, *, max_slots: int = 64, max_len: int = 4096,
                 kv_cache_bytes: Optional[int] = None, device=None, dtype: Optional[torch.dtype] = None,
                 share_weights: bool = False, prefill_chunk: int = 1024, prefill_tokens: int = 8192,
                 bucket_bytes: int = weight_sync.DEFAULT_BUCKET_BYTES, record_routing: bool = False):
        source_device = next(model.parameters()).device
        self.device = torch.device(device) if device is not None else source_device
        self.dtype = dtype or next(model.parameters()).dtype
        if share_weights:
            if self.device != source_device or self.dtype != next(model.parameters()).dtype:
                raise ValueError("share_weights=True needs the model's own device and dtype")
            self.model = model
        else:
            self.model = empty_model(model.config, dtype=self.dtype, device=self.device).eval()
            copied = weight_sync.update_in_place(self.model, model.state_dict().items(), bucket_bytes=bucket_bytes)
            if copied != len(self.model.state_dict()):
                raise ValueError(f"the policy's state_dict filled {copied} of {len(self.model.state_dict())} tensors")
            self.model.requires_grad_(False)
        self.config = model.config
        self._targets = self.model.state_dict(keep_vars=True)  # the tensors update_weights copies into
        self.tokenizer = tokenizer
        self.max_len, self.prefill_chunk, self.prefill_tokens = max_len, prefill_chunk, prefill_tokens
        self.bucket_bytes = bucket_bytes
        if record_routing and not any(map(self.config.is_moe_layer, range(self.config.num_hidden_layers))):
            raise ValueError("record_routing=True needs a model with MoE layers")
        self.record_routing = record_routing
        per_slot = KVCache.bytes_per_token(self.config, self.dtype) * max_len
        self.num_slots = max_slots if kv_cache_bytes is None else min(max_slots, kv_cache_bytes // per_slot)
        if self.num_slots < 1:
            raise ValueError(f"kv_cache_bytes={kv_cache_bytes} holds no slot of max_len {max_len} "
                             f"({per_slot} bytes per slot)")
        self.version = 0
        self.cache: Optional[KVCache] = None
        self.resume_memory()

    # ---- memory and weights
    def release_memory(self) -> None:
        self.cache = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def resume_memory(self) -> None:
        if self.cache is None:
            self.cache = KVCache.for_model(self.config, self.num_slots, self.max_len, dtype=self.dtype, device=self.device)
            self._clear_slots(slice(None))

    def _clear_slots(self, slots) -> None:
        """Zeroes cache rows. Masked attention still multiplies the values it skips by 0, so a NaN left in
        a slot (uninitialised memory, or a sequence that diverged) would poison every later query of it."""
        for store in self.cache.stores:
            store[slots] = 0

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        weight_sync.update_in_place(self.model, named_tensors, bucket_bytes=self.bucket_bytes, targets=self._targets)
        self.version = version

    # ---- requests
    def _request(self, prompt, params: SamplingParams) -> _Request:
        """Validates one prompt with its parameters; raises ValueError/TypeError with the reason."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer")
            prompt = self.tokenizer.encode(prompt)
        prompt = list(prompt)
        p = params
        validate(prompt, p, vocab_size=self.config.vocab_size, max_len=self.max_len,
                 max_positions=self.config.max_position_embeddings)
        stop_ids, stop = validate_stop(p.stop_token_ids, p.stop)
        checker = StopChecker(stop_ids, stop, self.tokenizer)
        seed = p.seed if p.seed is not None else int(torch.randint(0, 2**62, ()))
        return _Request(prompt, p, checker, seed, [Sample(prompt_ids=prompt) for _ in range(p.n)])

    def generate(self, prompts: Prompts, sampling: SamplingParams | Sequence[SamplingParams]) -> list[list[Sample]]:
        params = [sampling] * len(prompts) if isinstance(sampling, SamplingParams) else list(sampling)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        if self.cache is None:
            raise RuntimeError("the engine's memory is released: call resume_memory() before generate()")
        results, queue = [], deque()
        for prompt, p in zip(prompts, params):
            n = p.n if isinstance(p.n, int) and p.n >= 1 else 1
            try:
                if not isinstance(p.n, int) or p.n < 1:
                    raise ValueError(f"n must be a positive integer, got {p.n!r}")
                request = self._request(prompt, p)
            except (ValueError, TypeError) as e:
                ids = list(prompt) if not isinstance(prompt, str) else []
                results.append([Sample(prompt_ids=ids, finish_reason="error", error=str(e)) for _ in range(n)])
                continue
            results.append(request.samples)
            queue.append(request)
        was_training = self.model.training
        self.model.eval()  # a shared policy must not count expert load from rollouts
        try:
            with torch.no_grad():
                self._run(queue)
        finally:
            self.model.train(was_training)
        return results

    # ---- the scheduler
    def _run(self, queue: deque) -> None:
        running: list[_Seq] = []  # running[i] holds slot i
        while queue or running:
            admitted, taken = [], len(running)
            while taken < self.num_slots and queue:
                request = queue[0]
                take = min(self.num_slots - taken, request.params.n - request.next_sample)
                group = [self._new_seq(request, request.next_sample + i, taken + i) for i in range(take)]
                request.next_sample += take
                taken += take
                if request.next_sample == request.params.n:
                    queue.popleft()
                admitted.append(group)
            if admitted:
                logits = self._prefill(admitted)  # [G, V], one row per group
                rows = torch.tensor([g for g, group in enumerate(admitted) for _ in group], device=self.device)
                new = [seq for group in admitted for seq in group]
                running += new
                self._advance(new, logits[rows])
                running = self._compact(running)
            if running:
                self._advance(running, self._decode(running))
                running = self._compact(running)

    def _new_seq(self, request: _Request, index: int, slot: int) -> _Seq:
        gen = sample_generator(request.seed, request.prompt, index, self.device) if request.params.temperature > 0 else None
        return _Seq(request, index, slot, gen)

    def _compact(self, running: list[_Seq]) -> list[_Seq]:
        """Drops finished seqs from `running` (seq i in slot i) and moves the last live ones into the
        slots they left, so the live ones hold slots 0..n-1 again."""
        alive = [s for s in running if not s.finished]
        holes = [s.slot for s in running[:len(alive)] if s.finished]
        movers = [s for s in running[len(alive):] if not s.finished]
        for slot, seq in zip(holes, movers):
            # positions 0..position-1 are cached; the token at `position` is written by the next decode
            for store in self.cache.stores:
                store[slot, :, :seq.position] = store[seq.slot, :, :seq.position]
            seq.slot = slot
        return sorted(alive, key=lambda s: s.slot)

    def _advance(self, seqs: list[_Seq], logits: torch.Tensor) -> None:
        """Samples one token per seq from logits [B, V]; marks finished those that stop."""
        params = [s.request.params for s in seqs]
        temperature = torch.tensor([p.temperature for p in params], device=self.device, dtype=torch.float32)
        top_k = torch.tensor([p.top_k for p in params], device=self.device)
        top_p = torch.tensor([p.top_p for p in params], device=self.device, dtype=torch.float32)
        tokens, logprobs = sample(logits, temperature, top_k, top_p, [s.generator for s in seqs])
        finite = torch.isfinite(logits).all(dim=-1)
        for seq, token, logprob, ok in zip(seqs, tokens.tolist(), logprobs.tolist(), finite.tolist()):
            seq.tokens.append(token)
            seq.logprobs.append(logprob)
            if not ok:
                self._clear_slots(seq.slot)
                self._finish(seq, "error", error=f"non-finite logits at generated token {len(seq.tokens)}")
                continue
            reason = seq.request.stop.check(seq.tokens)
            if reason is None and len(seq.tokens) >= seq.request.params.max_new_tokens:
                reason = "length"
            if reason is not None:
                self._finish(seq, reason)

    def _finish(self, seq: _Seq, reason: str, error: Optional[str] = None) -> None:
        out = seq.request.samples[seq.index]
        out.token_ids, out.logprobs, out.finish_reason, out.error = seq.tokens, seq.logprobs, reason, error
        out.text = seq.request.stop.finalize(seq.tokens)
        if self.record_routing:
            out.routed_experts = torch.cat(seq.routing).to("cpu", torch.int16)
        seq.finished = True

    # ---- model calls
    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] final-normed -> float logits [N, V], as Transformer.forward computes them."""
        return F.linear(hidden, self.model.output_weight).float()

    def _prefill(self, groups: list[list[_Seq]]) -> torch.Tensor:
        """Writes each group's prompt into its first slot's cache, copies it to the group's other slots,
        and returns the logits [G, V] after each prompt."""
        prompts = [group[0].request.prompt for group in groups]
        last = [None] * len(groups)
        # shortest first, so a sub-batch pads little; a sub-batch holds about prefill_tokens tokens per chunk
        batches, batch = [], []
        for g in sorted(range(len(groups)), key=lambda g: len(prompts[g])):
            if batch and (len(batch) + 1) * min(self.prefill_chunk, len(prompts[g])) > self.prefill_tokens:
                batches.append(batch)
                batch = []
            batch.append(g)
        batches.append(batch)
        for batch in batches:
            hidden, routed = self._prefill_batch([prompts[g] for g in batch], [groups[g][0].slot for g in batch])
            for g, h, r in zip(batch, hidden, routed):
                last[g] = h
                for seq in groups[g]:
                    seq.routing = list(r)  # its own list: the decodes append to it
        for group in groups:
            self._fork(group[0].slot, [s.slot for s in group[1:]], len(group[0].request.prompt))
        return self._logits(torch.stack(last))

    def _prefill_batch(self, prompts: list[list[int]], slots: list[int]) -> tuple[list, list[list[torch.Tensor]]]:
        """Prefills prompts into slots, chunk by chunk: the hidden state [H] at each prompt's last token, and
        each prompt's routing record, chunk by chunk (empty unless recorded)."""
        lengths = [len(p) for p in prompts]
        last = [None] * len(prompts)
        routed = [[] for _ in prompts]
        for start in range(0, max(lengths), self.prefill_chunk):
            rows = [i for i, n in enumerate(lengths) if n > start]
            width = min(self.prefill_chunk, max(lengths[i] for i in rows) - start)
            # right padding with token 0: its keys land past the prompt's end, which decode overwrites
            # before any query can see them
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            for r, i in enumerate(rows):
                chunk = prompts[i][start:start + width]
                ids[r, :len(chunk)] = torch.tensor(chunk)
            positions = (start + torch.arange(width)).expand(len(rows), width)
            routing = Routing() if self.record_routing else None
            slot_rows = CacheSlots(self.cache, torch.tensor([slots[i] for i in rows], device=self.device))
            hidden = self.model(ids.to(self.device), slot_rows, position_ids=positions.to(self.device),
                                routing=routing, return_hidden=True)  # [R, width, H]
            chosen = routing.stacked().unflatten(0, (len(rows), width)) if routing else None  # [R, width, L, k]
            for r, i in enumerate(rows):
                if start <= lengths[i] - 1 < start + width:
                    last[i] = hidden[r, lengths[i] - 1 - start]
                if chosen is not None:  # the padding's choices are dropped
                    routed[i].append(chosen[r, :min(width, lengths[i] - start)])
        return last, routed

    def _fork(self, src: int, dst: list[int], length: int) -> None:
        """Copies the first `length` cache positions of slot src into slots dst."""
        if not dst:
            return
        index = torch.tensor(dst, device=self.device)
        for store in self.cache.stores:
            store[index, :, :length] = store[src, :, :length].clone()  # same storage: no aliasing copy

    def _decode(self, seqs: list[_Seq]) -> torch.Tensor:
        """One token for every running seq (seq i in slot i): logits [B, V] after its last sampled token."""
        ids = torch.tensor([[s.tokens[-1]] for s in seqs], device=self.device)  # [B, 1]
        positions = torch.tensor([[s.position] for s in seqs], device=self.device)  # [B, 1]
        routing = Routing() if self.record_routing else None
        hidden = self.model(ids, CacheSlots(self.cache, slice(0, len(seqs))), position_ids=positions,
                            routing=routing, return_hidden=True)
        if routing is not None:
            for seq, chosen in zip(seqs, routing.stacked()):  # [L, k] each
                seq.routing.append(chosen[None])
        return self._logits(hidden[:, 0])
