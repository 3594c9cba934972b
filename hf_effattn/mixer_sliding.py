"""`sliding`: causal sliding-window softmax attention with optional sink tokens and learned sink logits.

The cache holds only the window (transformers' sliding-window cache layer) plus the sink tokens, kept on that layer
(`SinkWindowLayer`) so that batch reorders (beam search) move them with their rows. Sink tokens are the first *real*
tokens of each row, so left padding never changes what a row attends to.

On CUDA tensors, where triton imports, the attention runs on the Triton kernels (`sliding_window.py`): prefill and
training when each row's real tokens form one run (no padding, left or right padding), and cached steps (decode)
against the bounded cache when no gradient is needed. Anything else runs the torch reference.
"""

import torch
from torch import nn
from transformers.cache_utils import DynamicSlidingWindowLayer, LinearAttentionAndSlidingWindowAttentionLayer

from .cache_layers import LinearStateRowsMixin, RowStateLayerMixin, row_state_layer
from .mixer_common import Padding, RMSNorm, TritonOps, apply_rotary, key_padding_mask
from .ops_reference import sliding_window_attention

# which attention the windowed layers run: None = the Triton kernels on CUDA tensors when triton imports, else the
# torch reference; tests set "triton" or "reference" to force one
SLIDING_OPS_OVERRIDE = None


def _import_sliding_ops():
    from .sliding_window import sliding_window_attention as prefill_op
    from .sliding_window import sliding_window_decode as decode_op

    return prefill_op, decode_op


SLIDING_OPS = TritonOps("sliding-window", _import_sliding_ops)


def triton_sliding_ops():
    """(prefill/training op, decode op) Triton kernels, or None where triton is missing."""
    return SLIDING_OPS.get()


def use_triton(x: torch.Tensor) -> bool:
    return SLIDING_OPS.use(x, SLIDING_OPS_OVERRIDE)


def kernel_attention(q, k_all, v_all, sinks, *, window, num_sinks, scale, padding, query_start, sink_logits):
    """`windowed_attention` on the Triton kernels, or None where their semantics do not fit (the caller then runs
    the reference): the prefill/training op when there is no past, the decode op against the cached window."""
    prefill_op, decode_op = triton_sliding_ops()
    seq_len = q.shape[1]
    if padding.length not in (None, query_start + seq_len):
        return None
    bounds = padding.bounds
    if bounds is False:
        return None
    if query_start == 0 and k_all.shape[1] == seq_len:
        return prefill_op(q, k_all, v_all, window, num_sinks, sink_logits, scale, key_bounds=bounds)
    tensors = (q, k_all, v_all, sink_logits)
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors):
        return None
    if bounds is not None and not padding.left_only:
        # right padding before cached steps
        return None
    sink_k, sink_v, sink_index = sinks if sinks else (None, None, None)
    first_index = None if bounds is None else bounds[:, 0]
    return decode_op(
        q, k_all, v_all, window, query_start, sink_k, sink_v, sink_index, sink_logits, scale, first_index=first_index
    )


class SinkState(RowStateLayerMixin):
    """The sink tokens of a sliding-window cache layer: `sinks` is None or `(sink_k, sink_v, sink_index)` as
    `capture_sinks` returns them (`[B, S, Hkv, D]` twice and `[B, S]` absolute indices, -1 for none yet).

    `crop` needs nothing more: a sink token is attended only once it has left the window, so one that a crop removed
    is captured again when its position comes back, before any query reads it.
    """

    row_state = ("sinks",)


class SinkWindowLayer(SinkState, DynamicSlidingWindowLayer):
    """transformers' sliding-window cache layer (the `sliding` mixer) with the sink tokens."""


class SinkLinearWindowLayer(SinkState, LinearStateRowsMixin, LinearAttentionAndSlidingWindowAttentionLayer):
    """transformers' recurrent-state plus sliding-window cache layer (a linear mixer's window, hedgehog) with the sink
    tokens, and batch selection and repetition of its recurrent and convolution states."""


SINK_LAYER_CLASSES = {
    DynamicSlidingWindowLayer: SinkWindowLayer,
    LinearAttentionAndSlidingWindowAttentionLayer: SinkLinearWindowLayer,
}


def sink_cache_layer(past_key_values, layer_idx: int) -> SinkState:
    """The cache layer of `layer_idx`; an empty plain transformers sliding-window layer (from a `DynamicCache` built
    by the caller or by `generate`) is replaced by its `SinkState` subclass first."""
    return row_state_layer(past_key_values, layer_idx, SINK_LAYER_CLASSES, "sliding window with sinks", "sink tokens")


