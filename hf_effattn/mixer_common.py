"""Pieces shared by the mixers: padding masks, the short causal convolution, the gated output norm."""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
from transformers.utils import logging

logger = logging.get_logger(__name__)


class TritonOps:
    """The Triton ops of one family of mixers, imported on first use, and the choice between them and the torch
    reference.

    `load()` imports and returns the ops (any value), raising ImportError where triton is missing; it is called once,
    so that machines without a GPU never import triton through the model. Each mixer module keeps an
    `*_OPS_OVERRIDE` variable that it passes to `use`: None (the kernels on CUDA tensors when triton imports, else the
    torch reference), or "triton" / "reference" to force one (tests).
    """

    def __init__(self, layers: str, load, fallback: str = "the pure-PyTorch reference ops, which are slower"):
        self.layers = layers
        self.load = load
        # what runs instead, for the warning
        self.fallback = fallback
        # what `load` returned (None before the first import or without triton); a plain attribute, so that
        # torch.compile can read it (it does not trace imports)
        self.ops = None
        self._imported = False

    def get(self):
        """The ops, or None where triton is missing (said once, with how to install it)."""
        if not self._imported:
            self._imported = True
            try:
                self.ops = self.load()
            except ImportError as error:
                logger.warning_once(
                    f"The Triton kernels of the {self.layers} layers could not be imported ({error}); they run "
                    f"{self.fallback} instead. Install triton "
                    "(`pip install hf_effattn[triton]`, or `pip install triton`) to use the kernels."
                )
        return self.ops

    def use(self, x: torch.Tensor, override: str | None) -> bool:
        """Whether `x` runs on the kernels."""
        if override is not None:
            return override == "triton"
        # inside torch.compile the torch reference is traced; the kernels would break the graph
        if torch.compiler.is_compiling():
            return False
        return x.is_cuda and self.get() is not None


class Padding:
    """What a 2-D attention mask says about padding, worked out once per model forward and shared by its layers, so
    that a decode step does not read the mask back to the host in every layer.

    The host reads (`flags`) happen once, on first use: none at all without a 2-D mask or when no layer asks.
    """

    def __init__(self, attention_mask: torch.Tensor | None, batch: int, seq_len: int, device):
        # [B, L] bool over the whole sequence (cached + current tokens), True = real token
        self.mask = attention_mask.bool() if attention_mask is not None and attention_mask.dim() == 2 else None
        self.seq_len = seq_len
        # [B] index of each row's first real token (left padding)
        if self.mask is None:
            self.first_real = torch.zeros(batch, dtype=torch.long, device=device)
        else:
            self.first_real = (self.mask.long().cumsum(-1) == 0).sum(-1)
        self._flags = None
        self._end = None

    def flags(self) -> tuple[bool, bool, bool, bool]:
        """(every token real, the current tokens real, each row's real tokens one run, no padding after a real token),
        read back to the host in one synchronisation."""
        if self._flags is None:
            if self.mask is None:
                self._flags = (True, True, True, True)
            else:
                mask = self.mask
                self._end = self.first_real + mask.sum(-1)
                index = torch.arange(mask.shape[1], device=mask.device)
                run = (index >= self.first_real[:, None]) & (index < self._end[:, None])
                current = mask[:, -self.seq_len :]
                checks = [mask.all(), current.all(), (run == mask).all(), (mask[:, 1:] >= mask[:, :-1]).all()]
                self._flags = tuple(torch.stack(checks).tolist())
        return self._flags

    @property
    def length(self) -> int | None:
        """Positions the mask covers, None without a 2-D mask."""
        return None if self.mask is None else self.mask.shape[1]

    @property
    def current(self) -> torch.Tensor | None:
        """`[B, T]` bool mask of the current tokens, None when they are all real."""
        if self.mask is None or self.flags()[1]:
            return None
        return self.mask[:, -self.seq_len :]

    @property
    def bounds(self):
        """`[B, 2]` (first, end) of each row's real tokens when they form one run (left and/or right padding), None
        without padding, False when some row's real tokens are not one run."""
        every_real, _, one_run, _ = self.flags()
        if every_real:
            return None
        return torch.stack([self.first_real, self._end], dim=-1) if one_run else False

    @property
    def left_only(self) -> bool:
        """Whether each row is padding, then real tokens (left padding or none)."""
        return self.flags()[3]


def key_padding_mask(attention_mask: torch.Tensor | None, num_keys: int, batch: int, device) -> torch.Tensor:
    """`[B, num_keys]` bool validity of the last `num_keys` positions (cached window + current tokens)."""
    if attention_mask is None or attention_mask.dim() != 2:
        return torch.ones(batch, num_keys, dtype=torch.bool, device=device)
    mask = attention_mask[:, -num_keys:].bool()
    if mask.shape[1] < num_keys:
        # positions before the mask's start (the mask was cropped by the caller) are real tokens
        mask = F.pad(mask, (num_keys - mask.shape[1], 0), value=True)
    return mask


