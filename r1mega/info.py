"""`r1mega-info`: versions, devices, and which implementation each custom op runs on each device."""

from __future__ import annotations

from importlib import metadata

import torch

# Public op -> the compiled schema op whose presence decides the implementation.
OPS = {
    "grpo_loss": "grpo_loss",
    "group_advantages": "group_advantages",
    "linear_logprob": "linear_logprob",
    "linear_grpo_loss": "linear_logprob_stats",
    "moe_route": "moe_route",
    "moe_permute": "moe_permute",
    "moe_unpermute": "moe_unpermute",
}
OPTIONAL = ("transformers", "megatron-core", "transformer-engine", "apex", "sglang", "math-verify", "hydra-core", "trl")


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def describe() -> str:
    from r1mega.ops import _extension

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    lines = [f"torch {torch.__version__} (cuda {torch.version.cuda}), devices: {', '.join(devices)}",
             f"kernels: {_extension.BUILD}"]
    lines += [f"  {name:<18} " + "  ".join(
        f"{d}: {'kernel' if _extension.has_kernel(schema, d) else 'reference'}" for d in devices)
        for name, schema in OPS.items()]
    lines += [f"{d}: {_version(d)}" for d in OPTIONAL]
    return "\n".join(lines)


def main() -> None:
    print(describe())


if __name__ == "__main__":
    main()