def capture_sinks(sinks, keys, values, first_real, query_start: int, num_sinks: int):
    """Copies sink tokens that fall inside the current tokens into the `(k, v, index)` sink buffers.

    keys/values: `[B, T, Hkv, D]` of the current tokens at absolute indices `query_start ...`.
    """
    batch, seq_len = keys.shape[:2]
    if sinks is None:
        sinks = (
            keys.new_zeros(batch, num_sinks, *keys.shape[2:]),
            values.new_zeros(batch, num_sinks, *values.shape[2:]),
            torch.full((batch, num_sinks), -1, dtype=torch.long, device=keys.device),
        )
    sink_k, sink_v, sink_index = sinks
    target = first_real[:, None] + torch.arange(num_sinks, device=keys.device)
    offset = target - query_start
    inside = (offset >= 0) & (offset < seq_len)
    gather = offset.clamp(0, max(seq_len - 1, 0))[..., None, None]
    new_k = keys.gather(1, gather.expand(-1, -1, *keys.shape[2:]))
    new_v = values.gather(1, gather.expand(-1, -1, *values.shape[2:]))
    keep = inside[..., None, None]
    return (
        torch.where(keep, new_k, sink_k),
        torch.where(keep, new_v, sink_v),
        torch.where(inside, target, sink_index),
    )


def windowed_attention(
    q,
    k,
    v,
    *,
    layer_idx: int,
    window: int,
    num_sinks: int,
    scale: float,
    chunk_size: int,
    attention_mask=None,
    past_key_values=None,
    query_start: int = 0,
    sink_logits=None,
    padding: Padding | None = None,
):
    """Softmax attention of the current tokens over the last `window` tokens and the `num_sinks` sink tokens.

    q/k/v: `[B, T, H(kv), D]`, rope already applied. With a cache, the window's keys/values go through the cache's
    sliding-window part of layer `layer_idx` and the sinks are kept on that layer (`sink_cache_layer`). `padding`:
    the model forward's `Padding` of `attention_mask` (built here when None).
    """
    batch, seq_len = q.shape[:2]
    if padding is None:
        padding = Padding(attention_mask, batch, seq_len, q.device)
    first_real = padding.first_real
    sinks, layer = None, None
    if past_key_values is not None:
        if num_sinks:
            layer = sink_cache_layer(past_key_values, layer_idx)
            sinks = layer.sinks
        # [B, Hkv, P + T, D]: the cached window followed by the current tokens
        k_all, v_all = past_key_values.update(k.transpose(1, 2), v.transpose(1, 2), layer_idx)
        k_all, v_all = k_all.transpose(1, 2), v_all.transpose(1, 2)
    else:
        k_all, v_all = k, v
    if num_sinks:
        sinks = capture_sinks(sinks, k, v, first_real, query_start, num_sinks)
        if layer is not None:
            layer.sinks = sinks
    if use_triton(q):
        o = kernel_attention(
            q,
            k_all,
            v_all,
            sinks,
            window=window,
            num_sinks=num_sinks,
            scale=scale,
            padding=padding,
            query_start=query_start,
            sink_logits=sink_logits,
        )
        if o is not None:
            return o
    key_valid = key_padding_mask(attention_mask, k_all.shape[1], batch, q.device)
    return sliding_window_attention(
        q,
        k_all,
        v_all,
        window=window,
        scale=scale,
        key_valid=key_valid,
        query_start=query_start,
        sink_k=sinks[0] if sinks else None,
        sink_v=sinks[1] if sinks else None,
        sink_index=sinks[2] if sinks else None,
        sink_logits=sink_logits,
        chunk_size=chunk_size,
    )


class SlidingWindowAttention(nn.Module):
    """Softmax attention over the last `window` tokens, plus `sink_tokens` first tokens and optional sink logits."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        options = config.mixer_config(layer_idx)
        self.config = config
        self.layer_idx = layer_idx
        self.window = options["window"]
        self.num_sinks = options["sink_tokens"]
        self.chunk_size = options["chunk_size"]
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.attention_out_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        # gpt-oss style: one learned logit per head joins every softmax denominator
        self.sinks = nn.Parameter(torch.zeros(self.num_heads)) if options["sink_logits"] else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        query_start: int = 0,
        padding: Padding | None = None,
        **kwargs,
    ) -> torch.Tensor:
        batch, seq_len = hidden_states.shape[:2]
        hidden_shape = (batch, seq_len, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape)
        k = self.k_proj(hidden_states).view(hidden_shape)
        v = self.v_proj(hidden_states).view(hidden_shape)
        if self.config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = position_embeddings
        # rope in [B, T, H, D] layout
        q, k = apply_rotary(q, k, cos, sin)

        o = windowed_attention(
            q,
            k,
            v,
            layer_idx=self.layer_idx,
            window=self.window,
            num_sinks=self.num_sinks,
            scale=self.scaling,
            chunk_size=self.chunk_size,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            query_start=query_start,
            sink_logits=self.sinks,
            padding=padding,
        )
        return self.o_proj(o.flatten(2))
