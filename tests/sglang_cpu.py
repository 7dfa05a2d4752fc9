"""SGLang's own modules, imported on a CPU-only machine for the tests (install: tools/install_sglang_cpu.py).

Importing SGLang's request types, serialiser and model code reaches `torchvision` through its
multimodal configs (sglang/srt/multimodal/internvl_utils.py, imported by sglang.srt.configs). PyPI's
torchvision wheels link libtorch_cuda.so, so with the CPU torch they fail to import; where that
happens an empty placeholder package stands in for it (nothing the tests run calls it). transformers
is asked first whether torchvision exists, so it keeps answering no and never uses the placeholder.

`SKIP_REASON` is None when SGLang imported, else why it did not (the tests skip with it).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
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
