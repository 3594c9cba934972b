"""Fused inference kernels around the linear-attention ops: what a linear mixer does before and after them.

    short_conv_qkv    causal depthwise convolution + SiLU of the q/k/v projections, optional L2 norm of each q and k
                      head, keys and values repeated over each query group; writes `[B, T, H, D]` q, k, v ready for
                      the linear-attention ops (one read and one write of each tensor, no transposes)
    gated_rms_norm    per-head RMSNorm of the op's output times a SiLU gate: `w * norm(o) * silu(gate)`

In eager torch these are 10-20 kernels each, most of them full passes over `[B, T, C]` tensors in fp32: at 128k
tokens they cost more than the linear attention itself. They serve inference only (no backward): the mixers run
them when no gradient is needed, and keep the torch code (their reference, `*_reference` below) for training.
"""

import torch

from .linear_attn_kernels import tl, triton

# tokens per program of the convolution kernel, rows per program of the norm kernel
CONV_BLOCK_T = 32
NORM_BLOCK_ROWS = 16


@triton.jit
def short_conv_qkv_kernel(
    x,  # [B, T, NH * D] one of the q, k or v projections
    weight,  # [NH * D, W] the convolution taps of these channels
    state,  # [B, NH * D, W - 1] the inputs before the first token (when HAS_STATE)
    out,  # [B, T, NH * G, D]
    T,
    G,
    stride_xb,
    stride_xt,
    stride_sb,
    stride_sc,
    stride_ob,
    stride_ot,
    NH: tl.constexpr,
    D: tl.constexpr,
    W: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
    CONV: tl.constexpr,
    HAS_STATE: tl.constexpr,
    L2NORM: tl.constexpr,
    EPS: tl.constexpr,
):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // NH).to(tl.int64), i_bh % NH
    # int64 offsets: B * T * C passes 2^31 at long contexts
    t = i_t * BT + tl.arange(0, BT).to(tl.int64)
    d = tl.arange(0, BD)
    mask_d = d < D
    channel = i_h * D + d
    if CONV:
        acc = tl.zeros([BT, BD], dtype=tl.float32)
        for j in tl.static_range(W):
            # tap j sees the input W - 1 - j tokens back
            src = t - (W - 1) + j
            inside = (src >= 0) & (src < T)
            x_ptr = x + i_b * stride_xb + src[:, None] * stride_xt + channel[None, :]
            value = tl.load(x_ptr, mask=inside[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
            if HAS_STATE:
                before = (src < 0) & (t < T)
                s_ptr = state + i_b * stride_sb + channel[None, :] * stride_sc + (src + W - 1)[:, None]
                value += tl.load(s_ptr, mask=before[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
            tap = tl.load(weight + channel * W + j, mask=mask_d, other=0.0).to(tl.float32)
            acc += value * tap[None, :]
        y = acc * tl.sigmoid(acc)
    else:
        x_ptr = x + i_b * stride_xb + t[:, None] * stride_xt + channel[None, :]
        y = tl.load(x_ptr, mask=(t < T)[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
    if L2NORM:
        # F.normalize: y / max(||y||, eps)
        norm = tl.sqrt(tl.sum(y * y, axis=1))
        y = y / tl.maximum(norm, EPS)[:, None]
    y = y.to(out.dtype.element_ty)
    store = (t < T)[:, None] & mask_d[None, :]
    for g in range(G):
        o_ptr = out + i_b * stride_ob + t[:, None] * stride_ot + ((i_h * G + g) * D + d)[None, :]
        tl.store(o_ptr, y, mask=store)


@triton.jit
def gated_rms_norm_kernel(
    o,  # [R, D] rows of the op output (one head of one token each)
    gate,  # [R, D] the gate's rows (when HAS_GATE)
    weight,  # [D] (when HAS_NORM)
    out,  # [R, D]
    R,
    D: tl.constexpr,
    BR: tl.constexpr,
    BD: tl.constexpr,
    HAS_NORM: tl.constexpr,
    HAS_GATE: tl.constexpr,
    EPS: tl.constexpr,
):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    d = tl.arange(0, BD)
    mask = (rows < R)[:, None] & (d < D)[None, :]
    offsets = rows[:, None].to(tl.int64) * D + d[None, :]
    y = tl.load(o + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        y = y * tl.rsqrt(tl.sum(y * y, axis=1) / D + EPS)[:, None]
        y = y * tl.load(weight + d, mask=d < D, other=0.0).to(tl.float32)[None, :]
    if HAS_GATE:
        g = tl.load(gate + offsets, mask=mask, other=0.0).to(tl.float32)
        y = y * g * tl.sigmoid(g)
    tl.store(out + offsets, y.to(out.dtype.element_ty), mask=mask)


def _check_rows(name: str, x: torch.Tensor, batch: int, seq_len: int, channels: int):
    if x.shape != (batch, seq_len, channels):
        raise ValueError(f"{name}: expected shape {(batch, seq_len, channels)}, got {tuple(x.shape)}.")


def short_conv_qkv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    weight: torch.Tensor | None,
    head_dim: int,
    state: torch.Tensor | None = None,
    l2norm: bool = True,
    eps: float = 1e-12,
):
    """Causal depthwise convolution + SiLU of the q/k/v projections, then (l2norm) each q and k head L2-normalised,
    and keys and values repeated over each query group.

    q `[B, T, H * D]`, k and v `[B, T, Hkv * D]`: the projections (channels contiguous); `weight` `[C, W]` or
    `[C, 1, W]` with C = (H + 2 Hkv) D in q, k, v order, or None for no convolution (and no SiLU); `state`
    `[B, C, W - 1]`, the W - 1 inputs before the first token (a cache's convolution state), or None for zeros.
    Returns q, k, v `[B, T, H, D]` in q's dtype.
    """
    batch, seq_len, q_channels = q.shape
    kv_channels = k.shape[-1]
    if q_channels % head_dim or kv_channels % head_dim:
        raise ValueError(f"q ({q_channels}) and k ({kv_channels}) channels must be multiples of head_dim {head_dim}.")
    heads, kv_heads = q_channels // head_dim, kv_channels // head_dim
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} key/value heads.")
    _check_rows("k", k, batch, seq_len, kv_channels)
    _check_rows("v", v, batch, seq_len, kv_channels)
    channels = q_channels + 2 * kv_channels
    conv = weight is not None
    if conv:
        weight = weight.reshape(weight.shape[0], -1).contiguous()
        if weight.shape[0] != channels:
            raise ValueError(f"weight: expected {channels} channels, got {weight.shape[0]}.")
    width = weight.shape[1] if conv else 1
    if state is not None and (not conv or state.shape != (batch, channels, width - 1)):
        raise ValueError(f"state: expected shape {(batch, channels, width - 1)} and a weight, got {tuple(state.shape)}.")
    groups = heads // kv_heads
    outputs = []
    start = 0
    for x, part_heads, repeat, norm in ((q, heads, 1, l2norm), (k, kv_heads, groups, l2norm), (v, kv_heads, groups, False)):
        if x.stride(-1) != 1:
            x = x.contiguous()
        out = q.new_empty(batch, seq_len, part_heads * repeat, head_dim)
        part = slice(start, start + part_heads * head_dim)
        part_state = state[:, part] if state is not None else out
        grid = (triton.cdiv(seq_len, CONV_BLOCK_T), batch * part_heads)
        short_conv_qkv_kernel[grid](
            x,
            weight[part] if conv else out,
            part_state,
            out,
            seq_len,
            repeat,
            x.stride(0),
            x.stride(1),
            part_state.stride(0) if state is not None else 0,
            part_state.stride(1) if state is not None else 0,
            out.stride(0),
            out.stride(1),
            NH=part_heads,
            D=head_dim,
            W=width,
            BT=CONV_BLOCK_T,
            BD=triton.next_power_of_2(head_dim),
            CONV=conv,
            HAS_STATE=state is not None,
            L2NORM=norm,
            EPS=eps,
        )
        outputs.append(out)
        start = part.stop
    return tuple(outputs)


def gated_rms_norm(
    o: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor | None, eps: float = 1e-6
) -> torch.Tensor:
    """`weight * rmsnorm(o) * silu(gate)` per head: o `[B, T, H, D]`, gate `[B, T, H * D]` (or None: no gate),
    weight `[D]` (or None: no norm). Returns `[B, T, H * D]` in o's dtype."""
    batch, seq_len, heads, head_dim = o.shape
    o = o.contiguous()
    if gate is not None:
        _check_rows("gate", gate, batch, seq_len, heads * head_dim)
        gate = gate.contiguous()
    out = torch.empty(batch, seq_len, heads * head_dim, dtype=o.dtype, device=o.device)
    rows = batch * seq_len * heads
    gated_rms_norm_kernel[(triton.cdiv(rows, NORM_BLOCK_ROWS),)](
        o,
        gate if gate is not None else o,
        weight if weight is not None else o,
        out,
        rows,
        D=head_dim,
        BR=NORM_BLOCK_ROWS,
        BD=triton.next_power_of_2(head_dim),
        HAS_NORM=weight is not None,
        HAS_GATE=gate is not None,
        EPS=eps,
    )
    return out


def short_conv_qkv_reference(q, k, v, weight, head_dim, state=None, l2norm=True, eps=1e-12):
    """`short_conv_qkv` in fp32 torch."""
    batch, seq_len, _ = q.shape
    x = torch.cat([q, k, v], dim=-1).float().transpose(1, 2)
    if weight is None:
        y = x.transpose(1, 2)
    else:
        weight = weight.reshape(weight.shape[0], -1).float()
        before = state.float() if state is not None else x.new_zeros(batch, x.shape[1], weight.shape[1] - 1)
        y = torch.nn.functional.conv1d(torch.cat([before, x], dim=-1), weight[:, None], groups=x.shape[1])
        y = torch.nn.functional.silu(y).transpose(1, 2)
    heads, kv_heads = q.shape[-1] // head_dim, k.shape[-1] // head_dim
    qo, ko, vo = (
        part.reshape(batch, seq_len, -1, head_dim) for part in y.split([q.shape[-1], k.shape[-1], v.shape[-1]], -1)
    )
    if l2norm:
        qo, ko = torch.nn.functional.normalize(qo, dim=-1, eps=eps), torch.nn.functional.normalize(ko, dim=-1, eps=eps)
    groups = heads // kv_heads
    ko, vo = ko.repeat_interleave(groups, dim=2), vo.repeat_interleave(groups, dim=2)
    return qo.to(q.dtype), ko.to(q.dtype), vo.to(q.dtype)


def gated_rms_norm_reference(o, gate, weight, eps=1e-6):
    """`gated_rms_norm` in fp32 torch."""
    y = o.float()
    if weight is not None:
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    y = y.flatten(2)
    if gate is not None:
        y = y * torch.nn.functional.silu(gate.float())
    return y.to(o.dtype)
