"""`block_topk`: block-sparse softmax attention, MoBA/NSA-style.

Keys and queries are cut into blocks of `block_size` tokens counted from each row's first real token. Query block i
reads its own block (causal), block 0 (`keep_first_block`) and the `top_k` earlier blocks j that score highest by
`qbar_{i-1} . kbar_j`: the mean key of block j against the mean query of the previous block (over its tokens and the
GQA group's heads). The previous block is complete when block i starts, so a decode step selects exactly what the full
forward selects for its position (up to floating-point ties); the selection is parameter-free and not differentiable.

The projections, rope, GQA and optional q/k norm are those of `full`, so a converted layer starts from the teacher's
attention weights. The cache is a full KV cache whose layer (`BlockTopkCacheLayer`) also keeps the block means, so that
a decode step scores O(T / block_size) pooled keys and reads O((top_k + 2) * block_size) keys.

On the Triton ops at inference, an unpadded prefill applies the rotary embedding with `block_topk_rotary`, which
writes the block means in the same pass: the selection then reads neither q nor k again, and an empty cache takes its
decode state from those means. A decode step (one token per row, no gradient) runs `block_topk_decode`: scores, then
selection, attention and the update of the means in a second kernel; longer cached chunks and steps with gradients
run the reference.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicLayer

from .cache_layers import RowStateLayerMixin, row_state_layer
from .mixer_common import Padding, RMSNorm, TritonOps, apply_rotary
from .ops_reference import block_topk_attention, block_topk_cached_attention

# which op the prefill runs: None = the Triton kernels on CUDA tensors when triton imports, else the torch reference;
# tests set "triton" or "reference" to force one
BLOCK_TOPK_OPS_OVERRIDE = None


def _import_block_topk():
    from .block_topk import block_topk_attention, block_topk_decode, block_topk_rotary

    return block_topk_attention, block_topk_rotary, block_topk_decode


BLOCK_TOPK_OPS = TritonOps("block_topk", _import_block_topk)


def triton_block_topk():
    """The Triton ops (prefill attention, rotary with block means, decode step), or None where triton is missing."""
    return BLOCK_TOPK_OPS.get()


def use_triton(x: torch.Tensor) -> bool:
    return BLOCK_TOPK_OPS.use(x, BLOCK_TOPK_OPS_OVERRIDE)


class BlockTopkCacheLayer(RowStateLayerMixin, DynamicLayer):
    """A full key/value cache layer that also keeps the block means of its keys and queries.

    `block_means` is the state of `block_topk_cached_attention` (`[B, ...]` fp32 tensors), or None before the first
    token. Batch reorders (beam search), batch selection and repetition, reset and deepcopy act on it and on the
    keys/values together.
    """

    row_state = ("block_means",)

    @property
    def is_croppable(self) -> bool:
        # the query sum of the block in progress cannot be taken back: the queries are not cached
        return self.block_means is None

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove and self.block_means is not None:
            raise RuntimeError(
                "A block_topk cache layer cannot be cropped: its block means hold the sum of queries that are not "
                "cached. Rebuild the cache by running the forward over the tokens to keep."
            )
        super().crop(tokens_to_remove)


def block_topk_cache_layer(past_key_values, layer_idx: int) -> BlockTopkCacheLayer:
    """The cache layer of `layer_idx`; an empty plain `DynamicLayer` (from a `DynamicCache` built by the caller or by
    `generate`) is replaced by a `BlockTopkCacheLayer` first."""
    return row_state_layer(past_key_values, layer_idx, {DynamicLayer: BlockTopkCacheLayer}, "block_topk", "block means")


class BlockTopkAttention(nn.Module):
    """Block top-k sparse attention with the projections of Llama/Mistral/Qwen2/Qwen3 attention."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        options = config.mixer_config(layer_idx)
        self.config = config
        self.layer_idx = layer_idx
        self.block_size = options["block_size"]
        self.top_k = options["top_k"]
        self.keep_first_block = options["keep_first_block"]
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

    @property
    def options(self) -> dict:
        return {"block_size": self.block_size, "top_k": self.top_k, "keep_first_block": self.keep_first_block}

    def fuse_rotary(self, q, k, cos, padding: Padding, layer) -> bool:
        """Whether this forward runs `block_topk_rotary`: a prefill (no cache or an empty one) of an unpadded batch on
        the Triton ops, at inference (the fused kernel has no backward; eval mode, no gradient), with rotary over the whole
        head dim."""
        return (
            (layer is None or layer.get_seq_length() == 0)
            and padding.current is None
            and use_triton(q)
            # no gradient now, nor later: reentrant gradient checkpointing reruns a training forward with gradients,
            # where the selection must come from the same pooled means
            and not torch.is_grad_enabled()
            and not self.training
            and cos.shape[-1] == self.head_dim
        )

    def decode_state(self, qbar, kbar, seq_len: int) -> dict:
        """`block_topk_cached_attention`'s state after a prefill of `seq_len` tokens from their block means (as
        `block_topk_rotary` returns them): the complete blocks' key means, the query mean of the last complete block
        and the query sum of the block in progress."""
        size, complete = self.block_size, seq_len // self.block_size
        scale = size * (self.num_heads // self.num_kv_heads)
        zeros = qbar.new_zeros(qbar.shape[0], *qbar.shape[2:])
        return {
            "kbar": kbar,
            "qbar": qbar[:, complete - 1] if complete else zeros,
            "qsum": qbar[:, complete] * scale if seq_len % size else zeros,
        }

    def prefill(self, q, k, v, padding: Padding, block_means=None):
        """Block-sparse attention of a whole sequence; padded rows run as packed sequences of their real tokens.
        `block_means` (no padding, the Triton op) come from `block_topk_rotary`."""
        batch, seq_len = q.shape[:2]
        op = triton_block_topk()[0] if use_triton(q) else block_topk_attention
        mask = padding.current
        if mask is None:
            given = {} if block_means is None else {"block_means": block_means}
            return op(q, k, v, scale=self.scaling, **self.options, **given)
        # [N] flat indices of the real tokens, packed row after row
        real = mask.flatten().nonzero().squeeze(1)
        cu_seqlens = F.pad(mask.sum(-1).cumsum(0), (1, 0))
        packed = [x.flatten(0, 1).index_select(0, real)[None] for x in (q, k, v)]
        o = op(*packed, scale=self.scaling, cu_seqlens=cu_seqlens, **self.options)
        return q.new_zeros(batch * seq_len, *q.shape[2:]).index_copy(0, real, o[0]).view(q.shape)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        padding: Padding | None = None,
        **kwargs,
    ) -> torch.Tensor:
        batch, seq_len = hidden_states.shape[:2]
        if padding is None:
            padding = Padding(attention_mask, batch, seq_len, hidden_states.device)
        hidden_shape = (batch, seq_len, -1, self.head_dim)
        # [B, T, H, D]
        q = self.q_proj(hidden_states).view(hidden_shape)
        k = self.k_proj(hidden_states).view(hidden_shape)
        v = self.v_proj(hidden_states).view(hidden_shape)
        if self.config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = position_embeddings
        layer = None if past_key_values is None else block_topk_cache_layer(past_key_values, self.layer_idx)
        block_means = None
        if self.fuse_rotary(q, k, cos, padding, layer):
            # the rotary embedding and the selection's block means in one pass over q and k
            q, k, block_means = triton_block_topk()[1](q, k, cos, sin, self.block_size)
        else:
            q, k = apply_rotary(q, k, cos, sin)
        if layer is None:
            return self.o_proj(self.prefill(q, k, v, padding, block_means).flatten(2))

        # [B, L, Hkv, D]: the cached keys/values followed by the current ones
        k_all, v_all = past_key_values.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx)
        k_all, v_all = k_all.transpose(1, 2), v_all.transpose(1, 2)
        # cached steps count blocks from each row's first real token: only left padding keeps that exact
        if not padding.left_only:
            raise ValueError(
                f"Layer {self.layer_idx} (block_topk): with a cache, the attention mask may only pad on the left "
                "(zeros, then ones per row); pad prompts on the left (tokenizer.padding_side = 'left') or run "
                "without a cache."
            )
        first_real = padding.first_real
        if block_means is not None:
            # an empty cache, no padding: the prefill op, and the decode state from the block means it used
            o = self.prefill(q, k, v, padding, block_means)
            state = self.decode_state(*block_means, seq_len)
        elif k_all.shape[1] == seq_len:
            # an empty cache: the prefill op, then the block means for the steps that follow
            o = self.prefill(q, k, v, padding)
            _, state = block_topk_cached_attention(
                q, k_all, v_all, None, first_real, scale=self.scaling, attend=False, **self.options
            )
        elif seq_len == 1 and layer.block_means is not None and not torch.is_grad_enabled() and use_triton(q):
            # a decode step: selection, attention and the update of the block means on the kernels (no backward)
            o, state = triton_block_topk()[2](
                q, k_all, v_all, layer.block_means, first_real, scale=self.scaling, **self.options
            )
        else:
            o, state = block_topk_cached_attention(
                q, k_all, v_all, layer.block_means, first_real, scale=self.scaling, **self.options
            )
        layer.block_means = state
        return self.o_proj(o.flatten(2))
