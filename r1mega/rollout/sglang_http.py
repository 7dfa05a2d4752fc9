"""The SGLang HTTP-server backend: the same calls as sglang_engine.py, as POSTs to a running server.

Endpoints (SGLang's native API, JSON bodies): /generate, /update_weights_from_tensor,
/init_weights_update_group, /update_weights_from_distributed, /release_memory_occupation,
/resume_memory_occupation, /flush_cache, /abort_request. A generate request the server refuses
(HTTP 400) raises `RequestRejected`; any other failure raises `SGLangError` with the endpoint, the
status and SGLang's message. Standard library only (urllib), so the client needs no SGLang.

`update_weights_from_tensor` over HTTP carries CUDA IPC handles, not the tensors: it works only with a
server on the same node, and the caller keeps the tensors alive until the call returns.

Deliberately left out: launching or stopping the server (the caller owns it), retries, streaming,
authentication (SGLang's --api-key).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any, Optional

from r1mega.rollout.sglang_protocol import RequestRejected, SGLangError, error_message


class HTTPBackend:
    def __init__(self, url: str, *, timeout_s: float = 3600.0, control_timeout_s: float = 600.0):
        self.url = url.rstrip("/")
        self.timeout_s, self.control_timeout_s = timeout_s, control_timeout_s

    def _post(self, path: str, payload: Optional[dict], timeout: Optional[float] = None) -> tuple[int, Any]:
        data = json.dumps(payload if payload is not None else {}).encode()
        request = urllib.request.Request(self.url + path, data=data, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.control_timeout_s) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        except urllib.error.URLError as e:
            raise SGLangError(f"SGLang server {self.url} unreachable ({path}): {e.reason}") from None
        try:
            body = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            body = raw.decode(errors="replace")  # /flush_cache answers in plain text
        return status, body

    def _call(self, path: str, payload: Optional[dict] = None, wait_s: float = 0.0) -> Any:
        status, body = self._post(path, payload, timeout=self.control_timeout_s + wait_s)
        failed = isinstance(body, dict) and body.get("success") is False
        if status != 200 or failed:
            raise SGLangError(f"SGLang {path} failed (HTTP {status}): {error_message(body)}")
        return body

    # ---- generation
    def generate(self, requests: list[dict]) -> list[dict]:
        payload = {"input_ids": [r["input_ids"] for r in requests],
                   "sampling_params": [r["sampling_params"] for r in requests], "return_logprob": True}
        status, body = self._post("/generate", payload, timeout=self.timeout_s)
        if status == 400:
            raise RequestRejected(error_message(body))
        if status != 200 or not isinstance(body, list) or len(body) != len(requests):
            raise SGLangError(f"SGLang /generate failed (HTTP {status}): {error_message(body)}")
        return body

    def abort_all(self) -> None:
        self._call("/abort_request", {"rid": "", "abort_all": True})

    # ---- weights
    def update_weights_from_tensor(self, payloads: list[str], load_format: Optional[str]) -> None:
        self._call("/update_weights_from_tensor",
                   {"serialized_named_tensors": payloads, "load_format": load_format, "flush_cache": False})

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str, backend: str) -> None:
        self._call("/init_weights_update_group",
                   {"master_address": master_address, "master_port": master_port, "rank_offset": rank_offset,
                    "world_size": world_size, "group_name": group_name, "backend": backend})

    def update_weights_from_distributed(self, names: list[str], dtypes: list[str], shapes: list[list[int]],
                                        group_name: str) -> None:
        self._call("/update_weights_from_distributed", {"names": names, "dtypes": dtypes, "shapes": shapes,
                                                        "group_name": group_name, "flush_cache": False})

    def flush_cache(self, wait_idle_s: float = 0.0) -> None:
        """Flushes the prefix cache once the server is idle, waiting up to `wait_idle_s` for running requests."""
        self._call(f"/flush_cache?timeout={wait_idle_s:g}", wait_s=wait_idle_s)

    # ---- memory
    def release_memory_occupation(self, tags: Optional[list[str]]) -> None:
        self._call("/release_memory_occupation", {"tags": tags})

    def resume_memory_occupation(self, tags: Optional[list[str]]) -> None:
        self._call("/resume_memory_occupation", {"tags": tags})

    def shutdown(self) -> None:
        """The server belongs to whoever launched it: nothing to stop here."""