def zero_padding(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Zeroes padded positions of a `[B, T, ...]` tensor; `where` (not a product) so NaNs cannot leak through."""
    if mask is None:
        return x
    return torch.where(mask.view(*mask.shape, *([1] * (x.dim() - 2))), x, torch.zeros((), dtype=x.dtype, device=x.device))


# which ops RMSNorm, the decoder layers' SwiGLU and the mixers' rotary embedding run: None = the fused Triton kernels
# (decoder_fusion.py) on CUDA tensors at inference when triton imports, else the torch code; tests set "triton" or
# "reference" to force one
DECODER_OPS_OVERRIDE = None


def _import_decoder_ops():
    from .decoder_fusion import rms_norm, rotary, silu_mul

    return rms_norm, silu_mul, rotary


DECODER_OPS = TritonOps("RMSNorm, SwiGLU and rotary", _import_decoder_ops, fallback="their torch code")


def decoder_fusion_ops(x: torch.Tensor):
    """(rms_norm, silu_mul, rotary), the fused inference kernels of the norms, the MLP and the rotary embedding, when
    this forward can use them: no gradient to compute (they have no backward) and outside torch.compile (which fuses
    the torch code itself). Else None."""
    if torch.is_grad_enabled() or not DECODER_OPS.use(x, DECODER_OPS_OVERRIDE):
        return None
    return DECODER_OPS.get()


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """transformers' `apply_rotary_pos_emb` on `[B, T, H, D]` q and k (cos and sin `[B, T, D]`): one kernel each at
    inference on a GPU."""
    ops = decoder_fusion_ops(q)
    if ops is None or cos.shape[-1] != q.shape[-1]:
        return apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
    return ops[2](q, cos, sin), ops[2](k, cos, sin)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, as Llama's. With `residual`, normalises `x + residual` and returns `(normed, sum)`:
    the decoder layer's residual add and norm, one kernel at inference on a GPU."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        ops = decoder_fusion_ops(x)
        if ops is not None:
            return ops[0](x, self.weight, self.eps, residual=residual)
        total = x if residual is None else x + residual
        dtype = total.dtype
        h = total.float()
        normed = self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)
        return normed if residual is None else (normed, total)


class ShortConvolution(nn.Module):
    """Depthwise causal convolution followed by SiLU, with its last `kernel_size - 1` inputs kept in the cache."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))

    def forward(self, x: torch.Tensor, past_key_values=None, layer_idx: int | None = None) -> torch.Tensor:
        # x: [B, T, C]
        seq_len = x.shape[1]
        x = x.transpose(1, 2)
        context = self.kernel_size - 1
        if past_key_values is not None:
            layer = past_key_values.layers[layer_idx]
            had_state = layer.has_previous_state[0]
            full = past_key_values.update_conv_state(x, layer_idx, conv_kernel_size=context)
            if not had_state:
                full = F.pad(x, (context, 0))
        else:
            full = F.pad(x, (context, 0))
        y = F.conv1d(full, self.weight.to(x.dtype), groups=x.shape[1])[..., -seq_len:]
        return F.silu(y).transpose(1, 2)

    def fused(self, q, k, v, kernel, head_dim: int, l2norm: bool, past_key_values=None, layer_idx=None):
        """`forward` of the concatenated q/k/v projections `[B, T, C]`, split into `[B, T, H, D]` heads, keys and
        values repeated over each query group, q and k L2-normalised when `l2norm`, by `kernel`
        (`short_conv_qkv`). Only the last `kernel_size - 1` tokens are copied into the cache."""
        context = self.kernel_size - 1
        state = None
        if past_key_values is not None:
            layer = past_key_values.layers[layer_idx]
            if layer.has_previous_state[0]:
                # the update below overwrites it in place
                state = layer.conv_states[0].to(q.dtype, memory_format=torch.contiguous_format, copy=True)
            tail = torch.cat([q[:, -context:], k[:, -context:], v[:, -context:]], dim=-1).transpose(1, 2)
            past_key_values.update_conv_state(tail, layer_idx, conv_kernel_size=context)
        return kernel(q, k, v, self.weight.to(q.dtype), head_dim, state=state, l2norm=l2norm)


class GatedOutput(nn.Module):
    """Per-head RMSNorm of the mixer output, times a SiLU gate computed from the layer input (fla's o_norm/g_proj)."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, use_norm: bool, use_gate: bool, eps: float):
        super().__init__()
        self.head_dim = head_dim
        self.o_norm = RMSNorm(head_dim, eps=eps) if use_norm else None
        self.g_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False) if use_gate else None

    def forward(self, o: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        # o: [B, T, H, V] -> [B, T, H * V]
        if self.o_norm is not None:
            o = self.o_norm(o)
        o = o.flatten(2)
        if self.g_proj is not None:
            o = o * F.silu(self.g_proj(hidden_states))
        return o

    def fused(self, o: torch.Tensor, hidden_states: torch.Tensor, kernel) -> torch.Tensor:
        """`forward` by `kernel` (`gated_rms_norm`): the norm and the gate in one pass."""
        gate = self.g_proj(hidden_states) if self.g_proj is not None else None
        norm = self.o_norm
        return kernel(o, gate, None if norm is None else norm.weight, norm.eps if norm is not None else 1e-6)
