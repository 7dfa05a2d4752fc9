"""The MoE routing ops in one import: `moe_route`, `moe_permute`, `moe_unpermute`.

The ops live in `moe_route.py` (scores, group-limited top-k, weights) and `moe_permute.py` (sort rows
by expert and combine them back); this module only re-exports them so that callers need one import.
"""

from r1mega.ops.moe_permute import moe_permute, moe_permute_reference, moe_unpermute, moe_unpermute_reference
from r1mega.ops.moe_route import moe_route, moe_route_reference, moe_route_weights

__all__ = [
    "moe_permute",
    "moe_permute_reference",
    "moe_route",
    "moe_route_reference",
    "moe_route_weights",
    "moe_unpermute",
    "moe_unpermute_reference",
]
