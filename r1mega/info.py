"""`r1mega-info`: versions, devices, and which implementation each custom op runs on each device."""

from __future__ import annotations

import importlib

import torch

# Public op -> the compiled schema op whose presence decides the implementation.
OPS = {
    "grpo_loss": "grpo_loss",
    "group_advantages": "group_advantages",
    "linear_logprob": "linear_logprob",
    "linear_grpo_loss": "linear_grpo_loss",
    "moe_route": "moe_route",
    "moe_permute": "moe_permute",
    "moe_unpermute": "moe_unpermute",
}
OPTIONAL = ("transformers", "megatron.core", "transformer_engine", "apex", "sglang", "math_verify", "hydra")


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception:
        return "not installed"


def describe() -> str:
    from r1mega.ops import _extension

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    lines = [f"torch {torch.__version__} (cuda {torch.version.cuda}), devices: {', '.join(devices)}",
             f"kernels: {_extension.BUILD}"]
    lines += [f"  {name:<18} " + "  ".join(
        f"{d}: {'kernel' if _extension.has_kernel(schema, d) else 'reference'}" for d in devices)
        for name, schema in OPS.items()]
    lines += [f"{m}: {_version(m)}" for m in OPTIONAL]
    return "\n".join(lines)


def main() -> None:
    print(describe())


if __name__ == "__main__":
    main()
