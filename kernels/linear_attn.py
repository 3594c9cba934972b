"""Triton linear-attention ops with flash-linear-attention (fla 0.6.0) signatures and semantics.

    chunk_gated_delta_rule / fused_recurrent_gated_delta_rule   GDN: delta rule, one log decay per head
    chunk_delta_rule / fused_recurrent_delta_rule               DeltaNet: delta rule, no decay
    chunk_gla / fused_recurrent_gla                             GLA: additive write, one log decay per key channel
    chunk_kda / fused_recurrent_kda                             KDA: delta rule, one log decay per key channel

All are thin wrappers of `chunk_linear_attention` and `fused_recurrent_linear_attention`, which take the same
arguments as `hf_effattn.ops_reference.recurrent_linear_attention` plus `cu_seqlens` and the in-kernel q/k L2 norm.
Layout `[B, T, H, K]`; values may have more heads than queries and keys (`HV % H == 0`); states `[N, HV, K, V]` in
fp32. Chunked ops have a backward; fused-recurrent ops are forward-only kernels for decode and short inputs (when a
gradient is needed they run the chunked op instead).
"""

import itertools

import torch

from .linear_attn_kernels import (
    chunk_cumsum_kernel,
    chunk_grad_kernel,
    chunk_out_kernel,
    chunk_pairwise_bwd_kernel,
    chunk_pairwise_fwd_kernel,
    chunk_state_bwd_kernel,
    chunk_state_fwd_kernel,
    chunk_wy_fwd_kernel,
    fused_recurrent_fwd_kernel,
    triton,
)

CHUNK_SIZE = 64
# sub-block of the per-channel pairwise kernels
SUB_CHUNK = 16
MAX_HEAD_DIM = 256
# launch options of the two sequential (state) passes; their loads of the next chunk do not depend on the state,
# so a second pipeline stage hides their latency
STATE_PASS_OPTIONS = {"num_warps": 4, "num_stages": 2}


def _stages(dtype: torch.dtype, stages: int) -> int:
    """Software-pipelining depth: fp32 tiles are twice as large, and at the 16-bit depth the delta-rule state and
    gradient kernels ask for more shared memory than an H100 has (~287 and ~319 KB of 227 KB, Triton 3.6)."""
    return 1 if dtype == torch.float32 else stages


def _block(dim: int, cap: int) -> int:
    return min(max(16, triton.next_power_of_2(dim)), cap)


