"""A plain-torch core attention for multi-latent attention (MLA) without TransformerEngine.

megatron-core's local layer spec builds MLA with ``DotProductAttention``, which (0.16) does not
accept the separate key / value head sizes MLA passes (``k_channels`` / ``v_channels``), so a
DeepSeek-V3-style model cannot be built on CPU. This module is the missing piece for CPU runs
(tests, the CPU demo): softmax(Q K^T * scale) V with a boolean mask (True = masked) or causal
masking. The bridges use it only when TransformerEngine is absent.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class CpuLatentCoreAttention(MegatronModule):
    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        k_channels: Optional[int] = None,
        v_channels: Optional[int] = None,
        **_unused,
    ):
        super().__init__(config=config)
        self.attn_mask_type = attn_mask_type
        head_dim = k_channels or config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, packed_seq_params=None, **_):
        if packed_seq_params is not None:
            raise NotImplementedError("CpuLatentCoreAttention covers the padded layout only (no packed sequences)")
        # [s, b, heads, dim] -> [b, heads, s, dim]
        q, k, v = (t.permute(1, 2, 0, 3).float() for t in (query, key, value))
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.softmax_scale
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if attention_mask is not None:
            scores = scores.masked_fill(attention_mask, float("-inf"))
        elif mask_type == AttnMaskType.causal:
            sq, sk = scores.shape[-2:]
            causal = torch.ones(sq, sk, dtype=torch.bool, device=scores.device).triu(1 + sk - sq)
            scores = scores.masked_fill(causal, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs, v).to(value.dtype)  # [b, heads, s, dv]
        b, heads, s, dv = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, b, heads * dv)


@contextlib.contextmanager
def latent_attention_without_te():
    """megatron-core 0.16's MLA module believes TransformerEngine is present when its extension
    module imports (it does without TE, with placeholder objects) and then type-checks against
    ``TELinear``, which is not a class then. Clear that belief while building."""
    from megatron.core.transformer import multi_latent_attention as mla

    if isinstance(getattr(mla, "TELinear", None), type) or not getattr(mla, "HAVE_TE", False):
        yield
        return
    mla.HAVE_TE = False
    try:
        yield
    finally:
        mla.HAVE_TE = True
