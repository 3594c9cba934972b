"""`hedgehog`: LoLCATs linear attention (Zhang et al., 2024) with learned Hedgehog feature maps, plus exact
softmax attention inside a small sliding window; both share one normaliser.

The cache keeps the window's raw keys/values (transformers' sliding-window part of a `hybrid_sliding` layer) and a
`[H, 2F, D + 1]` fp32 state holding sum phi(k) v^T and sum phi(k) for every key that left the window.
"""

import torch
from torch import nn

from .mixer_common import RMSNorm, apply_rotary, key_padding_mask
from .ops_reference import hedgehog_attention


class HedgehogFeatureMap(nn.Module):
    """phi(x) = [softmax(x W_h), softmax(-x W_h)] per head; W starts as the identity."""

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_heads, head_dim, feature_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, T, H, D] -> [B, T, H, 2F]
        projected = torch.einsum("bthd,hdf->bthf", x.float(), self.weight.float())
        return torch.cat([projected.softmax(dim=-1), (-projected).softmax(dim=-1)], dim=-1)


class HedgehogAttention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        options = config.mixer_config(layer_idx)
        self.config = config
        self.layer_idx = layer_idx
        self.window = options["window"]
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
        self.feature_map_q = HedgehogFeatureMap(self.num_heads, self.head_dim, options["feature_dim"])
        self.feature_map_k = HedgehogFeatureMap(self.num_kv_heads, self.head_dim, options["feature_dim"])

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        query_start: int = 0,
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
        q, k = apply_rotary(q, k, cos, sin)

        initial_state, keep_last = None, self.window - 1
        if past_key_values is not None:
            layer = past_key_values.layers[self.layer_idx]
            if layer.is_recurrent_states_initialized[0]:
                initial_state = layer.recurrent_states[0]
            # the sliding part of the cache keeps its last `sliding_window - 1` keys; the state absorbs the rest
            keep_last = layer.sliding_window - 1
            k_all, v_all = past_key_values.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx)
            k_all, v_all = k_all.transpose(1, 2), v_all.transpose(1, 2)
        else:
            k_all, v_all = k, v
        key_valid = key_padding_mask(attention_mask, k_all.shape[1], batch, k.device)
        o, state = hedgehog_attention(
            q,
            k_all,
            v_all,
            self.feature_map_q(q),
            self.feature_map_k(k_all),
            window=self.window,
            scale=self.scaling,
            key_valid=key_valid,
            query_start=query_start,
            initial_state=initial_state,
            keep_last=keep_last,
            output_final_state=past_key_values is not None,
            chunk_size=self.chunk_size,
        )
        if past_key_values is not None:
            past_key_values.update_recurrent_state(state, self.layer_idx)
        return self.o_proj(o.flatten(2))
