"""Fused inference kernels of the decoder layer around its mixer: the RMSNorms, the MLP's SiLU gate and the rotary
embedding.

    rms_norm    Llama's RMSNorm of `x`, or of `x + residual` (the attention output added to the residual stream),
                also returning that sum: one read of each input and one write of each output, instead of about
                seven fp32 passes in eager torch
    silu_mul    `silu(gate) * up`, the SwiGLU product between the MLP's projections, in one pass instead of three
    rotary      the rotary position embedding of q or k `[B, T, H, D]` (transformers' rotate-half convention), in one
                pass instead of six

All three round where eager torch rounds (the sum, the SiLU and each rotary product to the tensor dtype, the
normalised rows to the input dtype before the weight), so `rotary` gives torch's bits and the others differ only by
the order of the norm's fp32 summation. At 128k tokens of a 1.5B model the eager versions cost about 0.3 s of a 2 s
prefill. They serve inference only (no backward): the model runs them when no gradient is needed, and keeps the torch
code (`*_reference` below) for training.
"""

import torch

from .linear_attn_kernels import tl, triton

# elements per program of the SwiGLU kernel; tokens per program of the rotary kernel
SILU_MUL_BLOCK = 2048
ROTARY_BLOCK_T = 16


@triton.jit
def rms_norm_kernel(
    x,  # [R, N]
    residual,  # [R, N] (when HAS_RESIDUAL)
    weight,  # [N]
    out,  # [R, N] the normalised rows times the weight
    total,  # [R, N] x + residual (when HAS_RESIDUAL)
    R,
    N,
    stride_x,
    stride_r,
    BR: tl.constexpr,
    BN: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    EPS: tl.constexpr,
):
    rows = tl.program_id(0) * BR + tl.arange(0, BR).to(tl.int64)
    cols = tl.arange(0, BN)
    mask = (rows < R)[:, None] & (cols < N)[None, :]
    h = tl.load(x + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        # the sum rounded to its dtype, as torch's add
        h = (h + r).to(total.dtype.element_ty)
        tl.store(total + rows[:, None] * N + cols[None, :], h, mask=mask)
        h = h.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(h * h, axis=1) / N + EPS)
    # rounded to the normalised tensor's dtype before the weight, as Llama's RMSNorm
    if HAS_RESIDUAL:
        y = (h * rstd[:, None]).to(total.dtype.element_ty).to(tl.float32)
    else:
        y = (h * rstd[:, None]).to(x.dtype.element_ty).to(tl.float32)
    w = tl.load(weight + cols, mask=cols < N, other=0.0).to(tl.float32)
    tl.store(out + rows[:, None] * N + cols[None, :], (y * w[None, :]).to(out.dtype.element_ty), mask=mask)


