"""`full`: softmax attention through transformers' attention interface (sdpa, eager, flash...).

A prefill in chunks through the cache (the new tokens after `P` cached ones, no padding) runs on SDPA without the
`[chunk, P + chunk]` mask transformers would build: at 1M tokens that mask alone is gigabytes per chunk, and a masked
SDPA call cannot use the flash or cuDNN kernels.

A decode step on a static cache (one new token per row, no padding, no gradient, sdpa) on CUDA runs the split-KV
Triton kernel (`decode_attention.py`) where triton imports. It reads only the valid part of the buffer, given as a
tensor, so one compiled step and its CUDA graph serve every length; SDPA would need the static cache's mask, which
takes it off its fastest kernels (H100, 1.5b shape, one layer's step: 0.20 vs 0.36 ms at 128k tokens, B = 1). It is a
torch custom op, so compiled graphs hold it whole. On a dynamic cache (all keys valid, no mask) SDPA's cuDNN kernel
is as fast or slightly faster (0.18 ms at 128k), and runs.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

from .mixer_common import RMSNorm, TritonOps, apply_rotary

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # on Hopper, SDPA's cuDNN backend measured 1.6x its flash backend (bf16, causal, 8k-128k tokens)
    _SDPA_PRIORITY = [
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.MATH,
    ]
except ImportError:
    sdpa_kernel = None

# which attention a decode step runs: None = the Triton split-KV kernel on CUDA tensors when triton imports, else
# SDPA; tests set "triton" or "reference" (SDPA) to force one
DECODE_OPS_OVERRIDE = None


def _import_decode_op():
    from .decode_attention import decode_attention

    return decode_attention


DECODE_OPS = TritonOps("full-attention", _import_decode_op, fallback="SDPA in decode steps (slower at long contexts)")


def decode_op(x: torch.Tensor):
    """The split-KV decode op for `x`, or None for SDPA."""
    if DECODE_OPS_OVERRIDE == "reference" or not (x.is_cuda or DECODE_OPS_OVERRIDE == "triton"):
        return None
    # a custom op: compiled graphs keep it whole. Eager forwards (a prefill too) import it first; where a compiled
    # step comes first, dynamo traces the import (checked with torch 2.13 in tests/kernels/test_decode_attention.py)
    return DECODE_OPS.get()


# SDPA kernels that also return the log-sum-exp of each query's scores, fastest first; one that fails on this
# machine is skipped from then on
_LSE_KERNELS = ["cudnn", "flash", "efficient"]


def _kernel_with_lse(kernel: str, q, k, v, scale: float, is_causal: bool):
    ops = torch.ops.aten
    if kernel == "cudnn":
        out = ops._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, is_causal, False, scale=scale)
    elif kernel == "flash":
        out = ops._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal, False, scale=scale)
    else:
        out = ops._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, is_causal, scale=scale)
    return out[0], out[1]


def _math_with_lse(q, k, v, scale: float, is_causal: bool):
    """The same in fp32 matmuls, a block of queries at a time so that the scores stay under 2^26 elements."""
    batch, heads, seq_len, _ = q.shape
    kv_len = k.shape[2]
    keys, values = k.float().transpose(-1, -2), v.float()
    rows = max(1, (1 << 26) // (batch * heads * kv_len))
    outputs, lses = [], []
    for start in range(0, seq_len, rows):
        scores = (q[:, :, start : start + rows].float() @ keys) * scale
        if is_causal:
            # top-left aligned, as SDPA's is_causal: query i sees keys 0..i
            query_index = torch.arange(start, start + scores.shape[2], device=q.device)[:, None]
            scores = scores.masked_fill(torch.arange(kv_len, device=q.device) > query_index, float("-inf"))
        lse = scores.logsumexp(-1)
        outputs.append(((scores - lse[..., None]).exp() @ values).to(q.dtype))
        lses.append(lse)
    return torch.cat(outputs, dim=2), torch.cat(lses, dim=2)


def attention_with_lse(q, k, v, scale: float, is_causal: bool):
    """(o `[B, H, T, D]`, fp32 log-sum-exp `[B, H, T]`) of softmax attention; q `[B, H, T, D]`, k, v `[B, H, L, D]`."""
    batch, heads, seq_len, _ = q.shape
    if q.is_cuda:
        for kernel in list(_LSE_KERNELS):
            try:
                out, lse = _kernel_with_lse(kernel, q, k, v, scale, is_causal)
            except (RuntimeError, NotImplementedError):
                _LSE_KERNELS.remove(kernel)
                continue
            # cuDNN returns [B, H, T, 1], the efficient kernel pads T to a multiple of 32
            return out, lse.reshape(batch, heads, -1)[..., :seq_len].float()
    return _math_with_lse(q, k, v, scale, is_causal)


def offset_causal_attention(query, key, value, scale: float) -> torch.Tensor:
    """Attention of C new queries over P cached keys and the C new keys, each query seeing every cached key and the
    new keys up to its own, without a `[C, P + C]` mask: the cached part (no mask) and the new part (causal, square)
    run as two SDPA calls merged by their log-sum-exps.

    query `[B, H, C, D]`; key, value `[B, Hkv, P + C, D]`. Returns `[B, C, H, D]`, the attention interface's layout.
    """
    batch, heads, seq_len, head_dim = query.shape
    kv_heads, past = key.shape[1], key.shape[2] - seq_len
    groups = heads // kv_heads
    # every query sees every cached key: the query heads of a group fold into one longer query sequence over their
    # shared key/value head, so the cached keys and values are never repeated per query head
    folded = query.reshape(batch, kv_heads, groups * seq_len, head_dim)
    out_past, lse_past = attention_with_lse(folded, key[:, :, :past], value[:, :, :past], scale, False)
    out_past = out_past.reshape(batch, heads, seq_len, head_dim)
    lse_past = lse_past.reshape(batch, heads, seq_len)
    # [B, H, C, D]: the new keys and values, repeated over each query group (only C tokens)
    key_new = key[:, :, past:].repeat_interleave(groups, dim=1)
    value_new = value[:, :, past:].repeat_interleave(groups, dim=1)
    out_new, lse_new = attention_with_lse(query, key_new, value_new, scale, True)
    top = torch.maximum(lse_past, lse_new)
    weight_past, weight_new = (lse_past - top).exp(), (lse_new - top).exp()
    merged = out_past.float() * weight_past[..., None] + out_new.float() * weight_new[..., None]
    merged = merged / (weight_past + weight_new)[..., None]
    return merged.to(query.dtype).transpose(1, 2)


class FullAttention(nn.Module):
    """Llama/Mistral/Qwen2/Qwen3 attention: GQA, optional q/k/v bias, optional per-head q/k RMSNorm."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.attention_out_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        query_start: int | torch.Tensor = 0,
        kv_len: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """`kv_len`: on a decode step of a static cache without padding, the valid keys of its buffer (a tensor, so
        that a compiled step serves every length); the decode kernel then reads those and no mask."""
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        # [B, T, H, D]
        query_states = self.q_proj(hidden_states).view(hidden_shape)
        key_states = self.k_proj(hidden_states).view(hidden_shape)
        if self.config.qk_norm:
            query_states, key_states = self.q_norm(query_states), self.k_norm(key_states)
        cos, sin = position_embeddings
        query_states, key_states = apply_rotary(query_states, key_states, cos, sin)
        # [B, H, T, D]
        query_states, key_states = query_states.transpose(1, 2), key_states.transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)

        implementation = self.config._attn_implementation
        seq_len = query_states.shape[2]
        # one query token over keys that are all valid: a static buffer's first `kv_len` slots, or every key when the
        # model passed no mask (a dynamic cache without padding: a static buffer always gets kv_len or a mask). There,
        # cuDNN's SDPA builds an execution plan for each new key count (measured: about 7 ms of host time per layer
        # and step in eager decode); the decode kernel has no such set-up
        unmasked_step = seq_len == 1 and (kv_len is not None or attention_mask is None)
        decode = decode_op(query_states) if implementation == "sdpa" and unmasked_step else None
        if (
            decode is not None
            and not (self.training and self.attention_dropout > 0)
            and not (torch.is_grad_enabled() and any(x.requires_grad for x in (query_states, key_states, value_states)))
        ):
            # [B, H, 1, D]: the first `kv_len` keys of the static buffer, or all of them
            attn_output = decode(query_states, key_states, value_states, kv_len, self.scaling)
            return self.o_proj(attn_output.transpose(1, 2).reshape(*input_shape, -1))
        if (
            implementation == "sdpa"
            and attention_mask is None
            and isinstance(query_start, int)
            and query_start > 0
            and seq_len > 1
            and key_states.shape[2] == query_start + seq_len
        ):
            # a chunk after cached tokens, whose causal mask the model left out (see EffAttnModel.forward)
            attn_output = offset_causal_attention(query_states, key_states, value_states, self.scaling)
            return self.o_proj(attn_output.reshape(*input_shape, -1).contiguous())
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        kwargs.pop("output_attentions", None)
        args = (self, query_states, key_states, value_states, attention_mask)
        options = dict(dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling, **kwargs)
        if implementation == "sdpa" and sdpa_kernel is not None and query_states.is_cuda:
            with sdpa_kernel(_SDPA_PRIORITY, set_priority=True):
                attn_output, _ = attention_interface(*args, **options)
        else:
            attn_output, _ = attention_interface(*args, **options)
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output)
