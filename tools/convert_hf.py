"""Convert checkpoints between the Hugging Face hub layout and r1mega's native format.

    python tools/convert_hf.py to-native SRC_HF_DIR DST_DIR [--dtype bfloat16] [--max-shard-gb 5]
    python tools/convert_hf.py to-hf SRC_NATIVE_DIR DST_DIR [--dtype bfloat16] [--overwrite]

Tensors stream shard by shard (DeepSeek-V3's FP8 weights are dequantised to bf16 on the way), so a
671B checkpoint converts without two copies in memory. The destination is written under a temporary
name and renamed at the end. Tokenizer files are not copied.
"""

from __future__ import annotations

import argparse
import sys

import torch

from r1mega.models.checkpoint import CheckpointError
from r1mega.models.hf import convert_hf_to_native, convert_native_to_hf

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("direction", choices=["to-native", "to-hf"])
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast floating tensors (default: keep)")
    parser.add_argument("--max-shard-gb", type=float, default=5.0)
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    args = parser.parse_args(argv)
    convert = convert_hf_to_native if args.direction == "to-native" else convert_native_to_hf
    try:
        out = convert(args.src, args.dst, dtype=DTYPES.get(args.dtype), max_shard_bytes=int(args.max_shard_gb * 2**30),
                      overwrite=args.overwrite)
    except (CheckpointError, FileExistsError, ValueError) as e:
        print(f"convert_hf: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
