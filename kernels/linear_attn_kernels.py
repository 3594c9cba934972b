"""Triton kernels of the chunked and recurrent linear-attention ops (host side: `linear_attn.py`).

One set of kernels covers every variant through two flags:
  * GATE:  0 no decay, 1 one log decay per head and token (GDN), 2 one per key channel (GLA, KDA);
  * DELTA: delta-rule write (DeltaNet, GDN, KDA) or plain additive write (GLA).

Per chunk of BT = 64 tokens, with b the in-chunk cumulative log decay and S the state entering the chunk:
  delta rule (WY form): A[s, r] = beta_s sum_k k_s k_r exp(b_s - b_r) (r < s), Ai = (I + A)^-1,
      w = Ai (beta k exp(b)), u = Ai (beta v), vn = u - w S;  plain write: vn = v;
  o = scale (q exp(b)) S + P vn with P[t, s] = scale sum_k q_t k_s exp(b_t - b_s) (s <= t);
  S' = exp(b_last) S + (k exp(b_last - b))^T vn.
Only the state pass is sequential over chunks; it runs one program per (sequence, value head, V block).
Per-channel decays never form exp(+b): pairwise terms are evaluated in 16-token sub-blocks against a reference
row inside the chunk, so strong decays underflow to zero instead of overflowing.

Layouts: q, k `[B, T, H, K]`; v, o `[B, T, HV, V]`; beta `[B, T, HV]`; b `[B, T, HV, G]` (G = 1 or K);
pairwise buffers `[B, T, HV, BT]`; states `[NT, HV, K, V]`. Varlen batches have B = 1 and chunk lists.
"""

try:
    import triton
    import triton.language as tl
except ImportError as error:  # the importer falls back to the torch reference
    raise ImportError("the linear-attention kernels need triton (`pip install triton`)") from error


@triton.jit
def _masked_exp(x, mask):
    """exp(x) where mask holds, else 0, without evaluating exp on masked-out (possibly large) arguments."""
    return tl.where(mask, tl.exp(tl.where(mask, x, 0.0)), 0.0)


@triton.jit
def _locate_chunk(i_t, i_b, T, cu_seqlens, chunk_indices, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """(first token of the sequence, sequence length, chunk index inside the sequence, chunk index in state
    buffers) of program chunk `i_t` of batch row `i_b`."""
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_t * 2).to(tl.int64)
        i_c = tl.load(chunk_indices + i_t * 2 + 1).to(tl.int64)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        seq_len = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
        i_tg = i_t.to(tl.int64)
    else:
        i_c = i_t.to(tl.int64)
        bos = i_b.to(tl.int64) * T
        seq_len = T.to(tl.int64)
        i_tg = i_b.to(tl.int64) * tl.cdiv(T, BT) + i_c
    return bos, seq_len, i_c, i_tg