def _num_sms(device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _state_block_v(value_dim: int, programs: int, device) -> int:
    """V block of the sequential passes: the largest of 64/32/16 that still gives every SM a program, so that a
    few long sequences (B = 1, T = 128k) run on more than B * HV programs."""
    block = _block(value_dim, 64)
    while block > 16 and programs * triton.cdiv(value_dim, block) < _num_sms(device):
        block //= 2
    return block


class _Chunks:
    """Where each chunk lives: per-program chunk list and per-sequence first chunk for packed sequences."""

    def __init__(self, batch: int, seq_len: int, cu_seqlens: torch.Tensor | None, device):
        self.is_varlen = cu_seqlens is not None
        if cu_seqlens is None:
            self.num_seqs = batch
            self.per_row = triton.cdiv(seq_len, CHUNK_SIZE)
            self.total = batch * self.per_row
            self.indices = self.offsets = None
            return
        bounds = cu_seqlens.tolist()
        counts = [triton.cdiv(hi - lo, CHUNK_SIZE) for lo, hi in itertools.pairwise(bounds)]
        pairs = [(n, c) for n, count in enumerate(counts) for c in range(count)]
        starts = [0]
        for count in counts[:-1]:
            starts.append(starts[-1] + count)
        self.num_seqs = len(counts)
        self.per_row = len(pairs)
        self.total = len(pairs)
        self.indices = torch.tensor(pairs or [(0, 0)], dtype=torch.int32, device=device)
        self.offsets = torch.tensor(starts, dtype=torch.int64, device=device)


def _chunk_cumsum(x, cu_seqlens, chunks, reverse, out_dtype):
    batch, seq_len, num_v_heads = x.shape[:3]
    width = x.shape[3] if x.dim() == 4 else 1
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    grid = (chunks.per_row, batch * num_v_heads)
    chunk_cumsum_kernel[grid](
        x, y, cu_seqlens, chunks.indices, seq_len, HV=num_v_heads, G=width, BG=triton.next_power_of_2(width),
        BT=CHUNK_SIZE, REVERSE=reverse, IS_VARLEN=chunks.is_varlen,
    )
    return y


def _chunk_fwd(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, chunks):
    batch, seq_len, num_heads, key_dim = q.shape
    num_v_heads, value_dim = v.shape[2], v.shape[3]
    gate = 0 if g is None else (1 if g.dim() == 3 else 2)
    delta = beta is not None
    bk = _block(key_dim, MAX_HEAD_DIM)
    shape = {"T": seq_len, "H": num_heads, "HV": num_v_heads, "K": key_dim, "BT": CHUNK_SIZE, "BK": bk,
             "IS_VARLEN": chunks.is_varlen}
    grid_chunks = (chunks.per_row, batch * num_v_heads)
    pair_shape = (batch, seq_len, num_v_heads, CHUNK_SIZE)

    b = None if g is None else _chunk_cumsum(g, cu_seqlens, chunks, False, torch.float32)
    aqk = akk = None
    if gate == 2:
        aqk = q.new_zeros(pair_shape, dtype=torch.float32)
        akk = q.new_zeros(pair_shape, dtype=torch.float32)
        chunk_pairwise_fwd_kernel[(chunks.per_row, CHUNK_SIZE // SUB_CHUNK, batch * num_v_heads)](
            q, k, b, aqk, akk, cu_seqlens, chunks.indices, scale, BC=SUB_CHUNK, **shape,
        )
    ai = w = u = None
    if delta:
        ai = q.new_zeros(pair_shape, dtype=torch.float32)
        # the pseudo-values vn = u - w h cancel when the state predicts v well: w, u and vn stay in fp32
        w = k.new_empty(batch, seq_len, num_v_heads, key_dim, dtype=torch.float32)
        u = torch.empty_like(v, dtype=torch.float32)
        chunk_wy_fwd_kernel[grid_chunks](
            k, v, b, beta, akk, ai, w, u, cu_seqlens, chunks.indices, V=value_dim, BV=_block(value_dim, 64),
            GATE=gate, num_warps=4, **shape,
        )

    h = k.new_empty(chunks.total, num_v_heads, key_dim, value_dim)
    vn = torch.empty_like(v, dtype=torch.float32) if delta else None
    ht = q.new_empty(chunks.num_seqs, num_v_heads, key_dim, value_dim, dtype=torch.float32) if output_final_state else None
    bv = _state_block_v(value_dim, chunks.num_seqs * num_v_heads, q.device)
    options = {**STATE_PASS_OPTIONS, "num_stages": _stages(q.dtype, STATE_PASS_OPTIONS["num_stages"])}
    chunk_state_fwd_kernel[(triton.cdiv(value_dim, bv), chunks.num_seqs * num_v_heads)](
        k, v, w, u, b, h, vn, initial_state, ht, cu_seqlens, chunks.offsets, V=value_dim, BV=bv, GATE=gate,
        DELTA=delta, USE_INITIAL_STATE=initial_state is not None, STORE_FINAL_STATE=output_final_state,
        **options, **shape,
    )
    o = torch.empty_like(v)
    bv = _block(value_dim, 64)
    chunk_out_kernel[(triton.cdiv(value_dim, bv), chunks.per_row, batch * num_v_heads)](
        q, k, b, aqk, h, vn if delta else v, o, cu_seqlens, chunks.indices, scale, V=value_dim, BV=bv, GATE=gate,
        TRANSPOSED=False, num_warps=4, **shape,
    )
    return o, ht, (b, aqk, akk, ai, w, u, h, vn)


def _chunk_bwd(q, k, v, beta, g_dtype, scale, initial_state, cu_seqlens, chunks, saved, do, dht):
    b, aqk, akk, ai, w, u, h, vn = saved
    batch, seq_len, num_heads, key_dim = q.shape
    num_v_heads, value_dim = v.shape[2], v.shape[3]
    gate = 0 if b is None else (1 if b.dim() == 3 else 2)
    delta = beta is not None
    bk = _block(key_dim, MAX_HEAD_DIM)
    shape = {"T": seq_len, "H": num_heads, "HV": num_v_heads, "K": key_dim, "V": value_dim, "BT": CHUNK_SIZE,
             "BK": bk, "IS_VARLEN": chunks.is_varlen}
    bv = _block(value_dim, 64)

    dv_local = v.new_empty(v.shape, dtype=torch.float32)
    chunk_out_kernel[(triton.cdiv(value_dim, bv), chunks.per_row, batch * num_v_heads)](
        q, k, b, aqk, None, do, dv_local, cu_seqlens, chunks.indices, scale, BV=bv, GATE=gate, TRANSPOSED=True,
        num_warps=4, **shape,
    )
    dh = h.new_empty(h.shape)
    dvn = torch.empty_like(dv_local)
    dh0 = torch.empty_like(initial_state, dtype=torch.float32) if initial_state is not None else None
    bv_state = _state_block_v(value_dim, chunks.num_seqs * num_v_heads, q.device)
    options = {**STATE_PASS_OPTIONS, "num_stages": _stages(q.dtype, STATE_PASS_OPTIONS["num_stages"])}
    chunk_state_bwd_kernel[(triton.cdiv(value_dim, bv_state), chunks.num_seqs * num_v_heads)](
        q, k, w, b, do, dv_local, dh, dvn, dht, dh0, cu_seqlens, chunks.offsets, scale, BV=bv_state, GATE=gate,
        DELTA=delta, USE_FINAL_STATE_GRADIENT=dht is not None, USE_INITIAL_STATE=initial_state is not None,
        **options, **shape,
    )

    per_value_head = (batch, seq_len, num_v_heads, key_dim)
    dq = q.new_empty(per_value_head, dtype=torch.float32)
    dk = q.new_empty(per_value_head, dtype=torch.float32)
    dv = torch.empty_like(v)
    dbeta = beta.new_empty(beta.shape, dtype=torch.float32) if delta else None
    db = b.new_empty(b.shape) if b is not None else None
    daqk = dakk = None
    if gate == 2:
        daqk = q.new_empty(aqk.shape, dtype=torch.float32)
        dakk = q.new_empty(aqk.shape, dtype=torch.float32)
    chunk_grad_kernel[(chunks.per_row, batch * num_v_heads)](
        q, k, v, b, beta, akk, ai, w, u, vn, h, dh, do, dvn, dq, dk, dv, dbeta, db, daqk, dakk, cu_seqlens,
        chunks.indices, scale, BV=_block(value_dim, 32), GATE=gate, DELTA=delta, num_warps=8 if bk >= 64 else 4,
        num_stages=_stages(q.dtype, 3), **shape,
    )
    if gate == 2:
        shape.pop("V")
        chunk_pairwise_bwd_kernel[(chunks.per_row, CHUNK_SIZE // SUB_CHUNK, batch * num_v_heads)](
            q, k, b, daqk, dakk, dq, dk, db, cu_seqlens, chunks.indices, BC=SUB_CHUNK, DELTA=delta, num_warps=4,
            **shape,
        )
    dg = None if b is None else _chunk_cumsum(db, cu_seqlens, chunks, True, g_dtype)
    groups = num_v_heads // num_heads
    # value heads of one group share their query/key head: sum their gradients
    dq = dq.view(batch, seq_len, num_heads, groups, key_dim).sum(3).to(q.dtype)
    dk = dk.view(batch, seq_len, num_heads, groups, key_dim).sum(3).to(k.dtype)
    return dq, dk, dv, dg, dbeta, dh0


class ChunkLinearAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens):
        chunks = _Chunks(q.shape[0], q.shape[1], cu_seqlens, q.device)
        o, ht, saved = _chunk_fwd(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, chunks)
        ctx.save_for_backward(q, k, v, beta, initial_state, cu_seqlens, *saved)
        ctx.chunks = chunks
        ctx.scale = scale
        ctx.g_dtype = None if g is None else g.dtype
        ctx.beta_dtype = None if beta is None else beta.dtype
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, beta, initial_state, cu_seqlens, *saved = ctx.saved_tensors
        dq, dk, dv, dg, dbeta, dh0 = _chunk_bwd(
            q, k, v, beta, ctx.g_dtype, ctx.scale, initial_state, cu_seqlens, ctx.chunks, saved, do.contiguous(),
            None if dht is None else dht.contiguous(),
        )
        if dbeta is not None:
            dbeta = dbeta.to(ctx.beta_dtype)
        if dh0 is not None:
            dh0 = dh0.to(initial_state.dtype)
        return dq, dk, dv, dg, dbeta, None, dh0, None, None


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum x^2 + eps) over the last dim, in fp32 (fla's in-kernel q/k norm)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


def _check_inputs(q, k, v, g, beta, initial_state, cu_seqlens):
    if q.shape != k.shape or q.dim() != 4:
        raise ValueError(f"q and k must have the same shape [B, T, H, K], got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:2] != q.shape[:2] or v.shape[2] % q.shape[2] != 0:
        raise ValueError(
            f"v must be [B, T, HV, V] with HV a multiple of the {q.shape[2]} query/key heads, got {tuple(v.shape)}"
        )
    batch, seq_len, _, key_dim = q.shape
    num_v_heads, value_dim = v.shape[2], v.shape[3]
    if max(key_dim, value_dim) > MAX_HEAD_DIM:
        raise ValueError(f"head dims up to {MAX_HEAD_DIM} are supported, got K={key_dim}, V={value_dim}")
    if g is not None and tuple(g.shape) not in ((batch, seq_len, num_v_heads), (batch, seq_len, num_v_heads, key_dim)):
        raise ValueError(f"g must be [B, T, HV] or [B, T, HV, K] with HV={num_v_heads}, got {tuple(g.shape)}")
    if beta is not None and tuple(beta.shape) != (batch, seq_len, num_v_heads):
        raise ValueError(f"beta must be [B, T, HV] with HV={num_v_heads}, got {tuple(beta.shape)}")
    num_seqs = batch
    if cu_seqlens is not None:
        if batch != 1:
            raise ValueError(
                f"The batch size is expected to be 1 rather than {batch} when using `cu_seqlens`. "
                "Please flatten variable-length inputs before processing."
            )
        num_seqs = len(cu_seqlens) - 1
    expected = (num_seqs, num_v_heads, key_dim, value_dim)
    if initial_state is not None and tuple(initial_state.shape) != expected:
        raise ValueError(f"initial_state must be [N, HV, K, V] = {expected}, got {tuple(initial_state.shape)}")


def _prepare(q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm_in_kernel):
    _check_inputs(q, k, v, g, beta, initial_state, cu_seqlens)
    if use_qk_l2norm_in_kernel:
        q, k = l2_normalize(q), l2_normalize(k)
    dtype = q.dtype
    q, k, v = q.contiguous(), k.to(dtype).contiguous(), v.to(dtype).contiguous()
    g = None if g is None else g.contiguous()
    beta = None if beta is None else beta.contiguous()
    initial_state = None if initial_state is None else initial_state.contiguous()
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int64).contiguous()
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return q, k, v, g, beta, scale, initial_state, cu_seqlens


@torch.compiler.disable
def chunk_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
):
    """Chunked gated linear attention / (gated) delta rule, with a backward.

    Args:
        q, k: `[B, T, H, K]`. v: `[B, T, HV, V]`, HV a multiple of H.
        g: log-space decay, `[B, T, HV]` (per head) or `[B, T, HV, K]` (per key channel); None = no decay.
        beta: `[B, T, HV]` delta-rule write strength; None = additive write (gated linear attention).
        scale: query scale, default K ** -0.5.
        initial_state: `[N, HV, K, V]`, N = B or the number of packed sequences.
        cu_seqlens: `[N + 1]` cumulative lengths of sequences packed along T (then B must be 1).
        use_qk_l2norm_in_kernel: L2-normalise q and k first.
    Returns:
        o `[B, T, HV, V]` in q's dtype, and the final state `[N, HV, K, V]` (fp32) or None.
    """
    q, k, v, g, beta, scale, initial_state, cu_seqlens = _prepare(
        q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm_in_kernel
    )
    return ChunkLinearAttentionFunction.apply(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)


@torch.compiler.disable
def fused_recurrent_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
):
    """Token-by-token form of `chunk_linear_attention` (same arguments and results), one launch for the whole
    input: decode steps and short prompts. Runs the chunked op when a gradient is needed."""
    tensors = (q, k, v, g, beta, initial_state)
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors):
        return chunk_linear_attention(
            q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm_in_kernel
        )
    _check_inputs(q, k, v, g, beta, initial_state, cu_seqlens)
    batch, seq_len, num_heads, key_dim = q.shape
    num_v_heads, value_dim = v.shape[2], v.shape[3]
    scale = key_dim**-0.5 if scale is None else float(scale)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    g = None if g is None else g.contiguous()
    beta = None if beta is None else beta.contiguous()
    initial_state = None if initial_state is None else initial_state.contiguous()
    num_seqs = batch
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int64).contiguous()
        num_seqs = len(cu_seqlens) - 1
    o = torch.empty_like(v, dtype=q.dtype)
    ht = q.new_empty(num_seqs, num_v_heads, key_dim, value_dim, dtype=torch.float32) if output_final_state else None
    bv = _state_block_v(value_dim, num_seqs * num_v_heads, q.device)
    fused_recurrent_fwd_kernel[(triton.cdiv(value_dim, bv), num_seqs * num_v_heads)](
        q, k, v, g, beta, o, initial_state, ht, cu_seqlens, scale, seq_len, H=num_heads, HV=num_v_heads, K=key_dim,
        V=value_dim, BK=_block(key_dim, MAX_HEAD_DIM), BV=bv, GATE=0 if g is None else (1 if g.dim() == 3 else 2),
        DELTA=beta is not None, L2NORM=use_qk_l2norm_in_kernel, USE_INITIAL_STATE=initial_state is not None,
        STORE_FINAL_STATE=output_final_state, IS_VARLEN=cu_seqlens is not None, num_warps=4,
    )
    return o, ht


