"""Triton kernels for hf_effattn's mixers (installed as `hf_effattn.kernels`; importing it needs triton).

Each op has a pure-PyTorch reference in `hf_effattn.ops_reference`; the mixers fall back to it when Triton or a
GPU is missing.
"""

from .block_topk import block_topk_attention, block_topk_rotary, block_topk_select
from .decoder_fusion import rms_norm, silu_mul
from .linear_attn import (
    chunk_delta_rule,
    chunk_gated_delta_rule,
    chunk_gla,
    chunk_kda,
    chunk_linear_attention,
    fused_recurrent_delta_rule,
    fused_recurrent_gated_delta_rule,
    fused_recurrent_gla,
    fused_recurrent_kda,
    fused_recurrent_linear_attention,
)
from .linear_mixer_fusion import gated_rms_norm, short_conv_qkv
from .sliding_window import sliding_window_attention, sliding_window_decode

__all__ = [
    "block_topk_attention",
    "block_topk_rotary",
    "block_topk_select",
    "chunk_delta_rule",
    "chunk_gated_delta_rule",
    "chunk_gla",
    "chunk_kda",
    "chunk_linear_attention",
    "fused_recurrent_delta_rule",
    "fused_recurrent_gated_delta_rule",
    "fused_recurrent_gla",
    "fused_recurrent_kda",
    "fused_recurrent_linear_attention",
    "gated_rms_norm",
    "rms_norm",
    "short_conv_qkv",
    "silu_mul",
    "sliding_window_attention",
    "sliding_window_decode",
]