@triton.jit
def _locate_sequence(i_n, T, cu_seqlens, chunk_offsets, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """(first token, length, first chunk index in state buffers) of sequence `i_n`."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        seq_len = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
        first_chunk = tl.load(chunk_offsets + i_n).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        seq_len = T.to(tl.int64)
        first_chunk = i_n.to(tl.int64) * tl.cdiv(T, BT)
    return bos, seq_len, first_chunk


@triton.jit(do_not_specialize=["T"])
def chunk_cumsum_kernel(
    x,
    y,
    cu_seqlens,
    chunk_indices,
    T,
    HV: tl.constexpr,
    G: tl.constexpr,
    BG: tl.constexpr,
    BT: tl.constexpr,
    REVERSE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """Cumulative sum of x `[B, T, HV, G]` inside each chunk (reverse: from the chunk's end), in fp32."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_hv = i_bh // HV, i_bh % HV
    bos, seq_len, i_c, _ = _locate_chunk(i_t, i_b, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)
    o_t = i_c * BT + tl.arange(0, BT)
    o_g = tl.arange(0, BG)
    m_x = (o_t < seq_len)[:, None] & (o_g < G)[None, :]
    p_x = ((bos + o_t) * HV + i_hv)[:, None] * G + o_g[None, :]
    # [BT, BG]
    b_x = tl.load(x + p_x, mask=m_x, other=0.0).to(tl.float32)
    b_y = tl.cumsum(b_x, axis=0)
    if REVERSE:
        b_y = tl.sum(b_x, axis=0)[None, :] - b_y + b_x
    tl.store(y + p_x, b_y.to(y.dtype.element_ty), mask=m_x)


@triton.jit(do_not_specialize=["T"])
def chunk_pairwise_fwd_kernel(
    q,
    k,
    b,
    aqk,
    akk,
    cu_seqlens,
    chunk_indices,
    scale,
    T,
    H: tl.constexpr,
    HV: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """Per-channel decays: P[t, s] = scale sum_k q_t k_s exp(b_t - b_s) (s <= t) and
    KK[t, s] = sum_k k_t k_s exp(b_t - b_s) (s < t) for the rows of one BC-row sub-block of a chunk."""
    i_t, i_i, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_hv = i_bh // HV, i_bh % HV
    i_h = i_hv // (HV // H)
    bos, seq_len, i_c, _ = _locate_chunk(i_t, i_b, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)
    row0 = i_c * BT + i_i * BC
    if row0 >= seq_len:
        return
    o_i = tl.arange(0, BC)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_r = row0 + o_i
    m_r = o_r < seq_len
    m_rk = m_r[:, None] & m_k[None, :]
    p_qk = ((bos + o_r) * H + i_h)[:, None] * K + o_k[None, :]
    p_b = ((bos + o_r) * HV + i_hv)[:, None] * K + o_k[None, :]
    # [BC, BK]
    b_q = tl.load(q + p_qk, mask=m_rk, other=0.0).to(tl.float32)
    b_k = tl.load(k + p_qk, mask=m_rk, other=0.0).to(tl.float32)
    b_b = tl.load(b + p_b, mask=m_rk, other=0.0)
    # reference: the sub-block's first row, so that both factors below decay (exponents <= 0)
    b_ref = tl.load(b + ((bos + row0) * HV + i_hv) * K + o_k, mask=m_k, other=0.0)
    b_e = _masked_exp(b_b - b_ref[None, :], m_rk)
    b_qg = b_q * b_e
    b_kg = b_k * b_e
    p_out = ((bos + o_r) * HV + i_hv)[:, None] * BT + o_i[None, :]
    for j in range(i_i):
        o_s = i_c * BT + j * BC + o_i
        p_ks = ((bos + o_s) * H + i_h)[:, None] * K + o_k[None, :]
        p_bs = ((bos + o_s) * HV + i_hv)[:, None] * K + o_k[None, :]
        b_ks = tl.load(k + p_ks, mask=m_k[None, :], other=0.0).to(tl.float32)
        b_bs = tl.load(b + p_bs, mask=m_k[None, :], other=0.0)
        b_ks = b_ks * tl.exp(b_ref[None, :] - b_bs)
        tl.store(aqk + p_out + j * BC, tl.dot(b_qg, tl.trans(b_ks)) * scale, mask=m_r[:, None])
        tl.store(akk + p_out + j * BC, tl.dot(b_kg, tl.trans(b_ks)), mask=m_r[:, None])
    # diagonal sub-block, one key column at a time
    b_aq = tl.zeros([BC, BC], dtype=tl.float32)
    b_ak = tl.zeros([BC, BC], dtype=tl.float32)
    for s in range(BC):
        # tensors, not a scalar: newer Triton interpreters reject the mask that scalar & tensor gives
        m_sk = (o_k * 0 + row0 + s) < seq_len
        p_s = (bos + row0 + s) * H * K + i_h * K + o_k
        b_ks = tl.load(k + p_s, mask=m_k & m_sk, other=0.0).to(tl.float32)
        b_bs = tl.load(b + (bos + row0 + s) * HV * K + i_hv * K + o_k, mask=m_k & m_sk, other=0.0)
        m_ts = (o_i >= s) & m_r
        b_e = _masked_exp(b_b - b_bs[None, :], m_ts[:, None] & m_k[None, :])
        b_col_q = tl.sum(b_q * b_ks[None, :] * b_e, axis=1)
        b_col_k = tl.where(o_i > s, tl.sum(b_k * b_ks[None, :] * b_e, axis=1), 0.0)
        b_aq = tl.where(o_i[None, :] == s, b_col_q[:, None], b_aq)
        b_ak = tl.where(o_i[None, :] == s, b_col_k[:, None], b_ak)
    tl.store(aqk + p_out + i_i * BC, b_aq * scale, mask=m_r[:, None])
    tl.store(akk + p_out + i_i * BC, b_ak, mask=m_r[:, None])


@triton.jit
def _invert_unit_lower(b_a, BC: tl.constexpr):
    """(I + a)^-1 of a strictly lower-triangular [BC, BC] block, by forward substitution."""
    o_i = tl.arange(0, BC)
    b_t = (o_i[:, None] == o_i[None, :]).to(tl.float32)
    for r in range(1, BC):
        b_row_a = tl.sum(tl.where(o_i[:, None] == r, b_a, 0.0), axis=0)
        b_row = -tl.sum(b_row_a[:, None] * b_t, axis=0) + (o_i == r).to(tl.float32)
        b_t = tl.where(o_i[:, None] == r, b_row[None, :], b_t)
    return b_t


@triton.jit
def _dot_ieee(a, b):
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _load_akk_block(k, b, beta, akk, bos, seq_len, i_h, i_hv, i_c, I: tl.constexpr, J: tl.constexpr,
                    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                    BK: tl.constexpr, GATE: tl.constexpr):
    """Block (I, J) of A = beta_s sum_k k_s k_r exp(b_s - b_r), r < s: [BC, BC], fp32."""
    o_i = tl.arange(0, BC)
    o_k = tl.arange(0, BK)
    o_r = i_c * BT + I * BC + o_i
    o_s = i_c * BT + J * BC + o_i
    m_r = o_r < seq_len
    m_s = o_s < seq_len
    m_a = m_r[:, None] & m_s[None, :]
    if I == J:
        m_a = m_a & (o_i[:, None] > o_i[None, :])
    b_beta = tl.load(beta + (bos + o_r) * HV + i_hv, mask=m_r, other=0.0).to(tl.float32)
    if GATE == 2:
        p_a = ((bos + o_r) * HV + i_hv)[:, None] * BT + (J * BC + o_i)[None, :]
        b_a = tl.load(akk + p_a, mask=m_a, other=0.0)
    else:
        m_k = o_k < K
        b_kr = tl.load(k + ((bos + o_r) * H + i_h)[:, None] * K + o_k[None, :], mask=m_r[:, None] & m_k[None, :],
                       other=0.0)
        b_ks = tl.load(k + ((bos + o_s) * H + i_h)[:, None] * K + o_k[None, :], mask=m_s[:, None] & m_k[None, :],
                       other=0.0)
        b_a = tl.dot(b_kr, tl.trans(b_ks))
        if GATE == 1:
            b_br = tl.load(b + (bos + o_r) * HV + i_hv, mask=m_r, other=0.0)
            b_bs = tl.load(b + (bos + o_s) * HV + i_hv, mask=m_s, other=0.0)
            b_a = b_a * tl.exp(tl.where(m_a, b_br[:, None] - b_bs[None, :], 0.0))
    return tl.where(m_a, b_a * b_beta[:, None], 0.0)


@triton.jit
def _load_rows(x, bos, seq_len, row0, i_head, NHEAD: tl.constexpr, D: tl.constexpr, BC: tl.constexpr,
               BD: tl.constexpr, col0):
    """Rows row0 .. row0 + BC of head i_head of x `[.., NHEAD, D]`, columns col0 .. col0 + BD: [BC, BD], fp32."""
    o_r = row0 + tl.arange(0, BC)
    o_d = col0 + tl.arange(0, BD)
    m = (o_r < seq_len)[:, None] & (o_d < D)[None, :]
    return tl.load(x + ((bos + o_r) * NHEAD + i_head)[:, None] * D + o_d[None, :], mask=m, other=0.0).to(tl.float32)


@triton.jit
def _store_rows(x, value, bos, seq_len, row0, i_head, NHEAD: tl.constexpr, D: tl.constexpr, BC: tl.constexpr,
                BD: tl.constexpr, col0):
    o_r = row0 + tl.arange(0, BC)
    o_d = col0 + tl.arange(0, BD)
    m = (o_r < seq_len)[:, None] & (o_d < D)[None, :]
    tl.store(x + ((bos + o_r) * NHEAD + i_head)[:, None] * D + o_d[None, :], value.to(x.dtype.element_ty), mask=m)


@triton.jit
def _wy_rows(b_t0, b_t1, b_t2, b_t3, b_y0, b_y1, b_y2, b_y3, dtype: tl.constexpr):
    """sum_j T_j Y_j over the sub-blocks j of one row of the block-triangular inverse."""
    b_x = tl.dot(b_t0.to(dtype), b_y0.to(dtype))
    b_x += tl.dot(b_t1.to(dtype), b_y1.to(dtype))
    b_x += tl.dot(b_t2.to(dtype), b_y2.to(dtype))
    b_x += tl.dot(b_t3.to(dtype), b_y3.to(dtype))
    return b_x


@triton.jit(do_not_specialize=["T"])
def chunk_wy_fwd_kernel(
    k,
    v,
    b,
    beta,
    akk,
    ai,
    w,
    u,
    cu_seqlens,
    chunk_indices,
    T,
    H: tl.constexpr,
    HV: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GATE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """Delta rule, per chunk: Ai = (I + A)^-1 (stored, fp32), w = Ai (beta k exp(b)), u = Ai (beta v).

    The 64 x 64 inverse is built from four 16 x 16 diagonal inverses (forward substitution) and block products.
    """
    BC: tl.constexpr = 16
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_hv = i_bh // HV, i_bh % HV
    i_h = i_hv // (HV // H)
    bos, seq_len, i_c, _ = _locate_chunk(i_t, i_b, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)
    a00 = _load_akk_block(k, b, beta, akk, bos, seq_len, i_h, i_hv, i_c, 0, 0, H, HV, K, BT, BC, BK, GATE)
    a10 = _load_akk_block(k, b, beta, akk, bos, seq_len, i_h, i_hv, i_c, 1, 0, H, HV, K, BT, BC, BK, GATE)
    a11 = _load_akk_block(k, b, beta, akk, bos, seq_len, i_h, i_hv, i_c, 1, 1, H, HV, K, BT, BC, BK, GATE)
    a20 = _load_akk_block(k, b, beta, akk, bos, seq_len, i_h, i_hv, i_c, 2, 0, H, HV, K, BT, BC, BK, GATE)
    a21 = _load_akk_block(k, b, beta, akk, bos, seq_len, i_h, i_hv, i_c, 2, 1, H, HV, K, BT, BC, BK, GATE)
    a22 = _load_akk_block(k, b, beta, akk, bos, seq_len, i_h, i_hv, i_c, 2, 2, H, HV, K, BT, BC, BK, GATE)
    a30 = _load_akk_block(k, b, beta, akk, bos, seq_len, i_h, i_hv, i_c, 3, 0, H, HV, K, BT, BC, BK, GATE)
    a31 = _load_akk_block(k, b, beta, akk, bos, seq_len, i_h, i_hv, i_c, 3, 1, H, HV, K, BT, BC, BK, GATE)
    a32 = _load_akk_block(k, b, beta, akk, bos, seq_len, i_h, i_hv, i_c, 3, 2, H, HV, K, BT, BC, BK, GATE)
    a33 = _load_akk_block(k, b, beta, akk, bos, seq_len, i_h, i_hv, i_c, 3, 3, H, HV, K, BT, BC, BK, GATE)
    t00 = _invert_unit_lower(a00, BC)
    t11 = _invert_unit_lower(a11, BC)
    t22 = _invert_unit_lower(a22, BC)
    t33 = _invert_unit_lower(a33, BC)
    # T_ij = -T_ii sum_{j <= m < i} A_im T_mj
    t10 = -_dot_ieee(t11, _dot_ieee(a10, t00))
    t21 = -_dot_ieee(t22, _dot_ieee(a21, t11))
    t32 = -_dot_ieee(t33, _dot_ieee(a32, t22))
    t20 = -_dot_ieee(t22, _dot_ieee(a20, t00) + _dot_ieee(a21, t10))
    t31 = -_dot_ieee(t33, _dot_ieee(a31, t11) + _dot_ieee(a32, t21))
    t30 = -_dot_ieee(t33, _dot_ieee(a30, t00) + _dot_ieee(a31, t10) + _dot_ieee(a32, t20))
    zero = tl.zeros([BC, BC], dtype=tl.float32)

    row0 = i_c * BT
    _store_rows(ai, t00, bos, seq_len, row0, i_hv, HV, BT, BC, BC, 0)
    _store_rows(ai, t10, bos, seq_len, row0 + BC, i_hv, HV, BT, BC, BC, 0)
    _store_rows(ai, t11, bos, seq_len, row0 + BC, i_hv, HV, BT, BC, BC, BC)
    _store_rows(ai, t20, bos, seq_len, row0 + 2 * BC, i_hv, HV, BT, BC, BC, 0)
    _store_rows(ai, t21, bos, seq_len, row0 + 2 * BC, i_hv, HV, BT, BC, BC, BC)
    _store_rows(ai, t22, bos, seq_len, row0 + 2 * BC, i_hv, HV, BT, BC, BC, 2 * BC)
    _store_rows(ai, t30, bos, seq_len, row0 + 3 * BC, i_hv, HV, BT, BC, BC, 0)
    _store_rows(ai, t31, bos, seq_len, row0 + 3 * BC, i_hv, HV, BT, BC, BC, BC)
    _store_rows(ai, t32, bos, seq_len, row0 + 3 * BC, i_hv, HV, BT, BC, BC, 2 * BC)
    _store_rows(ai, t33, bos, seq_len, row0 + 3 * BC, i_hv, HV, BT, BC, BC, 3 * BC)

    # w = Ai (beta k exp(b)), [BC, BK] per sub-block
    o_i = tl.arange(0, BC)
    dtype = w.dtype.element_ty
    y0 = _load_rows(k, bos, seq_len, row0, i_h, H, K, BC, BK, 0)
    y1 = _load_rows(k, bos, seq_len, row0 + BC, i_h, H, K, BC, BK, 0)
    y2 = _load_rows(k, bos, seq_len, row0 + 2 * BC, i_h, H, K, BC, BK, 0)
    y3 = _load_rows(k, bos, seq_len, row0 + 3 * BC, i_h, H, K, BC, BK, 0)
    m_0 = row0 + o_i < seq_len
    m_1 = row0 + BC + o_i < seq_len
    m_2 = row0 + 2 * BC + o_i < seq_len
    m_3 = row0 + 3 * BC + o_i < seq_len
    beta0 = tl.load(beta + (bos + row0 + o_i) * HV + i_hv, mask=m_0, other=0.0).to(tl.float32)
    beta1 = tl.load(beta + (bos + row0 + BC + o_i) * HV + i_hv, mask=m_1, other=0.0).to(tl.float32)
    beta2 = tl.load(beta + (bos + row0 + 2 * BC + o_i) * HV + i_hv, mask=m_2, other=0.0).to(tl.float32)
    beta3 = tl.load(beta + (bos + row0 + 3 * BC + o_i) * HV + i_hv, mask=m_3, other=0.0).to(tl.float32)
    if GATE == 1:
        y0 *= tl.exp(tl.load(b + (bos + row0 + o_i) * HV + i_hv, mask=m_0, other=0.0))[:, None]
        y1 *= tl.exp(tl.load(b + (bos + row0 + BC + o_i) * HV + i_hv, mask=m_1, other=0.0))[:, None]
        y2 *= tl.exp(tl.load(b + (bos + row0 + 2 * BC + o_i) * HV + i_hv, mask=m_2, other=0.0))[:, None]
        y3 *= tl.exp(tl.load(b + (bos + row0 + 3 * BC + o_i) * HV + i_hv, mask=m_3, other=0.0))[:, None]
    if GATE == 2:
        y0 *= tl.exp(_load_rows(b, bos, seq_len, row0, i_hv, HV, K, BC, BK, 0))
        y1 *= tl.exp(_load_rows(b, bos, seq_len, row0 + BC, i_hv, HV, K, BC, BK, 0))
        y2 *= tl.exp(_load_rows(b, bos, seq_len, row0 + 2 * BC, i_hv, HV, K, BC, BK, 0))
        y3 *= tl.exp(_load_rows(b, bos, seq_len, row0 + 3 * BC, i_hv, HV, K, BC, BK, 0))
    y0 *= beta0[:, None]
    y1 *= beta1[:, None]
    y2 *= beta2[:, None]
    y3 *= beta3[:, None]
    _store_rows(w, _wy_rows(t00, zero, zero, zero, y0, y1, y2, y3, dtype), bos, seq_len, row0, i_hv, HV, K, BC, BK, 0)
    _store_rows(w, _wy_rows(t10, t11, zero, zero, y0, y1, y2, y3, dtype), bos, seq_len, row0 + BC, i_hv, HV, K, BC,
                BK, 0)
    _store_rows(w, _wy_rows(t20, t21, t22, zero, y0, y1, y2, y3, dtype), bos, seq_len, row0 + 2 * BC, i_hv, HV, K,
                BC, BK, 0)
    _store_rows(w, _wy_rows(t30, t31, t32, t33, y0, y1, y2, y3, dtype), bos, seq_len, row0 + 3 * BC, i_hv, HV, K,
                BC, BK, 0)
    # u = Ai (beta v), V in blocks of BV
    for i_v in range(tl.cdiv(V, BV)):
        col0 = i_v * BV
        x0 = _load_rows(v, bos, seq_len, row0, i_hv, HV, V, BC, BV, col0) * beta0[:, None]
        x1 = _load_rows(v, bos, seq_len, row0 + BC, i_hv, HV, V, BC, BV, col0) * beta1[:, None]
        x2 = _load_rows(v, bos, seq_len, row0 + 2 * BC, i_hv, HV, V, BC, BV, col0) * beta2[:, None]
        x3 = _load_rows(v, bos, seq_len, row0 + 3 * BC, i_hv, HV, V, BC, BV, col0) * beta3[:, None]
        _store_rows(u, _wy_rows(t00, zero, zero, zero, x0, x1, x2, x3, dtype), bos, seq_len, row0, i_hv, HV, V, BC,
                    BV, col0)
        _store_rows(u, _wy_rows(t10, t11, zero, zero, x0, x1, x2, x3, dtype), bos, seq_len, row0 + BC, i_hv, HV, V,
                    BC, BV, col0)
        _store_rows(u, _wy_rows(t20, t21, t22, zero, x0, x1, x2, x3, dtype), bos, seq_len, row0 + 2 * BC, i_hv, HV,
                    V, BC, BV, col0)
        _store_rows(u, _wy_rows(t30, t31, t32, t33, x0, x1, x2, x3, dtype), bos, seq_len, row0 + 3 * BC, i_hv, HV,
                    V, BC, BV, col0)


@triton.jit
def _load_gate_rows(b, bos, seq_len, o_t, i_hv, HV: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
                    BK: tl.constexpr, GATE: tl.constexpr):
    """Cumulative log decays of rows o_t: [BT, 1] (per head) or [BT, BK] (per channel); zeros without a gate."""
    m_t = o_t < seq_len
    if GATE == 2:
        o_k = tl.arange(0, BK)
        p = ((bos + o_t) * HV + i_hv)[:, None] * K + o_k[None, :]
        return tl.load(b + p, mask=m_t[:, None] & (o_k < K)[None, :], other=0.0)
    elif GATE == 1:
        return tl.load(b + (bos + o_t) * HV + i_hv, mask=m_t, other=0.0)[:, None]
    else:
        return tl.zeros([BT, 1], dtype=tl.float32)


@triton.jit
def _load_gate_last(b, bos, seq_len, i_c, i_hv, HV: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
                    BK: tl.constexpr, GATE: tl.constexpr):
    """Cumulative log decay at the chunk's last token: [1, 1] or [1, BK]."""
    last = tl.minimum(i_c * BT + BT, seq_len) - 1
    if GATE == 2:
        o_k = tl.arange(0, BK)
        return tl.load(b + ((bos + last) * HV + i_hv) * K + o_k, mask=o_k < K, other=0.0)[None, :]
    elif GATE == 1:
        return tl.full([1, 1], 0.0, tl.float32) + tl.load(b + (bos + last) * HV + i_hv)
    else:
        return tl.zeros([1, 1], dtype=tl.float32)


@triton.jit
def _qk_scores(b_q, b_k, b_g, aqk, bos, seq_len, o_t, i_hv, scale, HV: tl.constexpr, BT: tl.constexpr,
               GATE: tl.constexpr):
    """P[t, s] = scale sum_k q_t k_s exp(b_t - b_s) for s <= t, zero elsewhere: [BT, BT], fp32."""
    m_t = o_t < seq_len
    o_i = tl.arange(0, BT)
    m_a = (o_i[:, None] >= o_i[None, :]) & m_t[:, None] & m_t[None, :]
    if GATE == 2:
        p = ((bos + o_t) * HV + i_hv)[:, None] * BT + o_i[None, :]
        b_a = tl.load(aqk + p, mask=m_a, other=0.0)
    else:
        b_a = tl.dot(b_q, tl.trans(b_k)) * scale
        if GATE == 1:
            b_gt = tl.sum(b_g, axis=1)
            b_a = b_a * tl.exp(tl.where(m_a, b_gt[:, None] - b_gt[None, :], 0.0))
        b_a = tl.where(m_a, b_a, 0.0)
    return b_a


@triton.jit(do_not_specialize=["T"])
def chunk_state_fwd_kernel(
    k,
    v,
    w,
    u,
    b,
    h,
    vn,
    h0,
    ht,
    cu_seqlens,
    chunk_offsets,
    T,
    H: tl.constexpr,
    HV: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GATE: tl.constexpr,
    DELTA: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
    STORE_FINAL_STATE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """The sequential pass: stores each chunk's entering state h and (delta rule) its pseudo-values vn."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_hv = i_nh // HV, i_nh % HV
    i_h = i_hv // (HV // H)
    bos, seq_len, first_chunk = _locate_sequence(i_n, T, cu_seqlens, chunk_offsets, BT, IS_VARLEN)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_h = m_k[:, None] & m_v[None, :]
    p_h = o_k[:, None] * V + o_v[None, :]
    # [BK, BV]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h += tl.load(h0 + (i_nh * K * V).to(tl.int64) + p_h, mask=m_h, other=0.0).to(tl.float32)
    for i_c in range(tl.cdiv(seq_len, BT)):
        tl.store(h + ((first_chunk + i_c) * HV + i_hv) * K * V + p_h, b_h.to(h.dtype.element_ty), mask=m_h)
        o_t = i_c * BT + tl.arange(0, BT)
        m_t = o_t < seq_len
        p_v = ((bos + o_t) * HV + i_hv)[:, None] * V + o_v[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        if DELTA:
            p_w = ((bos + o_t) * HV + i_hv)[:, None] * K + o_k[None, :]
            b_w = tl.load(w + p_w, mask=m_t[:, None] & m_k[None, :], other=0.0)
            b_v = tl.load(u + p_v, mask=m_tv, other=0.0) - tl.dot(b_w, b_h)
            tl.store(vn + p_v, b_v.to(vn.dtype.element_ty), mask=m_tv)
        else:
            b_v = tl.load(v + p_v, mask=m_tv, other=0.0).to(tl.float32)
        # [BK, BT]
        p_kt = ((bos + o_t) * H + i_h)[None, :] * K + o_k[:, None]
        b_kt = tl.load(k + p_kt, mask=m_k[:, None] & m_t[None, :], other=0.0).to(tl.float32)
        if GATE != 0:
            b_g = _load_gate_rows(b, bos, seq_len, o_t, i_hv, HV, K, BT, BK, GATE)
            b_gl = _load_gate_last(b, bos, seq_len, i_c, i_hv, HV, K, BT, BK, GATE)
            b_kt = b_kt * tl.trans(_masked_exp(b_gl - b_g, m_t[:, None]))
            b_h *= tl.trans(tl.exp(b_gl))
        b_h += tl.dot(b_kt, b_v)
    if STORE_FINAL_STATE:
        tl.store(ht + (i_nh * K * V).to(tl.int64) + p_h, b_h, mask=m_h)


@triton.jit(do_not_specialize=["T"])
def chunk_out_kernel(
    q,
    k,
    b,
    aqk,
    h,
    x,
    y,
    cu_seqlens,
    chunk_indices,
    scale,
    T,
    H: tl.constexpr,
    HV: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GATE: tl.constexpr,
    TRANSPOSED: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """For one chunk and one V block: the output o = scale (q exp(b)) h + P vn (x = vn, or v for additive writes),
    or, TRANSPOSED, the in-chunk part of the gradient of vn, P^T do (x = do, fp32)."""
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_hv = i_bh // HV, i_bh % HV
    i_h = i_hv // (HV // H)
    bos, seq_len, i_c, i_tg = _locate_chunk(i_t, i_b, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)
    o_t = i_c * BT + tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_t = o_t < seq_len
    m_k = o_k < K
    m_v = o_v < V
    p_qk = ((bos + o_t) * H + i_h)[:, None] * K + o_k[None, :]
    b_q = tl.load(q + p_qk, mask=m_t[:, None] & m_k[None, :], other=0.0)
    b_k = tl.load(k + p_qk, mask=m_t[:, None] & m_k[None, :], other=0.0)
    b_g = _load_gate_rows(b, bos, seq_len, o_t, i_hv, HV, K, BT, BK, GATE)
    b_a = _qk_scores(b_q, b_k, b_g, aqk, bos, seq_len, o_t, i_hv, scale, HV, BT, GATE)
    p_v = ((bos + o_t) * HV + i_hv)[:, None] * V + o_v[None, :]
    m_tv = m_t[:, None] & m_v[None, :]
    b_x = tl.load(x + p_v, mask=m_tv, other=0.0)
    if TRANSPOSED:
        b_y = tl.dot(tl.trans(b_a).to(b_x.dtype), b_x)
    else:
        b_h = tl.load(h + (i_tg * HV + i_hv) * K * V + o_k[:, None] * V + o_v[None, :],
                      mask=m_k[:, None] & m_v[None, :], other=0.0)
        b_qg = (b_q * tl.exp(b_g)).to(b_h.dtype)
        b_y = tl.dot(b_qg, b_h) * scale + tl.dot(b_a, b_x.to(tl.float32))
    tl.store(y + p_v, b_y.to(y.dtype.element_ty), mask=m_tv)


@triton.jit(do_not_specialize=["T"])
def chunk_state_bwd_kernel(
    q,
    k,
    w,
    b,
    do,
    dv_local,
    dh,
    dvn,
    dht,
    dh0,
    cu_seqlens,
    chunk_offsets,
    scale,
    T,
    H: tl.constexpr,
    HV: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GATE: tl.constexpr,
    DELTA: tl.constexpr,
    USE_FINAL_STATE_GRADIENT: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """The sequential backward pass, last chunk first: stores the gradient of each chunk's leaving state and the
    full d(vn) = P^T do + (k exp(b_last - b)) dh (fp32)."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_hv = i_nh // HV, i_nh % HV
    i_h = i_hv // (HV // H)
    bos, seq_len, first_chunk = _locate_sequence(i_n, T, cu_seqlens, chunk_offsets, BT, IS_VARLEN)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_h = m_k[:, None] & m_v[None, :]
    p_h = o_k[:, None] * V + o_v[None, :]
    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_FINAL_STATE_GRADIENT:
        b_dh += tl.load(dht + (i_nh * K * V).to(tl.int64) + p_h, mask=m_h, other=0.0).to(tl.float32)
    num_chunks = tl.cdiv(seq_len, BT)
    for i_r in range(num_chunks):
        i_c = num_chunks - 1 - i_r
        tl.store(dh + ((first_chunk + i_c) * HV + i_hv) * K * V + p_h, b_dh.to(dh.dtype.element_ty), mask=m_h)
        o_t = i_c * BT + tl.arange(0, BT)
        m_t = o_t < seq_len
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        p_qk = ((bos + o_t) * H + i_h)[:, None] * K + o_k[None, :]
        p_v = ((bos + o_t) * HV + i_hv)[:, None] * V + o_v[None, :]
        b_q = tl.load(q + p_qk, mask=m_tk, other=0.0).to(tl.float32)
        b_k = tl.load(k + p_qk, mask=m_tk, other=0.0).to(tl.float32)
        b_g = _load_gate_rows(b, bos, seq_len, o_t, i_hv, HV, K, BT, BK, GATE)
        b_gl = _load_gate_last(b, bos, seq_len, i_c, i_hv, HV, K, BT, BK, GATE)
        b_kd = b_k * _masked_exp(b_gl - b_g, m_t[:, None])
        b_qd = b_q * tl.exp(b_g) * scale
        b_dv = tl.load(dv_local + p_v, mask=m_tv, other=0.0) + tl.dot(b_kd, b_dh)
        tl.store(dvn + p_v, b_dv, mask=m_tv)
        b_do = tl.load(do + p_v, mask=m_tv, other=0.0).to(tl.float32)
        b_dh *= tl.trans(tl.exp(b_gl))
        b_dh += tl.dot(tl.trans(b_qd), b_do)
        if DELTA:
            p_w = ((bos + o_t) * HV + i_hv)[:, None] * K + o_k[None, :]
            b_w = tl.load(w + p_w, mask=m_tk, other=0.0)
            b_dh -= tl.dot(tl.trans(b_w), b_dv)
    if USE_INITIAL_STATE:
        tl.store(dh0 + (i_nh * K * V).to(tl.int64) + p_h, b_dh, mask=m_h)


@triton.jit(do_not_specialize=["T"])
def chunk_grad_kernel(
    q,
    k,
    v,
    b,
    beta,
    akk,
    ai,
    w,
    u,
    vn,
    h,
    dh,
    do,
    dvn,
    dq,
    dk,
    dv,
    dbeta,
    db,
    daqk,
    dakk,
    cu_seqlens,
    chunk_indices,
    scale,
    T,
    H: tl.constexpr,
    HV: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GATE: tl.constexpr,
    DELTA: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """Per chunk, all of K at once: dq, dk (per value head, fp32), dv, dbeta and the gradient of the cumulative
    log decay db (fp32). With per-channel decays the pairwise terms are left to `chunk_pairwise_bwd_kernel`:
    this kernel then stores their gradients dP and beta dA instead."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_hv = i_bh // HV, i_bh % HV
    i_h = i_hv // (HV // H)
    bos, seq_len, i_c, i_tg = _locate_chunk(i_t, i_b, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)
    o_i = tl.arange(0, BT)
    o_t = i_c * BT + o_i
    o_k = tl.arange(0, BK)
    m_t = o_t < seq_len
    m_k = o_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    p_qk = ((bos + o_t) * H + i_h)[:, None] * K + o_k[None, :]
    p_hk = ((bos + o_t) * HV + i_hv)[:, None] * K + o_k[None, :]
    p_a = ((bos + o_t) * HV + i_hv)[:, None] * BT + o_i[None, :]
    b_q = tl.load(q + p_qk, mask=m_tk, other=0.0)
    b_k = tl.load(k + p_qk, mask=m_tk, other=0.0)
    b_g = _load_gate_rows(b, bos, seq_len, o_t, i_hv, HV, K, BT, BK, GATE)
    b_gl = _load_gate_last(b, bos, seq_len, i_c, i_hv, HV, K, BT, BK, GATE)
    m_causal = (o_i[:, None] >= o_i[None, :]) & m_t[:, None] & m_t[None, :]
    m_strict = (o_i[:, None] > o_i[None, :]) & m_t[:, None] & m_t[None, :]

    b_dqs = tl.zeros([BT, BK], dtype=tl.float32)
    b_dks = tl.zeros([BT, BK], dtype=tl.float32)
    b_dw = tl.zeros([BT, BK], dtype=tl.float32)
    b_dp = tl.zeros([BT, BT], dtype=tl.float32)
    b_da = tl.zeros([BT, BT], dtype=tl.float32)
    b_dbeta = tl.zeros([BT], dtype=tl.float32)
    b_dgl = tl.zeros([BK], dtype=tl.float32)
    if DELTA:
        b_beta = tl.load(beta + (bos + o_t) * HV + i_hv, mask=m_t, other=0.0).to(tl.float32)
        b_ai = tl.load(ai + p_a, mask=m_t[:, None], other=0.0)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_tv = m_t[:, None] & m_v[None, :]
        m_h = m_k[:, None] & m_v[None, :]
        p_v = ((bos + o_t) * HV + i_hv)[:, None] * V + o_v[None, :]
        p_h = (i_tg * HV + i_hv) * K * V + o_k[:, None] * V + o_v[None, :]
        b_h = tl.load(h + p_h, mask=m_h, other=0.0)
        b_dh = tl.load(dh + p_h, mask=m_h, other=0.0)
        b_do = tl.load(do + p_v, mask=m_tv, other=0.0)
        b_dvn = tl.load(dvn + p_v, mask=m_tv, other=0.0)
        if DELTA:
            b_vn = tl.load(vn + p_v, mask=m_tv, other=0.0)
        else:
            b_vn = tl.load(v + p_v, mask=m_tv, other=0.0)
        dtype = b_h.dtype
        b_dqs += tl.dot(b_do.to(dtype), tl.trans(b_h))
        b_dp += tl.dot(b_do.to(b_vn.dtype), tl.trans(b_vn))
        b_dks += tl.dot(b_vn, tl.trans(b_dh).to(b_vn.dtype))
        b_dgl += tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32), axis=1)
        if DELTA:
            b_dw -= tl.dot(b_dvn.to(dtype), tl.trans(b_h))
            # gradient of beta v through u = Ai (beta v)
            b_dyu = tl.dot(tl.trans(b_ai), b_dvn)
            b_v = tl.load(v + p_v, mask=m_tv, other=0.0).to(tl.float32)
            tl.store(dv + p_v, (b_dyu * b_beta[:, None]).to(dv.dtype.element_ty), mask=m_tv)
            b_dbeta += tl.sum(b_v * b_dyu, axis=1)
            b_u = tl.load(u + p_v, mask=m_tv, other=0.0)
            b_da -= tl.dot(b_dyu.to(b_u.dtype), tl.trans(b_u))
        else:
            tl.store(dv + p_v, b_dvn.to(dv.dtype.element_ty), mask=m_tv)

    b_qf = b_q.to(tl.float32)
    b_kf = b_k.to(tl.float32)
    b_eg = tl.exp(b_g)
    # through o = scale (q exp(b)) h: decays with +b
    b_dq = b_dqs * scale * b_eg
    # through S' = ... + (k exp(b_last - b))^T vn: decays with -b (and +b_last)
    b_dk_state = b_dks * _masked_exp(b_gl - b_g, m_t[:, None])
    b_dk_pos = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk_neg = b_dk_state
    b_dp = tl.where(m_causal, b_dp * scale, 0.0)
    if GATE == 2:
        tl.store(daqk + p_a, b_dp, mask=m_t[:, None])
    else:
        b_decay = tl.zeros([BT, BT], dtype=tl.float32) + 1.0
        if GATE == 1:
            b_gt = tl.sum(b_g, axis=1)
            b_decay = tl.exp(tl.where(m_causal, b_gt[:, None] - b_gt[None, :], 0.0))
        b_mp = (b_dp * b_decay).to(b_k.dtype)
        b_dq += tl.dot(b_mp, b_k)
        b_dk_neg += tl.dot(tl.trans(b_mp), b_q)
    if DELTA:
        # gradient of beta k exp(b) through w = Ai (beta k exp(b))
        b_dyw = tl.dot(tl.trans(b_ai), b_dw)
        b_keg = b_kf * b_eg
        b_dk_pos += b_dyw * b_eg * b_beta[:, None]
        b_dbeta += tl.sum(b_keg * b_dyw, axis=1)
        b_w = tl.load(w + p_hk, mask=m_tk, other=0.0)
        b_da -= tl.dot(b_dyw.to(b_w.dtype), tl.trans(b_w))
        b_da = tl.where(m_strict, b_da, 0.0)
        if GATE == 2:
            b_kk = tl.load(akk + p_a, mask=m_t[:, None], other=0.0)
            b_dbeta += tl.sum(b_da * b_kk, axis=1)
            tl.store(dakk + p_a, b_da * b_beta[:, None], mask=m_t[:, None])
        else:
            b_kk = tl.dot(b_k, tl.trans(b_k))
            if GATE == 1:
                b_kk = b_kk * b_decay
            b_kk = tl.where(m_strict, b_kk, 0.0)
            b_dbeta += tl.sum(b_da * b_kk, axis=1)
            b_mk = (b_da * b_decay * b_beta[:, None]).to(b_k.dtype)
            b_dk_pos += tl.dot(b_mk, b_k)
            b_dk_neg += tl.dot(tl.trans(b_mk), b_k)
        tl.store(dbeta + (bos + o_t) * HV + i_hv, b_dbeta.to(dbeta.dtype.element_ty), mask=m_t)
    tl.store(dq + p_hk, b_dq, mask=m_tk)
    tl.store(dk + p_hk, b_dk_pos + b_dk_neg, mask=m_tk)
    if GATE != 0:
        # factors q exp(b) and k exp(b) pass d/db = q dq, k dk; factors k exp(-b) pass -k dk
        b_db = b_qf * b_dq + b_kf * b_dk_pos - b_kf * b_dk_neg
        # S' = exp(b_last) S + ...: d/db_last = sum_v exp(b_last) S dS'
        b_dbl = b_dgl * tl.sum(tl.exp(b_gl), axis=0) + tl.sum(b_kf * b_dk_state, axis=0)
        last = tl.minimum(i_c * BT + BT, seq_len) - 1
        if GATE == 2:
            b_db += tl.where((o_t == last)[:, None], b_dbl[None, :], 0.0)
            tl.store(db + p_hk, b_db, mask=m_tk)
        else:
            b_dbt = tl.sum(b_db, axis=1) + tl.where(o_t == last, tl.sum(b_dbl, axis=0), 0.0)
            tl.store(db + (bos + o_t) * HV + i_hv, b_dbt, mask=m_t)


@triton.jit(do_not_specialize=["T"])
def chunk_pairwise_bwd_kernel(
    q,
    k,
    b,
    daqk,
    dakk,
    dq,
    dk,
    db,
    cu_seqlens,
    chunk_indices,
    T,
    H: tl.constexpr,
    HV: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    DELTA: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """Per-channel decays: adds the gradients of P and A to dq, dk and db for one BC-row sub-block.

    daqk holds dL/dP scaled by `scale` (so dq_t = sum_s daqk[t, s] k_s exp(b_t - b_s)) and dakk holds beta_s dL/dA.
    """
    i_t, i_i, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_hv = i_bh // HV, i_bh % HV
    i_h = i_hv // (HV // H)
    bos, seq_len, i_c, _ = _locate_chunk(i_t, i_b, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)
    row0 = i_c * BT + i_i * BC
    if row0 >= seq_len:
        return
    o_i = tl.arange(0, BC)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_r = row0 + o_i
    m_r = o_r < seq_len
    m_rk = m_r[:, None] & m_k[None, :]
    p_qk = ((bos + o_r) * H + i_h)[:, None] * K + o_k[None, :]
    p_hk = ((bos + o_r) * HV + i_hv)[:, None] * K + o_k[None, :]
    b_q = tl.load(q + p_qk, mask=m_rk, other=0.0).to(tl.float32)
    b_k = tl.load(k + p_qk, mask=m_rk, other=0.0).to(tl.float32)
    b_b = tl.load(b + p_hk, mask=m_rk, other=0.0)
    row_last = tl.minimum(row0 + BC, seq_len) - 1
    b_first = tl.load(b + ((bos + row0) * HV + i_hv) * K + o_k, mask=m_k, other=0.0)
    b_last = tl.load(b + ((bos + row_last) * HV + i_hv) * K + o_k, mask=m_k, other=0.0)

    # row side (this block's queries/keys against earlier sub-blocks), reference: the block's first row
    b_dq = tl.zeros([BC, BK], dtype=tl.float32)
    b_dkr = tl.zeros([BC, BK], dtype=tl.float32)
    p_a = ((bos + o_r) * HV + i_hv)[:, None] * BT + o_i[None, :]
    for j in range(i_i):
        o_s = i_c * BT + j * BC + o_i
        p_s = ((bos + o_s) * H + i_h)[:, None] * K + o_k[None, :]
        b_ks = tl.load(k + p_s, mask=m_k[None, :], other=0.0).to(tl.float32)
        b_bs = tl.load(b + ((bos + o_s) * HV + i_hv)[:, None] * K + o_k[None, :], mask=m_k[None, :], other=0.0)
        b_ks = b_ks * tl.exp(b_first[None, :] - b_bs)
        b_dq += tl.dot(tl.load(daqk + p_a + j * BC, mask=m_r[:, None], other=0.0), b_ks)
        if DELTA:
            b_dkr += tl.dot(tl.load(dakk + p_a + j * BC, mask=m_r[:, None], other=0.0), b_ks)
    b_e = _masked_exp(b_b - b_first[None, :], m_rk)
    b_dq *= b_e
    b_dkr *= b_e

    # column side (this block's keys against later sub-blocks), reference: the block's last row
    b_dkc = tl.zeros([BC, BK], dtype=tl.float32)
    for m in range(i_i + 1, BT // BC):
        o_s = i_c * BT + m * BC + o_i
        m_s = o_s < seq_len
        m_sk = m_s[:, None] & m_k[None, :]
        p_s = ((bos + o_s) * H + i_h)[:, None] * K + o_k[None, :]
        b_bs = tl.load(b + ((bos + o_s) * HV + i_hv)[:, None] * K + o_k[None, :], mask=m_sk, other=0.0)
        b_es = _masked_exp(b_bs - b_last[None, :], m_sk)
        b_qs = tl.load(q + p_s, mask=m_sk, other=0.0).to(tl.float32) * b_es
        b_ks = tl.load(k + p_s, mask=m_sk, other=0.0).to(tl.float32) * b_es
        # blocks (m, i) of daqk and dakk, transposed: [BC (rows of block i), BC (rows of block m)]
        p_at = ((bos + o_s) * HV + i_hv)[None, :] * BT + (i_i * BC + o_i)[:, None]
        b_dkc += tl.dot(tl.load(daqk + p_at, mask=m_s[None, :], other=0.0), b_qs)
        if DELTA:
            b_dkc += tl.dot(tl.load(dakk + p_at, mask=m_s[None, :], other=0.0), b_ks)
    b_dkc *= _masked_exp(b_last[None, :] - b_b, m_rk)

    # diagonal sub-block, one token at a time
    for s in range(BC):
        # tensors, not a scalar: newer Triton interpreters reject the mask that scalar & tensor gives
        m_sk = (o_k * 0 + row0 + s) < seq_len
        m_sr = (o_i * 0 + row0 + s) < seq_len
        p_s = (bos + row0 + s) * H * K + i_h * K + o_k
        b_qs = tl.load(q + p_s, mask=m_k & m_sk, other=0.0).to(tl.float32)
        b_ks = tl.load(k + p_s, mask=m_k & m_sk, other=0.0).to(tl.float32)
        b_bs = tl.load(b + (bos + row0 + s) * HV * K + i_hv * K + o_k, mask=m_k & m_sk, other=0.0)
        # token s as a key: rows t >= s of this block
        p_col = ((bos + o_r) * HV + i_hv) * BT + i_i * BC + s
        b_e = _masked_exp(b_b - b_bs[None, :], ((o_i >= s) & m_r)[:, None] & m_k[None, :])
        b_cq = tl.load(daqk + p_col, mask=m_r, other=0.0)
        b_dq += b_cq[:, None] * b_ks[None, :] * b_e
        if DELTA:
            b_ck = tl.load(dakk + p_col, mask=m_r, other=0.0)
            b_dkr += b_ck[:, None] * b_ks[None, :] * b_e
        # token s as a query/row: keys r <= s of this block
        p_row = ((bos + row0 + s) * HV + i_hv) * BT + i_i * BC + o_i
        b_e = _masked_exp(b_bs[None, :] - b_b, ((o_i <= s) & m_r & m_sr)[:, None] & m_k[None, :])
        b_rq = tl.load(daqk + p_row, mask=m_r & m_sr, other=0.0)
        b_dkc += b_rq[:, None] * b_qs[None, :] * b_e
        if DELTA:
            b_rk = tl.load(dakk + p_row, mask=m_r & m_sr, other=0.0)
            b_dkc += b_rk[:, None] * b_ks[None, :] * b_e

    b_db = b_q * b_dq + b_k * b_dkr - b_k * b_dkc
    tl.store(dq + p_hk, tl.load(dq + p_hk, mask=m_rk, other=0.0) + b_dq, mask=m_rk)
    tl.store(dk + p_hk, tl.load(dk + p_hk, mask=m_rk, other=0.0) + b_dkr + b_dkc, mask=m_rk)
    tl.store(db + p_hk, tl.load(db + p_hk, mask=m_rk, other=0.0) + b_db, mask=m_rk)


@triton.jit(do_not_specialize=["T"])
def fused_recurrent_fwd_kernel(
    q,
    k,
    v,
    g,
    beta,
    o,
    h0,
    ht,
    cu_seqlens,
    scale,
    T,
    H: tl.constexpr,
    HV: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GATE: tl.constexpr,
    DELTA: tl.constexpr,
    L2NORM: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
    STORE_FINAL_STATE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """Token by token, the state block [K, BV] in registers (fp32): decode and short inputs."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_hv = i_nh // HV, i_nh % HV
    i_h = i_hv // (HV // H)
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        seq_len = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    else:
        bos = i_n.to(tl.int64) * T
        seq_len = T.to(tl.int64)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_h = m_k[:, None] & m_v[None, :]
    p_h = o_k[:, None] * V + o_v[None, :]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h += tl.load(h0 + (i_nh * K * V).to(tl.int64) + p_h, mask=m_h, other=0.0).to(tl.float32)
    for t in range(seq_len):
        p_qk = ((bos + t) * H + i_h) * K + o_k
        p_v = ((bos + t) * HV + i_hv) * V + o_v
        b_q = tl.load(q + p_qk, mask=m_k, other=0.0).to(tl.float32)
        b_k = tl.load(k + p_qk, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(v + p_v, mask=m_v, other=0.0).to(tl.float32)
        if L2NORM:
            b_q = b_q / tl.sqrt(tl.sum(b_q * b_q) + 1e-6)
            b_k = b_k / tl.sqrt(tl.sum(b_k * b_k) + 1e-6)
        if GATE == 1:
            b_h *= tl.exp(tl.load(g + (bos + t) * HV + i_hv).to(tl.float32))
        if GATE == 2:
            b_gk = tl.load(g + ((bos + t) * HV + i_hv) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
            b_h *= tl.exp(b_gk)[:, None]
        if DELTA:
            b_beta = tl.load(beta + (bos + t) * HV + i_hv).to(tl.float32)
            b_v = (b_v - tl.sum(b_h * b_k[:, None], axis=0)) * b_beta
        b_h += b_k[:, None] * b_v[None, :]
        b_o = tl.sum(b_h * b_q[:, None], axis=0) * scale
        tl.store(o + p_v, b_o.to(o.dtype.element_ty), mask=m_v)
    if STORE_FINAL_STATE:
        tl.store(ht + (i_nh * K * V).to(tl.int64) + p_h, b_h, mask=m_h)