def chunk_gated_delta_rule(
    q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, use_qk_l2norm_in_kernel=False,
    cu_seqlens=None, **kwargs,
):
    """Gated DeltaNet (chunked): g `[B, T, HV]` log decay per head, beta `[B, T, HV]`. See `chunk_linear_attention`."""
    _no_extra_options(kwargs)
    return chunk_linear_attention(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                                  use_qk_l2norm_in_kernel)


def fused_recurrent_gated_delta_rule(
    q, k, v, g=None, gk=None, gv=None, beta=None, scale=None, initial_state=None, output_final_state=False,
    use_qk_l2norm_in_kernel=False, cu_seqlens=None, **kwargs,
):
    """Gated DeltaNet (token by token): g `[B, T, HV]` per head, or gk `[B, T, HV, K]` per key channel."""
    _no_extra_options(kwargs)
    if gv is not None:
        raise NotImplementedError("per-value-channel decays (gv) are not supported")
    if g is not None and gk is not None:
        raise ValueError("pass either g (per head) or gk (per key channel), not both")
    if beta is None:
        beta = torch.ones(v.shape[:3], dtype=q.dtype, device=q.device)
    return fused_recurrent_linear_attention(q, k, v, gk if g is None else g, beta, scale, initial_state,
                                            output_final_state, cu_seqlens, use_qk_l2norm_in_kernel)


