"""The SGLang rollout engine: r1mega's `Engine` protocol on top of SGLang, in process or over HTTP.

The backend is `sglang.Engine` in this process (sglang_engine.py; `from_policy` saves the policy and
tokenizer as a Hugging Face checkpoint in a temporary directory and starts it there, colocated on the
same GPUs) or a running SGLang server (sglang_http.py, `SGLangConfig.url`). Both answer the same calls;
this file holds what does not depend on which (request and response handling: sglang_protocol.py).

- generate: one SGLang request per sample, all in one batch; prompts failing validation get error
  samples without being sent, and if SGLang refuses the batch, each request is retried alone so only
  the bad ones become error samples. `Sample.logprobs` means what it means for the native engine
  (so `from_policy` refuses to start SGLang with SGLANG_RETURN_ORIGINAL_LOGPROB set, and requests at a
  temperature in (0, 1e-6), which SGLang decodes greedily, become error samples).
  Seeds: SGLang honours a per-request `sampling_seed` only with `--enable-deterministic-inference`;
  `deterministic=True` sends one per sample (mixed from SamplingParams.seed, the prompt and the sample
  index, as the native engine mixes it; the tokens still differ from the native engine's).
- update_weights: the stream (native or HF names) is renamed to HF names (SGLang's loaders take
  checkpoint names), cast to the engine's dtype (the DeepSeek-V3 router bias stays fp32), moved to
  this process's GPU and sent bucket by bucket: flattened buckets through CUDA IPC
  (`update_weights_from_tensor`, load_format "flattened_bucket", one serialisation per TP rank), or,
  after `init_weights_update_group`, names/dtypes/shapes through `update_weights_from_distributed`
  while this process broadcasts the tensors from rank 0 of the group (engines on other devices).
  Buckets never split DeepSeek-V3's q_a_proj / kv_a_proj_with_mqa pair (SGLang fuses the two only
  within one load call: sglang_protocol.loading_units). The prefix cache is flushed once after the
  last bucket (waiting, up to `timeout_s`, for requests still draining after an abort: SGLang
  flushes only an idle engine), then `version` is set.
- Context: `from_policy` gives SGLang the policy's max_position_embeddings as its context length (it
  would otherwise derive its own, e.g. scaled by a rope factor); prompt + max_new_tokens up to it is
  accepted by both engines, longer is refused here before sending.
- Abort: `abort` may be called from any thread; the backend hands it to the thread that owns SGLang's
  connection (backends' `abort_all`).
- Memory: `release_memory` frees weights, KV cache and CUDA graphs (the engine must run with
  `enable_memory_saver`; SGLang releases only an idle engine, so requests still draining after an
  abort are waited for first); `update_weights` resumes the weights alone before writing them, and
  `resume_memory` then brings back the KV cache and CUDA graphs, so the cache is never allocated
  while the trainer still holds its memory. After the weights were released, their contents are gone:
  `generate` refuses to run until `update_weights` has written them (it must carry every tensor).

Deliberately left out: engines spread over several nodes, Ray, prompt logprobs, streaming.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch

from r1mega.config import SGLangConfig
from r1mega.rollout.engine import Prompts, Sample, SamplingParams, validate
from r1mega.rollout.sglang_protocol import (RequestRejected, SGLangError, broadcast_meta, bucket_payloads, expand,
                                            flat_buckets, flatten, loading_buckets, parse_output, to_hf)
from r1mega.rollout.weight_sync import DEFAULT_BUCKET_BYTES

WEIGHTS, KV_CACHE, CUDA_GRAPH = "weights", "kv_cache", "cuda_graph"  # SGLang's memory tags
ALL_TAGS = (WEIGHTS, KV_CACHE, CUDA_GRAPH)
_FP32_NAMES = ("e_score_correction_bias",)  # kept in fp32 by SGLang's DeepSeek router
RAW_LOGPROBS = "SGLANG_RETURN_ORIGINAL_LOGPROB"  # SGLang's switch to logprobs of the unscaled logits


def _concurrently(side: Callable[[], None], main: Callable[[], None], timeout_s: float) -> None:
    """Runs `side` in a thread while `main` runs here (the backend's calls stay on this thread, which
    owns the in-process engine's event loop); raises the first error of either."""
    errors: list[BaseException] = []

    def run():
        try:
            side()
        except BaseException as e:  # re-raised below, on the caller's thread
            errors.append(e)

    thread = threading.Thread(target=run, name="r1mega-sglang-broadcast", daemon=True)
    thread.start()
    try:
        main()
    except BaseException:
        thread.join(1.0)  # the other side will never answer: do not wait for it
        raise
    thread.join(timeout_s)
    if thread.is_alive():
        raise SGLangError(f"the trainer's side of the weight broadcast did not finish within {timeout_s} s")
    if errors:
        raise errors[0]


class SGLangEngine:
    def __init__(self, backend, *, config=None, tokenizer=None, tp_size: int = 1, dtype: Optional[torch.dtype] = None,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, send_seed: bool = False, max_len: Optional[int] = None,
                 serializer: Optional[tuple[Callable[[Any], str], type]] = None, device=None,
                 group_factory: Optional[Callable] = None, timeout_s: float = 3600.0,
                 workdir: Optional[Path] = None):
        """backend: InProcessBackend or HTTPBackend (or anything with their methods). config: the
        ModelConfig (native names are renamed with it; without it, updates must carry HF names).
        serializer: (serialize, metadata class), SGLang's by default. device: where update tensors
        go before sending (default: the current CUDA device, if any). group_factory: makes the
        trainer's end of a broadcast group (SGLang's init_custom_process_group by default)."""
        self.backend, self.config, self.tokenizer = backend, config, tokenizer
        self.tp_size, self.dtype, self.bucket_bytes = tp_size, dtype, bucket_bytes
        self.send_seed, self.max_len, self.timeout_s = send_seed, max_len, timeout_s
        self.vocab_size = config.vocab_size if config is not None else None
        self.max_positions = config.max_position_embeddings if config is not None else None
        if device is None and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = torch.device(device) if device is not None else None
        self._serializer, self._group_factory, self.workdir = serializer, group_factory, workdir
        self._group: Optional[tuple[Any, str]] = None  # (trainer's process group, its name)
        self._released: set[str] = set()
        self._weights_stale = False
        self.version = 0

    @classmethod
    def from_policy(cls, policy, tokenizer, rollout_cfg=None, options: Optional[SGLangConfig] = None) -> "SGLangEngine":
        """An engine serving `policy`'s current weights. Options: `options`, else `rollout_cfg.sglang`,
        else the defaults."""
        options = options or getattr(rollout_cfg, "sglang", None) or SGLangConfig()
        common = dict(config=policy.config, tokenizer=tokenizer, tp_size=options.tp_size,
                      dtype=getattr(torch, options.dtype), bucket_bytes=options.bucket_bytes,
                      send_seed=options.deterministic, timeout_s=options.timeout_s)
        if options.url:
            from r1mega.rollout.sglang_http import HTTPBackend

            engine = cls(HTTPBackend(options.url, timeout_s=options.timeout_s), **common)
            engine.update_weights(policy.state_dict().items(), version=0)  # the server may hold another checkpoint
            return engine
        from r1mega.models.hf import save
        from r1mega.rollout.sglang_engine import InProcessBackend, require_sglang

        if os.environ.get(RAW_LOGPROBS, "false").lower() in ("true", "1"):  # SGLang's reading of the flag
            raise ValueError(f"{RAW_LOGPROBS} is set: SGLang would report logprobs before the temperature, "
                             "which the trainer's importance ratios do not expect; unset it")
        require_sglang()  # fail before writing the checkpoint
        workdir = Path(tempfile.mkdtemp(prefix="r1mega-sglang-"))
        try:
            model_path = save(policy, workdir / "model")
            tokenizer.save(model_path)
            server_args = dict(model_path=str(model_path), tp_size=options.tp_size, dtype=options.dtype,
                               context_length=policy.config.max_position_embeddings,
                               mem_fraction_static=options.mem_fraction_static, enable_memory_saver=True)
            if options.deterministic:
                server_args["enable_deterministic_inference"] = True
            backend = InProcessBackend.launch(**{**server_args, **options.server_args})
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        return cls(backend, workdir=workdir, **common)

    def shutdown(self) -> None:
        self.backend.shutdown()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # ---- generation
    def generate(self, prompts: Prompts, sampling: SamplingParams | Sequence[SamplingParams]) -> list[list[Sample]]:
        params = [sampling] * len(prompts) if isinstance(sampling, SamplingParams) else list(sampling)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        if self._released:
            raise RuntimeError(f"the engine's memory is released ({', '.join(sorted(self._released))}): call "
                               "resume_memory() before generate()")
        if self._weights_stale:
            raise RuntimeError("the engine's weights were released and not rewritten since: call update_weights() "
                               "with every tensor before generate()")
        results: list[list[Optional[Sample]]] = []
        pending = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            n = p.n if isinstance(p.n, int) and p.n >= 1 else 1
            try:
                if isinstance(prompt, str):
                    if self.tokenizer is None:
                        raise ValueError("a text prompt needs a tokenizer")
                    prompt = self.tokenizer.encode(prompt)
                prompt = list(prompt)
                validate(prompt, p, vocab_size=self.vocab_size, max_len=self.max_len, max_positions=self.max_positions)
                pending += expand(i, prompt, p, send_seed=self.send_seed,
                                  default_seed=lambda: int(torch.randint(0, 2**62, ())))
                results.append([None] * n)
            except (ValueError, TypeError) as e:
                ids = list(prompt) if not isinstance(prompt, str) else []
                results.append([Sample(prompt_ids=ids, finish_reason="error", error=str(e)) for _ in range(n)])
        for ps, out in zip(pending, self._run([ps.request for ps in pending])):
            results[ps.prompt_index][ps.index] = (
                parse_output(out, ps.prompt, ps.params, self.tokenizer) if isinstance(out, dict)
                else Sample(prompt_ids=ps.prompt, finish_reason="error", error=out))
        return results

    def _run(self, requests: list[dict]) -> list[dict | str]:
        """SGLang's output per request, or the message of SGLang's refusal of that request."""
        if not requests:
            return []
        try:
            return self.backend.generate(requests)
        except RequestRejected:  # one bad request fails SGLang's whole batch: find it
            outputs: list[dict | str] = []
            for request in requests:
                try:
                    outputs.append(self.backend.generate([request])[0])
                except RequestRejected as e:
                    outputs.append(f"SGLang refused the request: {e}")
            return outputs

    def abort(self) -> None:
        """Aborts every running request (from another thread); their samples come back as errors."""
        self.backend.abort_all()

    # ---- weights
    def _prepare(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """HF names, the engine's dtype, the sending device."""
        stream = to_hf(self.config, named_tensors) if self.config is not None else iter(named_tensors)
        for name, t in stream:
            t = t.detach()
            if self.dtype is not None and t.is_floating_point() and not name.endswith(_FP32_NAMES):
                t = t.to(self.dtype)
            yield name, t if self.device is None else t.to(self.device)

    def init_weights_update_group(self, master_address: str, master_port: int, world_size: int, *,
                                  group_name: str = "r1mega_weights", backend: str = "nccl", rank_offset: int = 1) -> None:
        """Joins this process (rank 0) and the engine's ranks (rank_offset ...) in a broadcast group; later
        updates go through it instead of CUDA IPC."""
        factory = self._group_factory
        if factory is None:
            from r1mega.rollout.sglang_engine import trainer_process_group as factory
        made = []
        _concurrently(lambda: made.append(factory(master_address, master_port, world_size, group_name, backend)),
                      lambda: self.backend.init_weights_update_group(master_address, master_port, rank_offset,
                                                                     world_size, group_name, backend),
                      self.timeout_s)
        self._group = (made[0], group_name)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        if WEIGHTS in self._released:
            self.backend.resume_memory_occupation([WEIGHTS])
            self._released.discard(WEIGHTS)
        stream = self._prepare(named_tensors)
        if self._group is None:
            serialize, metadata_cls = self._serializer or self._default_serializer()
            for bucket in flat_buckets(stream, self.bucket_bytes):
                flat, metas = flatten(bucket)
                del bucket  # the flat copy is what SGLang reads; it stays alive until the call returns
                self.backend.update_weights_from_tensor(
                    bucket_payloads(flat, metas, self.tp_size, serialize, metadata_cls), "flattened_bucket")
        else:
            group, name = self._group
            for bucket in loading_buckets(stream, self.bucket_bytes):
                names, dtypes, shapes = broadcast_meta(bucket)
                _concurrently(lambda: [group.broadcast(t.contiguous(), 0).wait() for _, t in bucket],
                              lambda: self.backend.update_weights_from_distributed(names, dtypes, shapes, name),
                              self.timeout_s)
        self.backend.flush_cache(self.timeout_s)  # cached prefixes hold keys/values of the old weights
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.ipc_collect()  # frees the buckets SGLang has finished reading
        self._weights_stale = False
        self.version = version

    def _default_serializer(self):
        from r1mega.rollout.sglang_engine import ipc_serializer

        self._serializer = ipc_serializer()
        return self._serializer

    # ---- memory
    def release_memory(self) -> None:
        tags = [t for t in ALL_TAGS if t not in self._released]
        if tags:
            self.backend.flush_cache(self.timeout_s)  # returns once no request is left (SGLang asserts idle)
            self.backend.release_memory_occupation(tags)
            self._released.update(tags)
            self._weights_stale |= WEIGHTS in tags

    def resume_memory(self) -> None:
        # weights first, then KV cache + CUDA graphs: the order SGLang's own RL examples use
        if WEIGHTS in self._released:
            self.backend.resume_memory_occupation([WEIGHTS])
            self._released.discard(WEIGHTS)
        rest = [t for t in ALL_TAGS if t in self._released]
        if rest:
            self.backend.resume_memory_occupation(rest)
            self._released.difference_update(rest)
