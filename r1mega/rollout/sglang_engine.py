"""The in-process SGLang backend: `sglang.Engine` (tokenizer manager in this process, scheduler and
detokenizer in subprocesses on the same GPUs), behind the same calls as sglang_http.py.

`require_sglang()` is the only import of SGLang in r1mega: it fails with the extra to install.
`ipc_serializer()` returns SGLang's own `MultiprocessingSerializer` (base64 text) after applying SGLang's
patch of torch's CUDA tensor reduction (`monkey_patch_torch_reductions`: handles name the device by
UUID, which the scheduler's rebuild expects; SGLang's serialiser does not apply it itself), and its
`FlattenedTensorMetadata`, one of the few classes the scheduler's `SafeUnpickler` accepts.

Threads: `sglang.Engine` runs its tokenizer manager on an asyncio loop driven by the caller's thread
(each call is `loop.run_until_complete`), and its zmq sockets are not thread-safe, so `abort_all`
from another thread is queued onto that loop (`call_soon_threadsafe`) while a generate call runs,
and is a no-op otherwise (nothing runs then; a queued abort must not hit the next call).

Deliberately left out: launching a server (sglang_http.py talks to one), Ray, multi-node engines.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, Callable, Optional

from r1mega.rollout.sglang_protocol import RequestRejected, SGLangError

INSTALL_HINT = "SGLang is not installed: install the extra with `pip install r1mega[sglang]`"


def require_sglang(module: str = "sglang"):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} (importing {module} failed: {e})") from e


def ipc_serializer() -> tuple[Callable[[Any], str], type]:
    """(serialize(obj) -> str, FlattenedTensorMetadata class), both SGLang's."""
    utils = require_sglang("sglang.srt.utils")
    require_sglang("sglang.srt.utils.patch_torch").monkey_patch_torch_reductions()  # idempotent
    try:  # the class moved between SGLang releases
        metadata_cls = require_sglang("sglang.srt.weight_sync.tensor_bucket").FlattenedTensorMetadata
    except ImportError:
        metadata_cls = require_sglang("sglang.srt.model_executor.model_runner").FlattenedTensorMetadata
    return functools.partial(utils.MultiprocessingSerializer.serialize, output_str=True), metadata_cls


def trainer_process_group(master_address: str, master_port: int, world_size: int, group_name: str, backend: str):
    """The trainer's end (rank 0) of a weight-broadcast group whose other ranks are the engine's."""
    utils = require_sglang("sglang.srt.utils")
    return utils.init_custom_process_group(backend=backend, init_method=f"tcp://{master_address}:{master_port}",
                                           world_size=world_size, rank=0, group_name=group_name)


def _check(result: Any, call: str) -> None:
    """SGLang's control calls answer (success, message), an object with .success, or None."""
    success, message = True, ""
    if isinstance(result, tuple) and result and isinstance(result[0], bool):
        success, message = result[0], result[1] if len(result) > 1 else ""
    elif hasattr(result, "success"):
        success, message = bool(result.success), getattr(result, "message", "")
    if not success:
        raise SGLangError(f"SGLang {call} failed: {message}")


class InProcessBackend:
    def __init__(self, engine):
        self.engine = engine
        self._generating = 0  # the running generate call's number, 0 when none runs
        self._calls = 0

    @classmethod
    def launch(cls, **server_args) -> "InProcessBackend":
        """Starts `sglang.Engine(**server_args)` (ServerArgs' fields: model_path, tp_size, mem_fraction_static,
        enable_memory_saver, dtype, ...)."""
        return cls(require_sglang().Engine(**server_args))

    # ---- generation
    def generate(self, requests: list[dict]) -> list[dict]:
        self._calls += 1
        self._generating = self._calls
        try:
            return self.engine.generate(input_ids=[r["input_ids"] for r in requests],
                                        sampling_params=[r["sampling_params"] for r in requests], return_logprob=True)
        except ValueError as e:  # SGLang's validation of a request (too long, bad parameter)
            raise RequestRejected(str(e)) from None
        finally:
            self._generating = 0

    def abort_all(self) -> None:
        """Safe from any thread (module docstring)."""
        call = self._generating
        if not call:
            return

        def abort_on_loop():
            if self._generating == call:  # still the call the abort was meant for
                self.engine.tokenizer_manager.abort_request(abort_all=True)

        self.engine.loop.call_soon_threadsafe(abort_on_loop)

    # ---- weights
    def update_weights_from_tensor(self, payloads: list[str], load_format: Optional[str]) -> None:
        _check(self.engine.update_weights_from_tensor(named_tensors=payloads, load_format=load_format,
                                                      flush_cache=False), "update_weights_from_tensor")

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str, backend: str) -> None:
        _check(self.engine.init_weights_update_group(master_address=master_address, master_port=master_port,
                                                     rank_offset=rank_offset, world_size=world_size,
                                                     group_name=group_name, backend=backend),
               "init_weights_update_group")

    def update_weights_from_distributed(self, names: list[str], dtypes: list[str], shapes: list[list[int]],
                                        group_name: str) -> None:
        _check(self.engine.update_weights_from_distributed(names=names, dtypes=dtypes, shapes=shapes,
                                                           group_name=group_name, flush_cache=False),
               "update_weights_from_distributed")

    def flush_cache(self, wait_idle_s: float = 0.0) -> None:
        """Flushes the prefix cache once the scheduler is idle, waiting up to `wait_idle_s` for running requests."""
        _check(self.engine.loop.run_until_complete(self.engine.tokenizer_manager.flush_cache(timeout_s=wait_idle_s)),
               "flush_cache")

    # ---- memory
    def release_memory_occupation(self, tags: Optional[list[str]]) -> None:
        _check(self.engine.release_memory_occupation(tags=tags), "release_memory_occupation")

    def resume_memory_occupation(self, tags: Optional[list[str]]) -> None:
        _check(self.engine.resume_memory_occupation(tags=tags), "resume_memory_occupation")

    def shutdown(self) -> None:
        self.engine.shutdown()
