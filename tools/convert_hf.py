"""Convert checkpoints between the Hugging Face hub layout, r1mega's native format and megatron-core's.

    python tools/convert_hf.py to-native SRC_HF_DIR DST_DIR [--dtype bfloat16] [--max-shard-gb 5]
    python tools/convert_hf.py to-hf SRC_NATIVE_DIR DST_DIR [--dtype bfloat16] [--overwrite]
    python tools/convert_hf.py to-megatron SRC_HF_OR_NATIVE_DIR DST_DIR [--layout local|te]
    python tools/convert_hf.py megatron-to-native SRC_MEGATRON_DIR DST_DIR

Tensors stream shard by shard (DeepSeek-V3's FP8 weights are dequantised to bf16 on the way), so a
671B checkpoint converts without two copies in memory. The destination is written under a temporary
name and renamed at the end. Tokenizer files are not copied.
"""

from __future__ import annotations

import argparse
import sys

import torch

from r1mega.backends.megatron.convert import convert_megatron_to_native, convert_to_megatron
from r1mega.models.checkpoint import CheckpointError
from r1mega.models.hf import convert_hf_to_native, convert_native_to_hf

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("direction", choices=["to-native", "to-hf", "to-megatron", "megatron-to-native"])
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast floating tensors (default: keep)")
    parser.add_argument("--max-shard-gb", type=float, default=5.0)
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    parser.add_argument("--layout", choices=["local", "te"], default="local",
                        help="megatron module names: local spec, or Transformer Engine's fused ones")
    args = parser.parse_args(argv)
    common = dict(max_shard_bytes=int(args.max_shard_gb * 2**30), overwrite=args.overwrite)
    try:
        if args.direction in ("to-native", "to-hf"):
            convert = convert_hf_to_native if args.direction == "to-native" else convert_native_to_hf
            out = convert(args.src, args.dst, dtype=DTYPES.get(args.dtype), **common)
        elif args.direction == "to-megatron":
            out = convert_to_megatron(args.src, args.dst, layout=args.layout, **common)
        else:
            out = convert_megatron_to_native(args.src, args.dst, **common)
    except (CheckpointError, FileExistsError, ValueError) as e:
        print(f"convert_hf: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