def chunk_delta_rule(
    q, k, v, beta, scale=None, initial_state=None, output_final_state=False, use_qk_l2norm_in_kernel=False,
    cu_seqlens=None, **kwargs,
):
    """DeltaNet (chunked): delta rule without decay, beta `[B, T, HV]`."""
    _no_extra_options(kwargs)
    return chunk_linear_attention(q, k, v, None, beta, scale, initial_state, output_final_state, cu_seqlens,
                                  use_qk_l2norm_in_kernel)


def fused_recurrent_delta_rule(
    q, k, v, beta=None, scale=None, initial_state=None, output_final_state=False, use_qk_l2norm_in_kernel=False,
    cu_seqlens=None,
):
    """DeltaNet (token by token); beta defaults to ones."""
    if beta is None:
        beta = torch.ones(v.shape[:3], dtype=q.dtype, device=q.device)
    return fused_recurrent_linear_attention(q, k, v, None, beta, scale, initial_state, output_final_state,
                                            cu_seqlens, use_qk_l2norm_in_kernel)


def chunk_gla(
    q, k, v, g, scale=None, initial_state=None, output_final_state=False, state_v_first=False, cu_seqlens=None,
    **kwargs,
):
    """GLA (chunked): g `[B, T, HV, K]` log decay per key channel, additive write."""
    _no_extra_options(dict(kwargs, state_v_first=state_v_first))
    return chunk_linear_attention(q, k, v, g, None, scale, initial_state, output_final_state, cu_seqlens)