@triton.jit
def silu_mul_kernel(gate, up, out, numel, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    g = tl.load(gate + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up + offsets, mask=mask, other=0.0).to(tl.float32)
    # SiLU rounded to the gate's dtype, then the product rounded to the output's, as torch's two ops
    s = (g * tl.sigmoid(g)).to(gate.dtype.element_ty).to(tl.float32)
    tl.store(out + offsets, (s * u).to(out.dtype.element_ty), mask=mask)


@triton.jit
def rotate_half_rounded(x1, x2, c1, c2, s1, s2, dtype: tl.constexpr):
    """x * cos + rotate_half(x) * sin by halves (fp32 inputs), rotate_half(x) = (-x2, x1): each product and the sum
    rounded to `dtype`, as torch's three ops, when the kernel is compiled without fused multiply-adds. Also used by
    `block_topk_kernels.block_rotary_pool_kernel`, which must give the same bits."""
    y1 = (x1 * c1).to(dtype).to(tl.float32) + (-x2 * s1).to(dtype).to(tl.float32)
    y2 = (x2 * c2).to(dtype).to(tl.float32) + (x1 * s2).to(dtype).to(tl.float32)
    return y1.to(dtype), y2.to(dtype)


@triton.jit
def rotary_kernel(
    x,  # [B, T, NH, D]
    cos,  # [B or 1, T, D]
    sin,  # [B or 1, T, D]
    out,  # [B, T, NH, D] contiguous
    T,
    stride_xb,
    stride_xt,
    stride_xh,
    stride_cb,
    stride_ct,
    NH: tl.constexpr,
    HALF: tl.constexpr,
    BT: tl.constexpr,
    BH: tl.constexpr,
):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // NH).to(tl.int64), i_bh % NH
    t = i_t * BT + tl.arange(0, BT).to(tl.int64)
    d = tl.arange(0, BH)
    mask = (t < T)[:, None] & (d < HALF)[None, :]
    x_ptr = x + i_b * stride_xb + t[:, None] * stride_xt + i_h * stride_xh + d[None, :]
    c_ptr = i_b * stride_cb + t[:, None] * stride_ct + d[None, :]
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(cos + c_ptr, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos + c_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin + c_ptr, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin + c_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    o1, o2 = rotate_half_rounded(x1, x2, c1, c2, s1, s2, out.dtype.element_ty)
    o_ptr = out + ((i_b * T + t[:, None]) * NH + i_h) * (2 * HALF) + d[None, :]
    tl.store(o_ptr, o1, mask=mask)
    tl.store(o_ptr + HALF, o2, mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """`x` as `[R, N]` rows with a contiguous last dim (a view where possible)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Llama's RMSNorm over the last dim: `weight * (h * rsqrt(mean(h^2) + eps)).to(h.dtype)` with h = x, or with
    h = x + residual, in which case `(normed, h)` is returned. The output has the dtype of `weight * h` (the weight's
    dtype promoted with the input's, as in torch)."""
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"weight: expected shape ({hidden},), got {tuple(weight.shape)}.")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual: expected shape {tuple(x.shape)}, got {tuple(residual.shape)}.")
    rows = _rows(x)
    residual_rows = _rows(residual) if residual is not None else rows
    # the dtype of x + residual, then of weight * normed, as torch promotes them
    dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, dtype), device=x.device)
    total = torch.empty(x.shape, dtype=dtype, device=x.device) if residual is not None else out
    block_n = triton.next_power_of_2(hidden)
    # rows per program: about 4k elements per program, at least one row
    block_r = max(1, min(16, 4096 // block_n))
    count = rows.shape[0]
    if count:
        rms_norm_kernel[(triton.cdiv(count, block_r),)](
            rows,
            residual_rows,
            weight,
            out,
            total,
            count,
            hidden,
            rows.stride(0),
            residual_rows.stride(0),
            BR=block_r,
            BN=block_n,
            HAS_RESIDUAL=residual is not None,
            EPS=eps,
            num_warps=4 if block_n <= 2048 else 8,
        )
    return (out, total) if residual is not None else out


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up`, elementwise, with torch's roundings; the output has the dtype of that product in torch."""
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have the same shape, got {tuple(gate.shape)} and {tuple(up.shape)}.")
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    numel = gate.numel()
    if numel:
        silu_mul_kernel[(triton.cdiv(numel, SILU_MUL_BLOCK),)](gate, up, out, numel, BLOCK=SILU_MUL_BLOCK, num_warps=8)
    return out


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' `apply_rotary_pos_emb` of one tensor `x` `[B, T, H, D]` (any strides with a contiguous last dim)
    by `cos`, `sin` `[B or 1, T, D]` (the same for every head), with its roundings. Returns a contiguous
    `[B, T, H, D]` tensor of the dtype torch gives `x * cos`."""
    batch, seq_len, heads, head_dim = x.shape
    if head_dim % 2 or cos.shape != sin.shape or cos.dim() != 3 or cos.shape[1:] != (seq_len, head_dim):
        raise ValueError(
            f"rotary: expected an even head dim and cos/sin of shape (B or 1, {seq_len}, {head_dim}), got x "
            f"{tuple(x.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}."
        )
    if cos.shape[0] not in (1, batch):
        raise ValueError(f"rotary: cos/sin batch {cos.shape[0]} is neither 1 nor {batch}.")
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, cos.dtype), device=x.device)
    if out.numel():
        half = head_dim // 2
        rotary_kernel[(triton.cdiv(seq_len, ROTARY_BLOCK_T), batch * heads)](
            x,
            cos,
            sin,
            out,
            seq_len,
            x.stride(0),
            x.stride(1),
            x.stride(2),
            cos.stride(0) if cos.shape[0] > 1 else 0,
            cos.stride(1),
            NH=heads,
            HALF=half,
            BT=ROTARY_BLOCK_T,
            BH=triton.next_power_of_2(half),
            # torch rounds each product before the sum: no fused multiply-add
            enable_fp_fusion=False,
        )
    return out


def rms_norm_reference(x, weight, eps=1e-6, residual=None):
    """`rms_norm` in torch, written as the decoder layer's eager code."""
    total = x if residual is None else x + residual
    h = total.float()
    normed = weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(total.dtype)
    return normed if residual is None else (normed, total)


def silu_mul_reference(gate, up):
    """`silu_mul` in torch."""
    return torch.nn.functional.silu(gate) * up


def rotary_reference(x, cos, sin):
    """`rotary` in torch: transformers' rotate-half convention on `[B, T, H, D]`."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin
