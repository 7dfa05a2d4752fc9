"""Work-arounds for megatron-core releases whose no-Transformer-Engine paths are broken (0.16.0).

Two module globals are wrong when `transformer_engine` is not installed:
- `multi_latent_attention.HAVE_TE` is True: it is set by importing megatron's TE extension module,
  which imports without TE and defines `TELinear` as a `unittest.mock.MagicMock` instance; building
  any MLA layer then fails at `isinstance(self.linear_proj, TELinear)` ("arg 2 must be a type").
- `moe_utils.te_general_gemm` is never defined when its TE import fails, so every MoE router's
  forward raises NameError at `if te_general_gemm is not None`.
`apply()` sets exactly those two names to what megatron would have set with a correct import
(HAVE_TE=False, te_general_gemm=None), only when the broken state is detected, so releases that fixed
them and installations with TE are left untouched. Nothing else in megatron or torch is modified.

Deliberately left out: any other patching of megatron-core.
"""

from __future__ import annotations


def apply() -> list[str]:
    """Repairs the globals described above where needed; returns what it changed (for logs/tests)."""
    import megatron.core.transformer.moe.moe_utils as moe_utils
    import megatron.core.transformer.multi_latent_attention as mla

    changed = []
    if getattr(mla, "HAVE_TE", False) and not isinstance(getattr(mla, "TELinear", None), type):
        mla.HAVE_TE = False
        changed.append("multi_latent_attention.HAVE_TE=False")
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
        changed.append("moe_utils.te_general_gemm=None")
    return changed
