"""SGLang's own modules, imported on a CPU-only machine for the tests (install: tools/install_sglang_cpu.py).

Importing SGLang's request types, serialiser and model code reaches `torchvision` through its
multimodal configs (sglang/srt/multimodal/internvl_utils.py, imported by sglang.srt.configs). PyPI's
torchvision wheels link libtorch_cuda.so, so with the CPU torch they fail to import; where that
happens an empty placeholder package stands in for it (nothing the tests run calls it). transformers
is asked first whether torchvision exists, so it keeps answering no and never uses the placeholder.

`SKIP_REASON` is None when SGLang imported, else why it did not (the tests skip with it).

`sglang_model(model_dir)` builds SGLang's own model class for a checkpoint directory, as its model
loader would (config read by SGLang's `get_config`, class by its `ModelRegistry`), inside SGLang's
one-process tensor-parallel world (`sglang_world()`, gloo). Its RotaryEmbedding imports vLLM's rotary
kernel at construction on a platform that is neither CUDA nor SGLang's CPU engine (which needs
sgl-kernel's CPU build, not on PyPI); the weight loaders never call it, so a placeholder module that
raises when called stands in for the construction only.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import socket
import sys
import types


class _Placeholder(types.ModuleType):
    """A module whose every public attribute is a fresh empty class."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = type(name, (), {})
        setattr(self, name, value)
        return value


class _PlaceholderFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, root: str):
        self.root = root

    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] == self.root:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _Placeholder(spec.name)

    def exec_module(self, module):
        module.__path__ = []


def _stub_torchvision_if_broken() -> None:
    try:
        import torchvision  # noqa: F401
    except (ImportError, RuntimeError):  # RuntimeError: "operator torchvision::nms does not exist"
        sys.modules.pop("torchvision", None)
        import transformers.utils.import_utils as hf_imports

        hf_imports.is_torchvision_available()  # cached as False before the placeholder exists
        sys.meta_path.insert(0, _PlaceholderFinder("torchvision"))


def _import_sglang() -> str | None:
    try:
        import sglang  # noqa: F401
    except ImportError as e:
        return f"SGLang is not installed (python tools/install_sglang_cpu.py): {e}"
    _stub_torchvision_if_broken()
    try:
        import sglang.srt.managers.io_struct  # noqa: F401
        import sglang.srt.models.deepseek_common.deepseek_weight_loader  # noqa: F401
    except Exception as e:  # any import-time failure of SGLang's modules on this machine
        return f"SGLang's modules do not import here: {type(e).__name__}: {e}"
    return None


SKIP_REASON = _import_sglang()


@contextlib.contextmanager
def sglang_world():
    """SGLang's model-parallel state at tp = pp = ep = 1 in this process, torn down afterwards (other tests
    expect no default process group)."""
    from sglang.srt.distributed import parallel_state
    from sglang.srt.runtime_context import reset_context
    from sglang.test.layer_ut_utils import init_single_process_dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init_single_process_dist(master_port=port)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        parallel_state.destroy_distributed_environment()
        reset_context()


def _vllm_rotary_placeholder() -> dict[str, types.ModuleType]:
    def rotary_embedding(*args, **kwargs):
        raise RuntimeError("vLLM's rotary kernel is a placeholder in the CPU tests: nothing may run the model")

    vllm, ops = types.ModuleType("vllm"), types.ModuleType("vllm._custom_ops")
    ops.rotary_embedding, vllm._custom_ops = rotary_embedding, ops
    return {"vllm": vllm, "vllm._custom_ops": ops}


def sglang_model(model_dir):
    """SGLang's model for the checkpoint at model_dir (config.json only is read), every parameter NaN, so
    that a parameter no loader call writes stays visible. Call inside `sglang_world()`."""
    import torch
    from sglang.srt.models.registry import ModelRegistry
    from sglang.srt.utils.hf_transformers.config import get_config

    config = get_config(str(model_dir), trust_remote_code=False)
    model_cls, _ = ModelRegistry.resolve_model_cls(config.architectures)
    placeholders = _vllm_rotary_placeholder()
    saved = {name: sys.modules.get(name) for name in placeholders}
    sys.modules.update(placeholders)
    try:
        model = model_cls(config, quant_config=None)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name)
            else:
                sys.modules[name] = module
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    return model