def fused_recurrent_gla(
    q, k, v, gk=None, gv=None, scale=None, initial_state=None, output_final_state=False, reverse=False,
    state_v_first=False, cu_seqlens=None, **kwargs,
):
    """GLA (token by token): gk `[B, T, HV, K]` log decay per key channel."""
    _no_extra_options(dict(kwargs, state_v_first=state_v_first))
    if gv is not None or reverse:
        raise NotImplementedError("per-value-channel decays (gv) and reverse scans are not supported")
    return fused_recurrent_linear_attention(q, k, v, gk, None, scale, initial_state, output_final_state, cu_seqlens)


def chunk_kda(
    q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, use_qk_l2norm_in_kernel=False,
    cu_seqlens=None, **kwargs,
):
    """Kimi Delta Attention (chunked): delta rule with g `[B, T, HV, K]` log decay per key channel."""
    _no_extra_options(kwargs)
    return chunk_linear_attention(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                                  use_qk_l2norm_in_kernel)


def fused_recurrent_kda(
    q, k, v, g, beta, A_log=None, dt_bias=None, scale=None, initial_state=None, output_final_state=False,
    use_qk_l2norm_in_kernel=False, cu_seqlens=None, **kwargs,
):
    """Kimi Delta Attention (token by token); the in-kernel gate (A_log, dt_bias) is not supported."""
    _no_extra_options(dict(kwargs, A_log=A_log, dt_bias=dt_bias))
    return fused_recurrent_linear_attention(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                                            use_qk_l2norm_in_kernel)


# fla options that change the maths are refused rather than silently ignored; the rest are accepted
_IGNORED_OPTIONS = {"cu_seqlens_cpu", "chunk_indices", "state_v_first"}


def _no_extra_options(kwargs):
    unknown = {key: True for key, value in kwargs.items() if key not in _IGNORED_OPTIONS and value is not None
               and value is not False}
    if kwargs.get("state_v_first"):
        unknown["state_v_first"] = True
    if unknown:
        raise NotImplementedError(f"options not supported by hf_effattn's kernels: {sorted(unknown)}")
