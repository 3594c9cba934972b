"""Triton kernels of the chunked and recurrent linear-attention ops (host side: `linear_attn.py`).

One set of kernels covers every variant through two flags:
  * GATE:  0 no decay, 1 one log decay per head and token (GDN), 2 one per key channel (GLA, KDA);
  * DELTA: delta-rule write (DeltaNet, GDN, KDA) or plain additive write (GLA).

Per chunk of BT = 64 tokens, with b the in-chunk cumulative log decay and S the state entering the chunk:
  delta rule (WY form): A[s, r] = beta_s sum_k k_s k_r exp(b_s - b_r) (r < s), Ai = (I + A)^-1,
      w = Ai (beta k exp(b)), u = Ai (beta v), vn = u - w S (forwards without a backward regroup it as
      vn = Ai (beta (v - (k exp(b)) S)), so that w and u never go through memory);  plain write: vn = v;
  o = scale (q exp(b)) S + P vn with P[t, s] = scale sum_k q_t k_s exp(b_t - b_s) (s <= t);
  S' = exp(b_last) S + (k exp(b_last - b))^T vn.
Only the state passes are sequential over chunks. They run one program per (segment, value head, V block) and
compute the output (forward) or the in-chunk value gradient (backward) on the fly, so neither goes through memory.
A segment is a whole sequence, or, when there are too few sequences to fill the GPU, a run of chunks: the affine map
S -> M S + C across each segment is computed in parallel (`chunk_segment_fwd_kernel`), a short sequential pass over
the segments joins them (`chunk_combine_kernel`), and the state passes then run per segment from the joined states.
Per-channel decays never form exp(+b): pairwise terms are evaluated in 16-token sub-blocks against a reference
row inside the chunk, so strong decays underflow to zero instead of overflowing; the diagonal sub-blocks use a
growing factor exp(b_ref - b) only where it stays below e^DIAGONAL_SPAN.

Layouts: q, k `[B, T, H, K]`; v, o `[B, T, HV, V]`; beta `[B, T, HV]`; b `[B, T, HV, G]` (G = 1 or K);
pairwise buffers `[B, T, HV, BT]`; per-chunk states `[NT, HV, K, V]`; per-segment maps `[NS, HV, K, K or V]`.
Varlen batches have B = 1 and chunk and segment lists.
"""

try:
    import triton
    import triton.language as tl
except ImportError as error:  # the importer falls back to the torch reference
    raise ImportError("the linear-attention kernels need triton (`pip install triton`)") from error


# the pairwise kernel forms its diagonal sub-blocks as one product against a reference row when no channel decays by
# more than this (natural log) inside the sub-block: e^40 ~ 2e17 keeps every factor a normal fp32 number with room
# to spare; stronger decays take the exact per-column loop
DIAGONAL_SPAN = tl.constexpr(40.0)


@triton.jit
def _masked_exp(x, mask):
    """exp(x) where mask holds, else 0, without evaluating exp on masked-out (possibly large) arguments."""
    return tl.where(mask, tl.exp(tl.where(mask, x, 0.0)), 0.0)


@triton.jit
def _chunk_program(NBH, NSUB: tl.constexpr):
    """(chunk, sub-block, batch row x value head) of a program in a 1-D grid of per_row x NSUB x NBH programs, the
    batch-and-head index fastest. Programs that run at the same time then read all heads of a few neighbouring
    chunks (contiguous memory) rather than one head of many chunks, 4 KB apart per token at 16 heads of 128."""
    pid = tl.program_id(0)
    i_bh = pid % NBH
    rest = pid // NBH
    return rest // NSUB, rest % NSUB, i_bh


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
def _locate_segment(i_seg, T, NS, SEG, cu_seqlens, chunk_offsets, segments, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """(sequence, first token, length, first chunk of the sequence in state buffers, chunk range [c0, c1) inside
    the sequence) of segment `i_seg`: SEG chunks (fewer at the end) of one sequence, NS segments per sequence without
    packing, a (sequence, first chunk) list with packing."""
    if IS_VARLEN:
        i_n = tl.load(segments + i_seg * 2).to(tl.int64)
        c0 = tl.load(segments + i_seg * 2 + 1)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        seq_len = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
        first_chunk = tl.load(chunk_offsets + i_n).to(tl.int64)
    else:
        i_n = (i_seg // NS).to(tl.int64)
        c0 = (i_seg % NS) * SEG
        bos = i_n * T
        seq_len = T.to(tl.int64)
        first_chunk = i_n * tl.cdiv(T, BT)
    c1 = tl.minimum(c0 + SEG, tl.cdiv(seq_len, BT).to(tl.int32))
    return i_n, bos, seq_len, first_chunk, c0, c1


@triton.jit
def _tile_mask(o_t, seq_len, o_d, D: tl.constexpr):
    return (o_t < seq_len)[:, None] & (o_d < D)[None, :]


@triton.jit
def _tile_offsets(bos, o_t, i_head, NHEAD: tl.constexpr, D: tl.constexpr, o_d):
    """Offsets of x[bos + o_t, i_head, o_d] in a token-major x `[.., NHEAD, D]`: [len(o_t), len(o_d)]."""
    return ((bos + o_t) * NHEAD + i_head)[:, None] * D + o_d[None, :]


@triton.jit
def _load_tile(x, bos, seq_len, o_t, i_head, NHEAD: tl.constexpr, D: tl.constexpr, o_d):
    """x[bos + o_t, i_head, o_d], zero outside the sequence and D: [len(o_t), len(o_d)] in x's dtype."""
    return tl.load(x + _tile_offsets(bos, o_t, i_head, NHEAD, D, o_d), mask=_tile_mask(o_t, seq_len, o_d, D), other=0.0)


@triton.jit
def _store_tile(x, value, bos, seq_len, o_t, i_head, NHEAD: tl.constexpr, D: tl.constexpr, o_d):
    tl.store(
        x + _tile_offsets(bos, o_t, i_head, NHEAD, D, o_d),
        value.to(x.dtype.element_ty),
        mask=_tile_mask(o_t, seq_len, o_d, D),
    )


@triton.jit
def _load_tokens(x, bos, seq_len, o_t, i_head, NHEAD: tl.constexpr):
    """x[bos + o_t, i_head] of a per-token, per-head x `[.., NHEAD]` (beta, per-head decays): [len(o_t)], fp32."""
    return tl.load(x + (bos + o_t) * NHEAD + i_head, mask=o_t < seq_len, other=0.0).to(tl.float32)


@triton.jit
def _state_offsets(i_state, i_hv, HV: tl.constexpr, K: tl.constexpr, D: tl.constexpr, o_k, o_d):
    """Offsets of block (o_k, o_d) of state `i_state` of value head `i_hv` in a `[.., HV, K, D]` buffer."""
    return (i_state * HV + i_hv).to(tl.int64) * K * D + o_k[:, None] * D + o_d[None, :]


@triton.jit
def _load_state(x, i_state, i_hv, HV: tl.constexpr, K: tl.constexpr, D: tl.constexpr, o_k, o_d):
    m = (o_k < K)[:, None] & (o_d < D)[None, :]
    return tl.load(x + _state_offsets(i_state, i_hv, HV, K, D, o_k, o_d), mask=m, other=0.0)


@triton.jit
def _store_state(x, value, i_state, i_hv, HV: tl.constexpr, K: tl.constexpr, D: tl.constexpr, o_k, o_d):
    m = (o_k < K)[:, None] & (o_d < D)[None, :]
    tl.store(x + _state_offsets(i_state, i_hv, HV, K, D, o_k, o_d), value.to(x.dtype.element_ty), mask=m)


@triton.jit
def _load_gate_rows(
    b,
    bos,
    seq_len,
    o_t,
    i_hv,
    HV: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    o_k,
    GATE: tl.constexpr,
):
    """Cumulative log decays of rows o_t: [BT, 1] (per head) or [BT, len(o_k)] (channels o_k); zeros without a
    gate."""
    if GATE == 2:
        return _load_tile(b, bos, seq_len, o_t, i_hv, HV, K, o_k)
    elif GATE == 1:
        return _load_tokens(b, bos, seq_len, o_t, i_hv, HV)[:, None]
    else:
        return tl.zeros([BT, 1], dtype=tl.float32)


@triton.jit
def _load_gate_last(
    b,
    bos,
    seq_len,
    i_c,
    i_hv,
    HV: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    o_k,
    GATE: tl.constexpr,
):
    """Cumulative log decay at the chunk's last token: [1, 1] or [1, len(o_k)] (channels o_k)."""
    last = tl.minimum(i_c * BT + BT, seq_len) - 1
    if GATE == 2:
        return tl.load(b + ((bos + last) * HV + i_hv) * K + o_k, mask=o_k < K, other=0.0)[None, :]
    elif GATE == 1:
        return tl.full([1, 1], 0.0, tl.float32) + tl.load(b + (bos + last) * HV + i_hv)
    else:
        return tl.zeros([1, 1], dtype=tl.float32)


@triton.jit
def _qk_scores(
    b_q, b_k, b_g, aqk, bos, seq_len, o_t, i_hv, scale, HV: tl.constexpr, BT: tl.constexpr, GATE: tl.constexpr
):
    """P[t, s] = scale sum_k q_t k_s exp(b_t - b_s) for s <= t, zero elsewhere: [BT, BT], fp32 (per-channel
    decays: precomputed in aqk)."""
    m_t = o_t < seq_len
    o_i = tl.arange(0, BT)
    m_a = (o_i[:, None] >= o_i[None, :]) & m_t[:, None] & m_t[None, :]
    if GATE == 2:
        b_a = tl.load(aqk + _tile_offsets(bos, o_t, i_hv, HV, BT, o_i), mask=m_a, other=0.0)
    else:
        b_a = tl.dot(b_q, tl.trans(b_k)) * scale
        if GATE == 1:
            b_gt = tl.sum(b_g, axis=1)
            b_a = b_a * tl.exp(tl.where(m_a, b_gt[:, None] - b_gt[None, :], 0.0))
        b_a = tl.where(m_a, b_a, 0.0)
    return b_a


@triton.jit
def _dot_scores(a, b, acc):
    """acc + a @ b for the scores P (either side) times fp32 pseudo-values: a tf32 MMA for fp32 scores, one bf16 MMA
    for scores stored in bf16 (forwards without a backward, see `chunk_linear_attention`'s `aqk`)."""
    if a.dtype == tl.bfloat16:
        acc = tl.dot(a, b.to(tl.bfloat16), acc)
    elif b.dtype == tl.bfloat16:
        acc = tl.dot(a.to(tl.bfloat16), b, acc)
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _dot_split(a, b, acc, SPLIT: tl.constexpr = True):
    """acc + a @ b for an a exact in its dtype and an fp32 b. bf16 a: b is split into two bf16 halves, which keeps
    about 16 bits of b (a tf32 dot keeps 11) for two bf16 MMAs; used where the result accumulates or cancels.
    SPLIT False: one bf16 MMA with b rounded to bf16 (8 bits)."""
    if a.dtype == tl.bfloat16 and not SPLIT:
        return tl.dot(a, b.to(tl.bfloat16), acc)
    elif a.dtype == tl.bfloat16:
        b_hi = b.to(tl.bfloat16)
        acc = tl.dot(a, b_hi, acc)
        return tl.dot(a, (b - b_hi.to(tl.float32)).to(tl.bfloat16), acc)
    else:
        return tl.dot(a.to(tl.float32), b, acc)


@triton.jit
def _dot_split_a(a, b, acc, SPLIT: tl.constexpr = True):
    """acc + a @ b for an fp32 a and a b exact in its dtype: `_dot_split` with the halves on the left, so that the
    fp32 operand, which lives in registers, is the one an MMA can read from registers (Hopper's wgmma reads its
    right operand from shared memory only)."""
    if b.dtype == tl.bfloat16 and not SPLIT:
        return tl.dot(a.to(tl.bfloat16), b, acc)
    elif b.dtype == tl.bfloat16:
        a_hi = a.to(tl.bfloat16)
        acc = tl.dot(a_hi, b, acc)
        return tl.dot((a - a_hi.to(tl.float32)).to(tl.bfloat16), b, acc)
    else:
        return tl.dot(a, b.to(tl.float32), acc)


@triton.jit
def _decay_state(
    b_h,
    b_k,
    b_g,
    b_gl,
    b_x,
    m_t,
    GATE: tl.constexpr,
    TRANSPOSED: tl.constexpr = False,
    PREGATED: tl.constexpr = False,
    SPLIT: tl.constexpr = True,
):
    """exp(b_last) S + (k exp(b_last - b))^T x for a state block S [BK, BV] and chunk values x [BT, BV] (fp32). A
    per-head decay scales the rows of x, so that k enters the MMA exactly. TRANSPOSED: S^T [BV, BK] and x^T [BV, BT]
    in, S^T out, with x^T on the left of the product (`_dot_split_a`). PREGATED (per-channel decays): b_k already
    holds k exp(b_last - b), rounded to k's dtype, and b_g is not read. SPLIT: see `_dot_split`."""
    if GATE == 2:
        if PREGATED:
            b_kd = b_k
        else:
            b_kd = (b_k.to(tl.float32) * _masked_exp(b_gl - b_g, m_t[:, None])).to(b_k.dtype)
        if TRANSPOSED:
            b_h = _dot_split_a(b_x, b_kd, b_h * tl.exp(b_gl), SPLIT)
        else:
            b_h = _dot_split(tl.trans(b_kd), b_x, b_h * tl.trans(tl.exp(b_gl)), SPLIT)
    else:
        if TRANSPOSED:
            b_h = _dot_split_a(b_x * tl.trans(_masked_exp(b_gl - b_g, m_t[:, None])), b_k, b_h * tl.exp(b_gl), SPLIT)
        else:
            b_h = _dot_split(tl.trans(b_k), b_x * _masked_exp(b_gl - b_g, m_t[:, None]), b_h * tl.exp(b_gl), SPLIT)
    return b_h


@triton.jit
def _dot_ai(a, b, dtype: tl.constexpr, SPLIT: tl.constexpr):
    """a @ b for the fp32 factors of Ai times the residual: one bf16 MMA without SPLIT for bf16 inputs (`dtype`, the
    keys' dtype), a tf32 one otherwise."""
    if dtype == tl.bfloat16 and not SPLIT:
        c = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def _pseudo_values(
    ai,
    beta,
    b_k,
    b_g,
    b_h,
    b_y,
    bos,
    seq_len,
    o_t,
    i_hv,
    HV: tl.constexpr,
    BT: tl.constexpr,
    GATE: tl.constexpr,
    TRANSPOSED: tl.constexpr = False,
    PREGATED: tl.constexpr = False,
    SPLIT: tl.constexpr = True,
):
    """vn = u - w S = Ai (beta (y - (k exp(b)) S)) for chunk rows o_t, from Ai instead of w and u: [BT, BV], fp32.
    k enters the MMA exactly (per-head decays scale its rows after it; per-channel ones round k exp(b) to k's
    dtype) against two bf16 halves of S, and Ai multiplies the residual, which is small where S predicts y.
    TRANSPOSED: S^T [BV, BK] and y^T [BV, BT] in, vn^T out, with the state-dependent operand of every product on
    the left (`_dot_split_a`). PREGATED (per-channel decays): b_k already holds k exp(b) in k's dtype. SPLIT: see
    `_dot_split`; without it (bf16 keys, with a decay) Ai and the residual also enter one bf16 MMA instead of a tf32
    one, as fla forms u and w. Without a decay (DeltaNet) that product stays tf32: the state forgets none of its
    roundings."""
    m_t = o_t < seq_len
    o_i = tl.arange(0, BT)
    if GATE == 2:
        if PREGATED:
            b_kd = b_k
        else:
            b_kd = (b_k.to(tl.float32) * _masked_exp(b_g, m_t[:, None])).to(b_k.dtype)
    if TRANSPOSED:
        if GATE == 2:
            b_x = b_y - _dot_split_a(b_h, tl.trans(b_kd), tl.zeros(b_y.shape, dtype=tl.float32), SPLIT)
        else:
            b_x = b_y - _dot_split_a(b_h, tl.trans(b_k), tl.zeros(b_y.shape, dtype=tl.float32), SPLIT) * tl.trans(
                tl.exp(b_g)
            )
        b_x = b_x * _load_tokens(beta, bos, seq_len, o_t, i_hv, HV)[None, :]
        b_vn = _dot_ai(
            b_x, tl.trans(_load_tile(ai, bos, seq_len, o_t, i_hv, HV, BT, o_i)), b_k.dtype, SPLIT or GATE == 0
        )
    else:
        if GATE == 2:
            b_x = -_dot_split(b_kd, b_h, -b_y, SPLIT)
        else:
            b_x = b_y - _dot_split(b_k, b_h, tl.zeros(b_y.shape, dtype=tl.float32), SPLIT) * tl.exp(b_g)
        b_x = b_x * _load_tokens(beta, bos, seq_len, o_t, i_hv, HV)[:, None]
        b_vn = _dot_ai(_load_tile(ai, bos, seq_len, o_t, i_hv, HV, BT, o_i), b_x, b_k.dtype, SPLIT or GATE == 0)
    return b_vn


@triton.jit
def _pass_keys(
    k,
    kl,
    kb,
    b,
    bos,
    seq_len,
    o_t,
    i_h,
    i_hv,
    H: tl.constexpr,
    HV: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    GATE: tl.constexpr,
    DELTA: tl.constexpr,
    PREGATED: tl.constexpr,
):
    """What a sequential pass reads for the keys of chunk rows o_t: (keys of the state update, keys of the
    pseudo-values, the rows of b). PREGATED: the pairwise kernel's k exp(b_last - b) and (delta rule) k exp(b), per
    value head, and zero decays, which `_decay_state` and `_pseudo_values` then do not read."""
    if PREGATED:
        b_k = _load_tile(kl, bos, seq_len, o_t, i_hv, HV, K, tl.arange(0, BK))
        b_kx = b_k
        if DELTA:
            b_kx = _load_tile(kb, bos, seq_len, o_t, i_hv, HV, K, tl.arange(0, BK))
        b_g = tl.zeros([BT, 1], dtype=tl.float32)
    else:
        b_k = _load_tile(k, bos, seq_len, o_t, i_h, H, K, tl.arange(0, BK))
        b_kx = b_k
        b_g = _load_gate_rows(b, bos, seq_len, o_t, i_hv, HV, K, BT, tl.arange(0, BK), GATE)
    return b_k, b_kx, b_g


@triton.jit
def _segment_program(
    T,
    NS,
    SEG,
    cu_seqlens,
    chunk_offsets,
    segments,
    H: tl.constexpr,
    HV: tl.constexpr,
    BT: tl.constexpr,
    BV: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """The (segment, value head) of a program of the sequential passes, whose first grid axis takes the V blocks:
    (segment, value head, key head, sequence, first token of the sequence, sequence length, the sequence's first
    chunk in the per-chunk buffers, first and end chunk of the segment inside its sequence, the block's V offsets)."""
    i_v, i_s = tl.program_id(0), tl.program_id(1)
    i_seg, i_hv = i_s // HV, i_s % HV
    i_h = i_hv // (HV // H)
    i_n, bos, seq_len, first_chunk, c0, c1 = _locate_segment(
        i_seg, T, NS, SEG, cu_seqlens, chunk_offsets, segments, BT, IS_VARLEN
    )
    return i_seg, i_hv, i_h, i_n, bos, seq_len, first_chunk, c0, c1, i_v * BV + tl.arange(0, BV)


@triton.jit(do_not_specialize=["T", "NBH"])
def chunk_cumsum_kernel(
    x,
    y,
    cu_seqlens,
    chunk_indices,
    T,
    NBH,
    HV: tl.constexpr,
    G: tl.constexpr,
    BG: tl.constexpr,
    BT: tl.constexpr,
    REVERSE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """Cumulative sum of x `[B, T, HV, G]` inside each chunk (reverse: from the chunk's end), in fp32."""
    i_t, _, i_bh = _chunk_program(NBH, 1)
    i_b, i_hv = i_bh // HV, i_bh % HV
    bos, seq_len, i_c, _ = _locate_chunk(i_t, i_b, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)
    o_t = i_c * BT + tl.arange(0, BT)
    o_g = tl.arange(0, BG)
    # [BT, BG]
    b_x = _load_tile(x, bos, seq_len, o_t, i_hv, HV, G, o_g).to(tl.float32)
    b_y = tl.cumsum(b_x, axis=0)
    if REVERSE:
        b_y = tl.sum(b_x, axis=0)[None, :] - b_y + b_x
    _store_tile(y, b_y, bos, seq_len, o_t, i_hv, HV, G, o_g)


@triton.jit
def _sub_block_program(
    T,
    NBH,
    cu_seqlens,
    chunk_indices,
    H: tl.constexpr,
    HV: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """The BC-row sub-block of a program of the pairwise kernels: (sub-block, value head, key head, first token of
    the sequence, sequence length, chunk, first row)."""
    i_t, i_i, i_bh = _chunk_program(NBH, BT // BC)
    i_b, i_hv = i_bh // HV, i_bh % HV
    bos, seq_len, i_c, _ = _locate_chunk(i_t, i_b, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)
    return i_i, i_hv, i_hv // (HV // H), bos, seq_len, i_c, i_c * BT + i_i * BC


@triton.jit
def _pairwise_rows(
    q,
    k,
    b,
    aqk,
    akk,
    bos,
    seq_len,
    i_c,
    i_i,
    i_h,
    i_hv,
    scale,
    H: tl.constexpr,
    HV: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    DELTA: tl.constexpr,
):
    """The rows of sub-block i_i (BC rows) of chunk i_c in `chunk_pairwise_fwd_kernel`'s P and KK, the zero blocks
    right of the diagonal included."""
    row0 = i_c * BT + i_i * BC
    o_i = tl.arange(0, BC)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_r = row0 + o_i
    m_r = o_r < seq_len
    m_rk = m_r[:, None] & m_k[None, :]
    # [BC, BK]
    b_q = _load_tile(q, bos, seq_len, o_r, i_h, H, K, o_k).to(tl.float32)
    b_k = _load_tile(k, bos, seq_len, o_r, i_h, H, K, o_k).to(tl.float32)
    b_b = _load_tile(b, bos, seq_len, o_r, i_hv, HV, K, o_k)
    # reference: the sub-block's first row, so that both factors below decay (exponents <= 0)
    b_ref = tl.load(b + ((bos + row0) * HV + i_hv) * K + o_k, mask=m_k, other=0.0)
    b_e = _masked_exp(b_b - b_ref[None, :], m_rk)
    b_qg = b_q * b_e
    b_kg = b_k * b_e
    p_out = _tile_offsets(bos, o_r, i_hv, HV, BT, o_i)
    for j in range(i_i):
        # earlier sub-blocks lie inside the sequence
        o_s = i_c * BT + j * BC + o_i
        b_ks = _load_tile(k, bos, seq_len, o_s, i_h, H, K, o_k).to(tl.float32)
        b_bs = _load_tile(b, bos, seq_len, o_s, i_hv, HV, K, o_k)
        b_ks = b_ks * tl.exp(b_ref[None, :] - b_bs)
        tl.store(aqk + p_out + j * BC, tl.dot(b_qg, tl.trans(b_ks)) * scale, mask=m_r[:, None])
        if DELTA:
            tl.store(akk + p_out + j * BC, tl.dot(b_kg, tl.trans(b_ks)), mask=m_r[:, None])
    # diagonal sub-block
    b_aq = tl.zeros([BC, BC], dtype=tl.float32)
    b_ak = tl.zeros([BC, BC], dtype=tl.float32)
    # the largest decay between the reference row and a row of the sub-block, over the channels
    b_span = tl.max(tl.max(tl.abs(tl.where(m_rk, b_b - b_ref[None, :], 0.0)), axis=1), axis=0)
    if b_span <= DIAGONAL_SPAN:
        # one product against the reference row: (q_t e^(b_t - b_ref)) (k_s e^(b_ref - b_s)), both factors within
        # e^(+-span) of the inputs, where fp32 (and tf32) keep their relative precision
        b_kr = b_k * _masked_exp(b_ref[None, :] - b_b, m_rk)
        m_d = m_r[:, None] & m_r[None, :]
        b_aq = tl.where((o_i[:, None] >= o_i[None, :]) & m_d, tl.dot(b_qg, tl.trans(b_kr)), 0.0)
        if DELTA:
            b_ak = tl.where((o_i[:, None] > o_i[None, :]) & m_d, tl.dot(b_kg, tl.trans(b_kr)), 0.0)
    else:
        # strong decays: one key column at a time, each pair's decay exponentiated on its own
        for s in range(BC):
            # tensors, not a scalar: newer Triton interpreters reject the mask that scalar & tensor gives
            m_sk = ((o_k * 0 + row0 + s) < seq_len) & m_k
            p_s = (bos + row0 + s) * H * K + i_h * K + o_k
            b_ks = tl.load(k + p_s, mask=m_sk, other=0.0).to(tl.float32)
            b_bs = tl.load(b + (bos + row0 + s) * HV * K + i_hv * K + o_k, mask=m_sk, other=0.0)
            m_ts = (o_i >= s) & m_r
            b_e = _masked_exp(b_b - b_bs[None, :], m_ts[:, None] & m_k[None, :])
            b_col_q = tl.sum(b_q * b_ks[None, :] * b_e, axis=1)
            b_aq = tl.where(o_i[None, :] == s, b_col_q[:, None], b_aq)
            if DELTA:
                b_col_k = tl.where(o_i > s, tl.sum(b_k * b_ks[None, :] * b_e, axis=1), 0.0)
                b_ak = tl.where(o_i[None, :] == s, b_col_k[:, None], b_ak)
    tl.store(aqk + p_out + i_i * BC, b_aq * scale, mask=m_r[:, None])
    if DELTA:
        tl.store(akk + p_out + i_i * BC, b_ak, mask=m_r[:, None])
    # the zero blocks right of the diagonal: the buffers are not cleared beforehand
    for j in range(i_i + 1, BT // BC):
        tl.store(aqk + p_out + j * BC, tl.zeros([BC, BC], dtype=tl.float32), mask=m_r[:, None])
        if DELTA:
            tl.store(akk + p_out + j * BC, tl.zeros([BC, BC], dtype=tl.float32), mask=m_r[:, None])


@triton.jit(do_not_specialize=["T", "NBH"])
def chunk_pairwise_fwd_kernel(
    q,
    k,
    b,
    aqk,
    akk,
    qg,
    kl,
    kb,
    cu_seqlens,
    chunk_indices,
    scale,
    T,
    NBH,
    H: tl.constexpr,
    HV: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    DELTA: tl.constexpr,
    PREGATED: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """Per-channel decays: P[t, s] = scale sum_k q_t k_s exp(b_t - b_s) (s <= t) and (delta rule)
    KK[t, s] = sum_k k_t k_s exp(b_t - b_s) (s < t) for BC rows of a chunk.

    BC = BT (whole chunks): when no channel decays by more than `DIAGONAL_SPAN` inside the chunk, each matrix is one
    [BT, K] x [K, BT] product against the chunk's first row, as the diagonal sub-blocks below; otherwise the chunk's
    16-row sub-blocks are formed one after another (`_pairwise_rows`). BC = 16: one sub-block per program.

    PREGATED: also the gated operands of the state passes, per value head in the input dtype, formed as those passes
    would form them: qg = scale q exp(b), kl = k exp(b_last - b) and (delta rule) kb = k exp(b). The sequential
    passes then read them instead of q, k and the fp32 b, and no exponential is left on their chain."""
    SUB: tl.constexpr = 16
    i_i, i_hv, i_h, bos, seq_len, i_c, row0 = _sub_block_program(
        T, NBH, cu_seqlens, chunk_indices, H, HV, BT, BC, IS_VARLEN
    )
    if row0 >= seq_len:
        return
    o_i = tl.arange(0, BC)
    o_k = tl.arange(0, BK)
    o_r = row0 + o_i
    m_r = o_r < seq_len
    m_rk = m_r[:, None] & (o_k < K)[None, :]
    if PREGATED or BC == BT:
        # [BC, BK]
        b_q = _load_tile(q, bos, seq_len, o_r, i_h, H, K, o_k).to(tl.float32)
        b_k = _load_tile(k, bos, seq_len, o_r, i_h, H, K, o_k).to(tl.float32)
        b_b = _load_tile(b, bos, seq_len, o_r, i_hv, HV, K, o_k)
    if PREGATED:
        b_bl = _load_gate_last(b, bos, seq_len, i_c, i_hv, HV, K, BT, o_k, 2)
        _store_tile(qg, b_q * tl.exp(b_b) * scale, bos, seq_len, o_r, i_hv, HV, K, o_k)
        _store_tile(kl, b_k * _masked_exp(b_bl - b_b, m_rk), bos, seq_len, o_r, i_hv, HV, K, o_k)
        if DELTA:
            _store_tile(kb, b_k * _masked_exp(b_b, m_rk), bos, seq_len, o_r, i_hv, HV, K, o_k)
    if BC == BT:
        b_ref = tl.load(b + ((bos + row0) * HV + i_hv) * K + o_k, mask=o_k < K, other=0.0)
        b_span = tl.max(tl.max(tl.abs(tl.where(m_rk, b_b - b_ref[None, :], 0.0)), axis=1), axis=0)
        if b_span <= DIAGONAL_SPAN:
            p_out = _tile_offsets(bos, o_r, i_hv, HV, BT, o_i)
            m_d = m_r[:, None] & m_r[None, :]
            b_e = _masked_exp(b_b - b_ref[None, :], m_rk)
            b_kr = b_k * _masked_exp(b_ref[None, :] - b_b, m_rk)
            b_aq = tl.where((o_i[:, None] >= o_i[None, :]) & m_d, tl.dot(b_q * b_e, tl.trans(b_kr)), 0.0)
            tl.store(aqk + p_out, b_aq * scale, mask=m_r[:, None])
            if DELTA:
                b_ak = tl.where((o_i[:, None] > o_i[None, :]) & m_d, tl.dot(b_k * b_e, tl.trans(b_kr)), 0.0)
                tl.store(akk + p_out, b_ak, mask=m_r[:, None])
        else:
            for i_s in range(BT // SUB):
                if i_c * BT + i_s * SUB < seq_len:
                    _pairwise_rows(
                        q, k, b, aqk, akk, bos, seq_len, i_c, i_s, i_h, i_hv, scale, H, HV, K, BT, SUB, BK, DELTA
                    )
    else:
        _pairwise_rows(q, k, b, aqk, akk, bos, seq_len, i_c, i_i, i_h, i_hv, scale, H, HV, K, BT, BC, BK, DELTA)


@triton.jit
def _invert_diagonal_blocks(a, beta, bos, seq_len, i_c, i_hv, HV: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """(I + A_II)^-1 of the BT // BC diagonal [BC, BC] blocks of A (strictly lower; A without beta in a
    `[.., HV, BT]` buffer, beta applied to its rows here), all blocks at once by forward substitution: row r of
    every block's inverse per step, from row r of every block of A read from memory. Returns the blocks transposed,
    [block, column, row], so that each step reduces along the fastest axis (inside a warp): [BT // BC, BC, BC],
    fp32."""
    NB: tl.constexpr = BT // BC
    o_i = tl.arange(0, BC)
    b_t = tl.zeros([NB, BC, BC], dtype=tl.float32) + (o_i[:, None] == o_i[None, :]).to(tl.float32)[None, :, :]
    # unrolled: the row loads do not depend on the substitution, so they leave its chain (on an H100 the WY kernel
    # took 0.595 -> 0.546 ms at B = 32, T = 2k; a pipelined loop, tl.range(num_stages=2), 0.582 ms)
    for r in tl.static_range(1, BC):
        b_t = _substitution_step(b_t, r, a, beta, bos, seq_len, i_c, i_hv, HV, BT, BC)
    return b_t


@triton.jit
def _substitution_step(b_t, r, a, beta, bos, seq_len, i_c, i_hv, HV: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """Row r of every diagonal block's inverse (`_invert_diagonal_blocks`): [NB, column, row] b_t with row r set."""
    NB: tl.constexpr = BT // BC
    o_b = tl.arange(0, NB)
    o_i = tl.arange(0, BC)
    # [NB]: token of row r of each block
    o_row = i_c * BT + o_b * BC + r
    m_row = o_row < seq_len
    b_beta = _load_tokens(beta, bos, seq_len, o_row, i_hv, HV)
    p_a = ((bos + o_row) * HV + i_hv)[:, None] * BT + (o_b * BC)[:, None] + o_i[None, :]
    # [NB, BC]: A[row r, columns m < r] of each block (columns before a valid row are valid)
    b_a = tl.load(a + p_a, mask=m_row[:, None] & (o_i < r)[None, :], other=0.0) * b_beta[:, None]
    # T[r, :] = e_r - sum_{m < r} A[r, m] T[m, :], the rows m < r being final
    b_row = (o_i == r).to(tl.float32)[None, :] - tl.sum(b_a[:, None, :] * b_t, axis=2)
    return tl.where((o_i == r)[None, None, :], b_row[:, :, None], b_t)


@triton.jit
def _dot_ieee(a, b):
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _a_block(
    a,
    beta,
    bos,
    seq_len,
    i_hv,
    i_c,
    BI: tl.constexpr,
    BJ: tl.constexpr,
    HV: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BETA: tl.constexpr,
):
    """Block (BI, BJ) of a `[.., HV, BT]` per-chunk matrix: [BC, BC], fp32, zero outside the sequence; BETA: A
    (stored without beta), its rows scaled by beta."""
    o_i = tl.arange(0, BC)
    o_r = i_c * BT + BI * BC + o_i
    o_s = i_c * BT + BJ * BC + o_i
    m_a = (o_r < seq_len)[:, None] & (o_s < seq_len)[None, :]
    b_a = tl.load(a + _tile_offsets(bos, o_r, i_hv, HV, BT, BJ * BC + o_i), mask=m_a, other=0.0)
    if BETA:
        b_a = b_a * _load_tokens(beta, bos, seq_len, o_r, i_hv, HV)[:, None]
    return b_a


@triton.jit
def _wy_keys(
    k,
    b,
    bos,
    seq_len,
    row0,
    i_h,
    i_hv,
    b_beta,
    H: tl.constexpr,
    HV: tl.constexpr,
    K: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    GATE: tl.constexpr,
):
    """beta k exp(b) for rows row0 .. row0 + BC: [BC, BK], fp32."""
    o_r = row0 + tl.arange(0, BC)
    b_y = _load_tile(k, bos, seq_len, o_r, i_h, H, K, tl.arange(0, BK)).to(tl.float32)
    if GATE == 1:
        b_y *= tl.exp(_load_tokens(b, bos, seq_len, o_r, i_hv, HV))[:, None]
    if GATE == 2:
        b_y *= tl.exp(_load_tile(b, bos, seq_len, o_r, i_hv, HV, K, tl.arange(0, BK)))
    return b_y * b_beta[:, None]


@triton.jit(do_not_specialize=["T", "NBH"])
def chunk_wy_fwd_kernel(
    k,
    b,
    beta,
    akk,
    ai,
    expand,
    cu_seqlens,
    chunk_indices,
    T,
    NBH,
    H: tl.constexpr,
    HV: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    GATE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    CHECK_CONTRACTION: tl.constexpr = False,
):
    """Delta rule, per chunk: Ai = (I + A)^-1 in fp32, for the state passes (which form vn from it) and the backward.

    A without beta comes from akk, where the pairwise kernel wrote it (per-channel decays), or from one
    [BT, K] x [K, BT] product written to ai first (per-head or no decay), which Ai then overwrites block by block.
    The four 16 x 16 diagonal blocks of Ai are forward-substituted at once, the six below them follow from block
    products (fp32, IEEE).

    CHECK_CONTRACTION (per-head decays): sets `expand[sequence, value head]` to 1 where a token's transition
    S -> exp(g) (I - beta k k^T) S may fail to contract the state by its decay: g > 0, or beta |k|^2 outside [0, 2]
    (or NaN). The segment maps skip decayed-out chunks only where no token does (`chunk_segment_fwd_kernel`).
    """
    BC: tl.constexpr = 16
    i_t, _, i_bh = _chunk_program(NBH, 1)
    i_b, i_hv = i_bh // HV, i_bh % HV
    i_h = i_hv // (HV // H)
    bos, seq_len, i_c, _ = _locate_chunk(i_t, i_b, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)
    o_t = i_c * BT + tl.arange(0, BT)
    o_s = tl.arange(0, BT)
    if GATE == 2:
        a_src = akk
    else:
        m_t = o_t < seq_len
        b_kt = _load_tile(k, bos, seq_len, o_t, i_h, H, K, tl.arange(0, BK))
        b_a = tl.dot(b_kt, tl.trans(b_kt))
        m_a = (o_s[:, None] > o_s[None, :]) & m_t[:, None] & m_t[None, :]
        if GATE == 1:
            b_bt = _load_tokens(b, bos, seq_len, o_t, i_hv, HV)
            b_a = b_a * tl.exp(tl.where(m_a, b_bt[:, None] - b_bt[None, :], 0.0))
            if CHECK_CONTRACTION:
                # beta |k|^2 from the diagonal of k k^T (its decay factor is 1); the cumulative decay of the row
                # before (0 before the chunk's first), which the row's may not exceed: g <= 0 as the kernels see it.
                # Every comparison is False for NaN, which therefore counts as expanding
                b_kk = tl.sum(tl.where(o_s[:, None] == o_s[None, :], b_a, 0.0), 1)
                b_kk = b_kk * _load_tokens(beta, bos, seq_len, o_t, i_hv, HV).to(tl.float32)
                b_prev = tl.load(b + (bos + o_t - 1) * HV + i_hv, mask=m_t & (o_s > 0), other=0.0)
                m_ok = ((b_kk >= 0.0) & (b_kk <= 2.0) & (b_bt <= b_prev)) | ~m_t
                if tl.sum((~m_ok).to(tl.int32), 0) > 0:
                    if IS_VARLEN:
                        i_n = tl.load(chunk_indices + i_t * 2)
                    else:
                        i_n = i_b
                    tl.atomic_max(expand + i_n * HV + i_hv, 1)
        # zeros on and above the diagonal: those of Ai's upper blocks are final
        _store_tile(ai, tl.where(m_a, b_a, 0.0), bos, seq_len, o_t, i_hv, HV, BT, o_s)
        tl.debug_barrier()
        a_src = ai
    a10 = _a_block(a_src, beta, bos, seq_len, i_hv, i_c, 1, 0, HV, BT, BC, True)
    a20 = _a_block(a_src, beta, bos, seq_len, i_hv, i_c, 2, 0, HV, BT, BC, True)
    a21 = _a_block(a_src, beta, bos, seq_len, i_hv, i_c, 2, 1, HV, BT, BC, True)
    a30 = _a_block(a_src, beta, bos, seq_len, i_hv, i_c, 3, 0, HV, BT, BC, True)
    a31 = _a_block(a_src, beta, bos, seq_len, i_hv, i_c, 3, 1, HV, BT, BC, True)
    a32 = _a_block(a_src, beta, bos, seq_len, i_hv, i_c, 3, 2, HV, BT, BC, True)
    b_d = _invert_diagonal_blocks(a_src, beta, bos, seq_len, i_c, i_hv, HV, BT, BC)
    # the diagonal blocks go to ai and come back one by one (after every thread has read its rows of A)
    o_b = tl.arange(0, BT // BC)
    o_i = tl.arange(0, BC)
    # [block, column, row]
    o_rows = i_c * BT + o_b[:, None, None] * BC + o_i[None, None, :]
    p_d = ((bos + o_rows) * HV + i_hv) * BT + o_b[:, None, None] * BC + o_i[None, :, None]
    tl.debug_barrier()
    tl.store(ai + p_d, b_d, mask=o_rows < seq_len)
    tl.debug_barrier()
    t00 = _a_block(ai, beta, bos, seq_len, i_hv, i_c, 0, 0, HV, BT, BC, False)
    t11 = _a_block(ai, beta, bos, seq_len, i_hv, i_c, 1, 1, HV, BT, BC, False)
    t22 = _a_block(ai, beta, bos, seq_len, i_hv, i_c, 2, 2, HV, BT, BC, False)
    t33 = _a_block(ai, beta, bos, seq_len, i_hv, i_c, 3, 3, HV, BT, BC, False)
    # T_ij = -T_ii sum_{j <= m < i} A_im T_mj
    t10 = -_dot_ieee(t11, _dot_ieee(a10, t00))
    t21 = -_dot_ieee(t22, _dot_ieee(a21, t11))
    t32 = -_dot_ieee(t33, _dot_ieee(a32, t22))
    t20 = -_dot_ieee(t22, _dot_ieee(a20, t00) + _dot_ieee(a21, t10))
    t31 = -_dot_ieee(t33, _dot_ieee(a31, t11) + _dot_ieee(a32, t21))
    t30 = -_dot_ieee(t33, _dot_ieee(a30, t00) + _dot_ieee(a31, t10) + _dot_ieee(a32, t20))

    o_0 = i_c * BT + o_i
    o_1 = o_0 + BC
    o_2 = o_0 + 2 * BC
    o_3 = o_0 + 3 * BC
    _store_tile(ai, t10, bos, seq_len, o_1, i_hv, HV, BT, o_i)
    _store_tile(ai, t20, bos, seq_len, o_2, i_hv, HV, BT, o_i)
    _store_tile(ai, t21, bos, seq_len, o_2, i_hv, HV, BT, BC + o_i)
    _store_tile(ai, t30, bos, seq_len, o_3, i_hv, HV, BT, o_i)
    _store_tile(ai, t31, bos, seq_len, o_3, i_hv, HV, BT, BC + o_i)
    _store_tile(ai, t32, bos, seq_len, o_3, i_hv, HV, BT, 2 * BC + o_i)
    if GATE == 2:
        # the zero blocks above the diagonal: the buffer is not cleared beforehand
        zero = tl.zeros([BC, BC], dtype=tl.float32)
        _store_tile(ai, zero, bos, seq_len, o_0, i_hv, HV, BT, BC + o_i)
        _store_tile(ai, zero, bos, seq_len, o_0, i_hv, HV, BT, 2 * BC + o_i)
        _store_tile(ai, zero, bos, seq_len, o_0, i_hv, HV, BT, 3 * BC + o_i)
        _store_tile(ai, zero, bos, seq_len, o_1, i_hv, HV, BT, 2 * BC + o_i)
        _store_tile(ai, zero, bos, seq_len, o_1, i_hv, HV, BT, 3 * BC + o_i)
        _store_tile(ai, zero, bos, seq_len, o_2, i_hv, HV, BT, 3 * BC + o_i)


@triton.jit(do_not_specialize=["T", "NBH"])
def chunk_wu_fwd_kernel(
    k,
    v,
    b,
    beta,
    ai,
    w,
    u,
    cu_seqlens,
    chunk_indices,
    T,
    NBH,
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
    """Delta rule, per chunk: w = Ai (beta k exp(b)) (for the backward) and, unless u is None, u = Ai (beta v), each
    one [BT, BT] x [BT, K or BV] product (fp32 operands: tf32 on GPUs)."""
    i_t, _, i_bh = _chunk_program(NBH, 1)
    i_b, i_hv = i_bh // HV, i_bh % HV
    i_h = i_hv // (HV // H)
    bos, seq_len, i_c, _ = _locate_chunk(i_t, i_b, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)
    o_t = i_c * BT + tl.arange(0, BT)
    b_ai = _load_tile(ai, bos, seq_len, o_t, i_hv, HV, BT, tl.arange(0, BT))
    b_beta = _load_tokens(beta, bos, seq_len, o_t, i_hv, HV)
    o_k = tl.arange(0, BK)
    b_y = _wy_keys(k, b, bos, seq_len, i_c * BT, i_h, i_hv, b_beta, H, HV, K, BT, BK, GATE)
    _store_tile(w, tl.dot(b_ai, b_y), bos, seq_len, o_t, i_hv, HV, K, o_k)
    if u is not None:
        for i_v in range(tl.cdiv(V, BV)):
            o_v = i_v * BV + tl.arange(0, BV)
            b_x = _load_tile(v, bos, seq_len, o_t, i_hv, HV, V, o_v).to(tl.float32) * b_beta[:, None]
            _store_tile(u, tl.dot(b_ai, b_x), bos, seq_len, o_t, i_hv, HV, V, o_v)


@triton.jit
def _decay_horizon(
    b, bos, seq_len, i_hv, c0, c1, HORIZON: tl.constexpr, HV: tl.constexpr, BT: tl.constexpr, FROM_END: tl.constexpr
):
    """(bound, total log decay) of segment [c0, c1) under per-head decays, summing one value per chunk (the
    cumulative decay at its last token), 64 chunks per step. FROM_END (writes reaching the segment's end): the bound
    is the last c with sum_{i >= c} log decay of chunk i <= -HORIZON (c0 if none), so that with contracting
    transitions every earlier chunk's writes reach the end scaled by at most exp(-HORIZON). Otherwise (gradients
    reaching the segment's start): the first c with sum_{c0 <= i < c} <= -HORIZON (c1 if none), from which on every
    chunk's share is scaled that far."""
    NC: tl.constexpr = 64
    if FROM_END:
        bound = c0
    else:
        bound = c1
    total = tl.zeros([], dtype=tl.float32)
    for j in range(0, tl.cdiv(c1 - c0, NC)):
        if FROM_END:
            o_c = c1 - (j + 1) * NC + tl.arange(0, NC)
            m_c = o_c >= c0
        else:
            o_c = c0 + j * NC + tl.arange(0, NC)
            m_c = o_c < c1
        last = tl.minimum(o_c * BT + BT, seq_len) - 1
        b_gl = tl.load(b + (bos + last) * HV + i_hv, mask=m_c, other=0.0)
        # [NC]: the log decay from the start of chunk o_c to the segment's end (FROM_END), or from the segment's
        # start to the end of chunk o_c
        m_far = m_c & (total + tl.cumsum(b_gl, 0, reverse=FROM_END) <= -HORIZON)
        if FROM_END:
            bound = tl.maximum(bound, tl.max(tl.where(m_far, o_c, c0), 0))
        else:
            bound = tl.minimum(bound, tl.min(tl.where(m_far, o_c + 1, c1), 0))
        total += tl.sum(b_gl, 0)
    return bound, total


@triton.jit(do_not_specialize=["T", "NS", "SEG"])
def chunk_segment_fwd_kernel(
    k,
    w,
    y,
    b,
    ai,
    beta,
    kl,
    kb,
    mt,
    ct,
    expand,
    cu_seqlens,
    chunk_offsets,
    segments,
    T,
    NS,
    SEG,
    H: tl.constexpr,
    HV: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GATE: tl.constexpr,
    DELTA: tl.constexpr,
    FROM_AI: tl.constexpr,
    PREGATED: tl.constexpr,
    SKIP_ENDS: tl.constexpr,
    FIRST_M: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    SPLIT: tl.constexpr = True,
    HORIZON: tl.constexpr = 0.0,
):
    """The map S -> M S + C of the state across one segment, in fp32: program column blocks below cdiv(K, BV) run
    the state recurrence on the identity without writes (M `[K, K]`, into mt; for additive writes M is the diagonal
    of the segment's total decays, formed directly), the others on a zero state with the writes y (u, or v for
    additive writes and FROM_AI, where the delta rule's writes come from Ai and beta; C `[K, V]`, into ct).
    PREGATED (per-channel decays): the gated keys kl and kb of `chunk_pairwise_fwd_kernel` replace k and b.
    SKIP_ENDS (forward): the map of a sequence's last segment is not formed (the state pass of that segment writes the
    final state), nor, unless FIRST_M (an initial state), the M of its first segment (it would multiply a zero
    state); `chunk_combine_kernel` skips them too.
    HORIZON > 0 (per-head decays, delta rule): where every transition of the sequence contracts the state by its
    decay (`expand` is 0, see `chunk_wy_fwd_kernel`), chunks whose writes reach the segment's end scaled by at most
    exp(-HORIZON) are skipped in C, and M is zero when the whole segment decays that far (`_decay_horizon`)."""
    NKB: tl.constexpr = (K + BV - 1) // BV
    # columns of M (o_c < K) or of C (o_c - NKB * BV < V)
    i_seg, i_hv, i_h, i_n, bos, seq_len, _, c0, c1, o_c = _segment_program(
        T, NS, SEG, cu_seqlens, chunk_offsets, segments, H, HV, BT, BV, IS_VARLEN
    )
    i_col = tl.program_id(0)
    if SKIP_ENDS:
        if c1 == tl.cdiv(seq_len, BT):
            return
        if not FIRST_M and i_col < NKB and c0 == 0:
            return
    o_k = tl.arange(0, BK)
    o_y = o_c - NKB * BV
    m_y = (o_y >= 0) & (o_y < V)
    if i_col < NKB:
        b_x = ((o_k[:, None] == o_c[None, :]) & (o_c < K)[None, :]).to(tl.float32)
        if not DELTA:
            # additive writes leave M diagonal: the segment's total decay per key channel, with no product
            b_l = tl.zeros([1, BK], dtype=tl.float32)
            for i_c in range(c0, c1):
                b_l += _load_gate_last(b, bos, seq_len, i_c, i_hv, HV, K, BT, o_k, GATE)
            b_x = b_x * tl.trans(tl.exp(b_l))
            c1 = c0
    else:
        b_x = tl.zeros([BK, BV], dtype=tl.float32)
    if HORIZON > 0:  # noqa: SIM102 (compile-time test outside, run-time test inside)
        if tl.load(expand + i_n * HV + i_hv) == 0:
            start, total = _decay_horizon(b, bos, seq_len, i_hv, c0, c1, HORIZON, HV, BT, True)
            if i_col < NKB:
                if total <= -HORIZON:
                    b_x = tl.zeros([BK, BV], dtype=tl.float32)
                    c1 = c0
            else:
                c0 = start
    for i_c in range(c0, c1):
        o_t = i_c * BT + tl.arange(0, BT)
        m_t = o_t < seq_len
        b_y = tl.load(y + _tile_offsets(bos, o_t, i_hv, HV, V, o_y), mask=m_t[:, None] & m_y[None, :], other=0.0).to(
            tl.float32
        )
        b_k, b_kx, b_g = _pass_keys(k, kl, kb, b, bos, seq_len, o_t, i_h, i_hv, H, HV, K, BT, BK, GATE, DELTA, PREGATED)
        if DELTA:
            if FROM_AI:
                b_y = _pseudo_values(
                    ai, beta, b_kx, b_g, b_x, b_y, bos, seq_len, o_t, i_hv, HV, BT, GATE, PREGATED=PREGATED, SPLIT=SPLIT
                )
            else:
                b_y = -_dot_split(_load_tile(w, bos, seq_len, o_t, i_hv, HV, K, o_k), b_x, -b_y, SPLIT)
        b_gl = _load_gate_last(b, bos, seq_len, i_c, i_hv, HV, K, BT, o_k, GATE)
        b_x = _decay_state(b_x, b_k, b_g, b_gl, b_y, m_t, GATE, PREGATED=PREGATED, SPLIT=SPLIT)
    if i_col < NKB:
        _store_state(mt, b_x, i_seg, i_hv, HV, K, K, o_k, o_c)
    else:
        _store_state(ct, b_x, i_seg, i_hv, HV, K, V, o_k, o_y)


@triton.jit(do_not_specialize=["NS"])
def chunk_combine_kernel(
    mt,
    ct,
    s0,
    hs,
    st,
    seg_offsets,
    NS,
    HV: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    REVERSE: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
    STORE_FINAL_STATE: tl.constexpr,
    SKIP_ENDS: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """Sequential over the segments of one sequence. Forward: hs[s] = the state entering segment s, then
    S <- M_s S + C_s, from s0 (the initial state) to st (the final state). REVERSE (gradients, last segment first):
    hs[s] = the gradient of the state leaving segment s, then dS <- M_s^T dS + C_s, from s0 (the gradient of the
    final state) to st (that of the initial state). SKIP_ENDS (forward): the last segment's map is not applied and
    st is written only for sequences without segments (the state pass writes the others), and without an initial
    state the first segment's M is not read (see `chunk_segment_fwd_kernel`)."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_hv = i_nh // HV, i_nh % HV
    if IS_VARLEN:
        first = tl.load(seg_offsets + i_n).to(tl.int32)
        count = tl.load(seg_offsets + i_n + 1).to(tl.int32) - first
    else:
        first = i_n * NS
        count = NS
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_j = tl.arange(0, BK)
    b_s = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_s += _load_state(s0, i_n, i_hv, HV, K, V, o_k, o_v)
    for j in range(count):
        i_seg = first + j
        if REVERSE:
            i_seg = first + count - 1 - j
        _store_state(hs, b_s, i_seg, i_hv, HV, K, V, o_k, o_v)
        if SKIP_ENDS and not USE_INITIAL_STATE and j == 0:
            b_s = _load_state(ct, i_seg, i_hv, HV, K, V, o_k, o_v)
        elif not SKIP_ENDS or j < count - 1:
            if REVERSE:
                # [BK, BK]: M^T
                b_m = tl.trans(_load_state(mt, i_seg, i_hv, HV, K, K, o_j, o_k))
            else:
                b_m = _load_state(mt, i_seg, i_hv, HV, K, K, o_k, o_j)
            # the joined states feed every chunk of the next segments: near-fp32 products (three tf32 passes)
            b_s = tl.dot(b_m, b_s, input_precision="tf32x3") + _load_state(ct, i_seg, i_hv, HV, K, V, o_k, o_v)
    if STORE_FINAL_STATE:
        if not SKIP_ENDS or count == 0:
            _store_state(st, b_s, i_n, i_hv, HV, K, V, o_k, o_v)


@triton.jit(do_not_specialize=["T", "NS", "SEG"])
def chunk_state_fwd_kernel(
    q,
    k,
    v,
    w,
    u,
    b,
    ai,
    beta,
    aqk,
    qg,
    kl,
    kb,
    o,
    h,
    vn,
    h0,
    ht,
    cu_seqlens,
    chunk_offsets,
    segments,
    scale,
    T,
    NS,
    SEG,
    H: tl.constexpr,
    HV: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GATE: tl.constexpr,
    DELTA: tl.constexpr,
    FROM_AI: tl.constexpr,
    PREGATED: tl.constexpr,
    INIT: tl.constexpr,
    STORE_FINAL_STATE: tl.constexpr,
    STORE_STATES: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    SPLIT: tl.constexpr = True,
):
    """The forward sequential pass over the chunks of one segment, a [BK, BV] block of the state in registers
    (fp32). Per chunk: the output o = scale (q exp(b)) S + P vn, and (STORE_STATES, for the backward) the entering
    state h and the pseudo-values vn = u - w S (FROM_AI: vn = Ai (beta (v - (k exp(b)) S)), which needs neither w
    nor u in memory). INIT: the entering state is zero (0), h0[sequence] (1) or
    h0[segment] (2); STORE_FINAL_STATE: the state leaving the last segment of a sequence goes to ht[sequence]."""
    i_seg, i_hv, i_h, i_n, bos, seq_len, first_chunk, c0, c1, o_v = _segment_program(
        T, NS, SEG, cu_seqlens, chunk_offsets, segments, H, HV, BT, BV, IS_VARLEN
    )
    o_k = tl.arange(0, BK)
    # [BK, BV]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if INIT == 1:
        b_h += _load_state(h0, i_n, i_hv, HV, K, V, o_k, o_v)
    if INIT == 2:
        b_h += _load_state(h0, i_seg, i_hv, HV, K, V, o_k, o_v)
    for i_c in range(c0, c1):
        o_t = i_c * BT + tl.arange(0, BT)
        m_t = o_t < seq_len
        if STORE_STATES:
            _store_state(h, b_h, first_chunk + i_c, i_hv, HV, K, V, o_k, o_v)
        # [BT, BK]
        if PREGATED:
            b_q = _load_tile(qg, bos, seq_len, o_t, i_hv, HV, K, o_k)
        else:
            b_q = _load_tile(q, bos, seq_len, o_t, i_h, H, K, o_k)
        b_k, b_kx, b_g = _pass_keys(k, kl, kb, b, bos, seq_len, o_t, i_h, i_hv, H, HV, K, BT, BK, GATE, DELTA, PREGATED)
        b_gl = _load_gate_last(b, bos, seq_len, i_c, i_hv, HV, K, BT, o_k, GATE)
        # [BT, BV]
        if DELTA:
            if FROM_AI:
                b_v = _load_tile(v, bos, seq_len, o_t, i_hv, HV, V, o_v).to(tl.float32)
                b_vn = _pseudo_values(
                    ai, beta, b_kx, b_g, b_h, b_v, bos, seq_len, o_t, i_hv, HV, BT, GATE, PREGATED=PREGATED, SPLIT=SPLIT
                )
            else:
                b_u = _load_tile(u, bos, seq_len, o_t, i_hv, HV, V, o_v).to(tl.float32)
                b_vn = -_dot_split(_load_tile(w, bos, seq_len, o_t, i_hv, HV, K, o_k), b_h, -b_u, SPLIT)
            if STORE_STATES:
                _store_tile(vn, b_vn, bos, seq_len, o_t, i_hv, HV, V, o_v)
        else:
            b_vn = _load_tile(v, bos, seq_len, o_t, i_hv, HV, V, o_v).to(tl.float32)
        # the output does not feed the recurrence: it overlaps with the state update
        dtype = b_q.dtype
        b_p = _qk_scores(b_q, b_k, b_g, aqk, bos, seq_len, o_t, i_hv, scale, HV, BT, GATE)
        if PREGATED:
            b_o = tl.dot(b_q, b_h.to(dtype))
        elif GATE == 2:
            b_o = tl.dot((b_q.to(tl.float32) * tl.exp(b_g) * scale).to(dtype), b_h.to(dtype))
        else:
            b_o = tl.dot(b_q, b_h.to(dtype)) * (tl.exp(b_g) * scale)
        # fp32 scores: in fp32 (tf32), since bf16 P and vn add 1e-3 to the output's error; bf16 scores (per-channel
        # decays, no backward): one bf16 MMA, as fla forms it
        b_o = _dot_scores(b_p, b_vn, b_o)
        _store_tile(o, b_o, bos, seq_len, o_t, i_hv, HV, V, o_v)
        b_h = _decay_state(b_h, b_k, b_g, b_gl, b_vn, m_t, GATE, PREGATED=PREGATED, SPLIT=SPLIT)
    if STORE_FINAL_STATE and c1 == tl.cdiv(seq_len, BT):
        _store_state(ht, b_h, i_n, i_hv, HV, K, V, o_k, o_v)


@triton.jit
def _tile_offsets_t(bos, o_t, i_head, NHEAD: tl.constexpr, D: tl.constexpr, o_d):
    """Offsets of x[bos + o_t, i_head, o_d] as a transposed tile: [len(o_d), len(o_t)]."""
    return ((bos + o_t) * NHEAD + i_head)[None, :] * D + o_d[:, None]


@triton.jit(do_not_specialize=["T", "NS", "SEG"])
def chunk_state_fwd_t_kernel(
    q,
    k,
    v,
    w,
    u,
    b,
    ai,
    beta,
    aqk,
    qg,
    kl,
    kb,
    o,
    h,
    vn,
    h0,
    ht,
    cu_seqlens,
    chunk_offsets,
    segments,
    scale,
    T,
    NS,
    SEG,
    H: tl.constexpr,
    HV: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GATE: tl.constexpr,
    DELTA: tl.constexpr,
    FROM_AI: tl.constexpr,
    PREGATED: tl.constexpr,
    INIT: tl.constexpr,
    STORE_FINAL_STATE: tl.constexpr,
    STORE_STATES: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    SPLIT: tl.constexpr = True,
):
    """`chunk_state_fwd_kernel` for forwards without a backward (no h, vn, w or u in memory), in transposed form:
    the state block is held as S^T `[BV, BK]`, and every product whose operand depends on the state (S^T k^T,
    x^T Ai^T, vn^T (k e^(b_last - b)), S^T q^T, vn^T P^T) has that operand on the left, where the MMA reads it from
    registers. The untransposed kernel must first write S, x and vn to shared memory for each of them, on the
    sequential chain of the recurrence. Same arguments as `chunk_state_fwd_kernel`."""
    tl.static_assert(not STORE_STATES and (FROM_AI or not DELTA))
    i_seg, i_hv, i_h, i_n, bos, seq_len, _, c0, c1, o_v = _segment_program(
        T, NS, SEG, cu_seqlens, chunk_offsets, segments, H, HV, BT, BV, IS_VARLEN
    )
    o_k = tl.arange(0, BK)
    o_i = tl.arange(0, BT)
    m_v = o_v < V
    # [BV, BK]
    b_ht = tl.zeros([BV, BK], dtype=tl.float32)
    if INIT == 1:
        b_ht += tl.trans(_load_state(h0, i_n, i_hv, HV, K, V, o_k, o_v))
    if INIT == 2:
        b_ht += tl.trans(_load_state(h0, i_seg, i_hv, HV, K, V, o_k, o_v))
    for i_c in range(c0, c1):
        o_t = i_c * BT + o_i
        m_t = o_t < seq_len
        m_vt = m_v[:, None] & m_t[None, :]
        # [BT, BK]
        if PREGATED:
            b_q = _load_tile(qg, bos, seq_len, o_t, i_hv, HV, K, o_k)
        else:
            b_q = _load_tile(q, bos, seq_len, o_t, i_h, H, K, o_k)
        b_k, b_kx, b_g = _pass_keys(k, kl, kb, b, bos, seq_len, o_t, i_h, i_hv, H, HV, K, BT, BK, GATE, DELTA, PREGATED)
        b_gl = _load_gate_last(b, bos, seq_len, i_c, i_hv, HV, K, BT, o_k, GATE)
        # [BV, BT]
        b_vt = tl.load(v + _tile_offsets_t(bos, o_t, i_hv, HV, V, o_v), mask=m_vt, other=0.0).to(tl.float32)
        if DELTA:
            # vn^T = (beta (v - (k e^b) S))^T Ai^T
            b_vnt = _pseudo_values(
                ai, beta, b_kx, b_g, b_ht, b_vt, bos, seq_len, o_t, i_hv, HV, BT, GATE, True, PREGATED, SPLIT
            )
        else:
            b_vnt = b_vt
        # P^T [BT (keys), BT (queries)]
        b_pt = tl.trans(_qk_scores(b_q, b_k, b_g, aqk, bos, seq_len, o_t, i_hv, scale, HV, BT, GATE))
        dtype = b_q.dtype
        if PREGATED:
            b_ot = tl.dot(b_ht.to(dtype), tl.trans(b_q))
        elif GATE == 2:
            b_ot = tl.dot(b_ht.to(dtype), tl.trans((b_q.to(tl.float32) * tl.exp(b_g) * scale).to(dtype)))
        else:
            b_ot = tl.dot(b_ht.to(dtype), tl.trans(b_q)) * tl.trans(tl.exp(b_g) * scale)
        # in fp32 (tf32), or bf16 for bf16 scores, as in chunk_state_fwd_kernel
        b_ot = _dot_scores(b_vnt, b_pt, b_ot)
        tl.store(o + _tile_offsets_t(bos, o_t, i_hv, HV, V, o_v), b_ot.to(o.dtype.element_ty), mask=m_vt)
        # S^T <- S^T e^(b_last) + vn^T (k e^(b_last - b))
        b_ht = _decay_state(b_ht, b_k, b_g, b_gl, b_vnt, m_t, GATE, True, PREGATED, SPLIT)
    if STORE_FINAL_STATE and c1 == tl.cdiv(seq_len, BT):
        _store_state(ht, tl.trans(b_ht), i_n, i_hv, HV, K, V, o_k, o_v)


@triton.jit(do_not_specialize=["T", "NS", "SEG"])
def chunk_state_bwd_kernel(
    q,
    k,
    w,
    b,
    aqk,
    do,
    dh,
    dvn,
    dht,
    dh0,
    expand,
    cu_seqlens,
    chunk_offsets,
    segments,
    scale,
    T,
    NS,
    SEG,
    H: tl.constexpr,
    HV: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GATE: tl.constexpr,
    DELTA: tl.constexpr,
    INIT: tl.constexpr,
    FINAL: tl.constexpr,
    STORE_STATES: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    HORIZON: tl.constexpr = 0.0,
):
    """The backward sequential pass over the chunks of one segment, last chunk first. Per chunk (STORE_STATES): the
    gradient dh of the state leaving it and dvn = P^T do + (k exp(b_last - b)) dh, the full gradient of its
    pseudo-values (fp32). INIT: the gradient of the segment's leaving state is zero (0), dht[sequence] (1) or
    dht[segment] (2); FINAL: that of its entering state goes to dh0[sequence] (1) or dh0[segment] (2).
    HORIZON > 0 (per-head decays, the segment's own share of its entering state's gradient: INIT 0, FINAL 2, no
    stores): where `expand` is 0, the chunks from which the decay back to the segment's start falls below
    exp(-HORIZON) are skipped (`_decay_horizon`; see `chunk_segment_fwd_kernel`)."""
    i_seg, i_hv, i_h, i_n, bos, seq_len, first_chunk, c0, c1, o_v = _segment_program(
        T, NS, SEG, cu_seqlens, chunk_offsets, segments, H, HV, BT, BV, IS_VARLEN
    )
    if HORIZON > 0:  # noqa: SIM102 (compile-time test outside, run-time test inside)
        if tl.load(expand + i_n * HV + i_hv) == 0:
            c1, _total = _decay_horizon(b, bos, seq_len, i_hv, c0, c1, HORIZON, HV, BT, False)
    o_k = tl.arange(0, BK)
    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if INIT == 1:
        b_dh += _load_state(dht, i_n, i_hv, HV, K, V, o_k, o_v)
    if INIT == 2:
        b_dh += _load_state(dht, i_seg, i_hv, HV, K, V, o_k, o_v)
    for i_r in range(c1 - c0):
        i_c = c1 - 1 - i_r
        o_t = i_c * BT + tl.arange(0, BT)
        m_t = o_t < seq_len
        if STORE_STATES:
            _store_state(dh, b_dh, first_chunk + i_c, i_hv, HV, K, V, o_k, o_v)
        b_q = _load_tile(q, bos, seq_len, o_t, i_h, H, K, o_k)
        b_k = _load_tile(k, bos, seq_len, o_t, i_h, H, K, o_k)
        b_g = _load_gate_rows(b, bos, seq_len, o_t, i_hv, HV, K, BT, o_k, GATE)
        b_gl = _load_gate_last(b, bos, seq_len, i_c, i_hv, HV, K, BT, o_k, GATE)
        b_do = _load_tile(do, bos, seq_len, o_t, i_hv, HV, V, o_v)
        dtype = b_do.dtype
        b_p = _qk_scores(b_q, b_k, b_g, aqk, bos, seq_len, o_t, i_hv, scale, HV, BT, GATE)
        # per-head decays scale rows after the MMA, so that k and q enter it exactly
        if GATE == 2:
            b_kd = (b_k.to(tl.float32) * _masked_exp(b_gl - b_g, m_t[:, None])).to(dtype)
            b_dv = _dot_split(b_kd, b_dh, tl.zeros([BT, BV], dtype=tl.float32))
        else:
            b_dv = _dot_split(b_k, b_dh, tl.zeros([BT, BV], dtype=tl.float32)) * _masked_exp(b_gl - b_g, m_t[:, None])
        b_dv = tl.dot(tl.trans(b_p).to(dtype), b_do, b_dv)
        if STORE_STATES:
            _store_tile(dvn, b_dv, bos, seq_len, o_t, i_hv, HV, V, o_v)
        if GATE == 2:
            b_qd = (b_q.to(tl.float32) * tl.exp(b_g) * scale).to(dtype)
            b_dh = tl.dot(tl.trans(b_qd), b_do, b_dh * tl.trans(tl.exp(b_gl)))
        else:
            b_dh = _dot_split(tl.trans(b_q), b_do.to(tl.float32) * (tl.exp(b_g) * scale), b_dh * tl.exp(b_gl))
        if DELTA:
            b_dh = _dot_split(tl.trans(_load_tile(w, bos, seq_len, o_t, i_hv, HV, K, o_k)), -b_dv, b_dh)
    if FINAL == 1:
        _store_state(dh0, b_dh, i_n, i_hv, HV, K, V, o_k, o_v)
    if FINAL == 2:
        _store_state(dh0, b_dh, i_seg, i_hv, HV, K, V, o_k, o_v)


@triton.jit(do_not_specialize=["T", "NBH"])
def chunk_grad_kernel(
    q,
    k,
    v,
    b,
    beta,
    akk,
    ai,
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
    NBH,
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
    """Per chunk and block of BK key channels: dq, dk (per value head), dv, dbeta and the gradient of the cumulative
    log decay db (fp32). With NK = cdiv(K, BK) blocks, dbeta and per-head db are sums over the blocks: block i_k
    writes its part to dbeta[i_k] and db[i_k] (`[NK, ..]`), and the terms that do not depend on the key channels
    (dv, the values' part of dbeta) come from block 0. With per-channel decays the pairwise terms are left to
    `chunk_pairwise_bwd_kernel`: this kernel then stores their gradients dP and beta dA (block 0) instead. Four passes
    over the V blocks (the later ones read from L2), each with at most one [BT, BK] accumulator, keep the registers
    in bounds."""
    NK: tl.constexpr = (K + BK - 1) // BK
    i_t, i_k, i_bh = _chunk_program(NBH, NK)
    i_b, i_hv = i_bh // HV, i_bh % HV
    i_h = i_hv // (HV // H)
    bos, seq_len, i_c, i_tg = _locate_chunk(i_t, i_b, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)
    o_i = tl.arange(0, BT)
    o_t = i_c * BT + o_i
    o_k = i_k * BK + tl.arange(0, BK)
    m_t = o_t < seq_len
    first = i_k == 0
    b_q = _load_tile(q, bos, seq_len, o_t, i_h, H, K, o_k)
    b_k = _load_tile(k, bos, seq_len, o_t, i_h, H, K, o_k)
    b_g = _load_gate_rows(b, bos, seq_len, o_t, i_hv, HV, K, BT, o_k, GATE)
    b_gl = _load_gate_last(b, bos, seq_len, i_c, i_hv, HV, K, BT, o_k, GATE)
    dtype = b_q.dtype
    # this block's part of the per-token, per-head sums over key channels: [NK, B, T, HV] (B = 1 with packing)
    p_part = (i_k * (NBH // HV) * T + bos + o_t) * HV + i_hv

    # values: dP = do vn^T, and through u = Ai (beta v): dv, dbeta and dA; b_last through the state: sum_v h dh.
    # dA gathers -dyu u^T from u and -dyw w^T from w = Ai (beta k exp(b)), where dyw = -Ai^T dvn h^T: the sum is
    # -dyu (u - w h)^T = -dyu vn^T, one product over V (no key channels) and without the cancellation of its terms
    b_dp = tl.zeros([BT, BT], dtype=tl.float32)
    b_da = tl.zeros([BT, BT], dtype=tl.float32)
    b_dbeta = tl.zeros([BT], dtype=tl.float32)
    b_dgl = tl.zeros([BK], dtype=tl.float32)
    if DELTA:
        b_beta = _load_tokens(beta, bos, seq_len, o_t, i_hv, HV)
        b_ai = _load_tile(ai, bos, seq_len, o_t, i_hv, HV, BT, o_i)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        b_do = _load_tile(do, bos, seq_len, o_t, i_hv, HV, V, o_v)
        b_dvn = _load_tile(dvn, bos, seq_len, o_t, i_hv, HV, V, o_v)
        if DELTA:
            b_vn = _load_tile(vn, bos, seq_len, o_t, i_hv, HV, V, o_v)
        else:
            b_vn = _load_tile(v, bos, seq_len, o_t, i_hv, HV, V, o_v)
        b_dp = tl.dot(b_do.to(b_vn.dtype), tl.trans(b_vn), b_dp)
        if GATE != 0:
            b_h = _load_state(h, i_tg, i_hv, HV, K, V, o_k, o_v).to(tl.float32)
            b_dh = _load_state(dh, i_tg, i_hv, HV, K, V, o_k, o_v).to(tl.float32)
            b_dgl += tl.sum(b_h * b_dh, axis=1)
        if DELTA:
            # gradient of beta v through u = Ai (beta v)
            b_dyu = tl.dot(tl.trans(b_ai), b_dvn)
            b_da = tl.dot(-b_dyu, tl.trans(b_vn), b_da)
            if first:
                _store_tile(dv, b_dyu * b_beta[:, None], bos, seq_len, o_t, i_hv, HV, V, o_v)
                b_v = _load_tile(v, bos, seq_len, o_t, i_hv, HV, V, o_v).to(tl.float32)
                b_dbeta += tl.sum(b_v * b_dyu, axis=1)
        else:
            if first:
                _store_tile(dv, b_dvn, bos, seq_len, o_t, i_hv, HV, V, o_v)

    # dq: through o = scale (q exp(b)) h (decays with +b) and through P
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        b_h = _load_state(h, i_tg, i_hv, HV, K, V, o_k, o_v)
        b_do = _load_tile(do, bos, seq_len, o_t, i_hv, HV, V, o_v)
        b_dq = tl.dot(b_do.to(b_h.dtype), tl.trans(b_h), b_dq)
    b_eg = tl.exp(b_g)
    b_dq *= scale * b_eg
    m_causal = (o_i[:, None] >= o_i[None, :]) & m_t[:, None] & m_t[None, :]
    b_dp = tl.where(m_causal, b_dp * scale, 0.0)
    if GATE == 2:
        if first:
            _store_tile(daqk, b_dp, bos, seq_len, o_t, i_hv, HV, BT, o_i)
    else:
        b_decay = tl.zeros([BT, BT], dtype=tl.float32) + 1.0
        if GATE == 1:
            b_gt = tl.sum(b_g, axis=1)
            b_decay = tl.exp(tl.where(m_causal, b_gt[:, None] - b_gt[None, :], 0.0))
        b_mp = (b_dp * b_decay).to(dtype)
        b_dq = tl.dot(b_mp, b_k, b_dq)
    _store_tile(dq, b_dq, bos, seq_len, o_t, i_hv, HV, K, o_k)
    # factors q exp(b) and k exp(b) pass d/db = q dq, k dk; factors k exp(-b) pass -k dk
    b_db = b_q.to(tl.float32) * b_dq
    if GATE != 2:
        b_db = tl.sum(b_db, axis=1)[:, None]

    # dk through w = Ai (beta k exp(b)) and A (decays with +b), and dbeta
    b_dkp = tl.zeros([BT, BK], dtype=tl.float32)
    if DELTA:
        b_dw = tl.zeros([BT, BK], dtype=tl.float32)
        for i_v in range(tl.cdiv(V, BV)):
            o_v = i_v * BV + tl.arange(0, BV)
            b_h = _load_state(h, i_tg, i_hv, HV, K, V, o_k, o_v)
            b_dvn = _load_tile(dvn, bos, seq_len, o_t, i_hv, HV, V, o_v)
            b_dw = tl.dot((-b_dvn).to(b_h.dtype), tl.trans(b_h), b_dw)
        # gradient of beta k exp(b) through w = Ai (beta k exp(b)); Ai, the masks and decays are formed again rather
        # than held through the passes above (registers)
        b_ai = _load_tile(ai, bos, seq_len, o_t, i_hv, HV, BT, o_i)
        b_dyw = tl.dot(tl.trans(b_ai), b_dw)
        b_dkp = b_dyw * b_eg * b_beta[:, None]
        b_dbeta += tl.sum(b_k.to(tl.float32) * b_eg * b_dyw, axis=1)
        m_strict = (o_i[:, None] > o_i[None, :]) & m_t[:, None] & m_t[None, :]
        b_da = tl.where(m_strict, b_da, 0.0)
        if GATE == 2:
            if first:
                b_kk = tl.where(m_strict, _load_tile(akk, bos, seq_len, o_t, i_hv, HV, BT, o_i), 0.0)
                b_dbeta += tl.sum(b_da * b_kk, axis=1)
                _store_tile(dakk, b_da * b_beta[:, None], bos, seq_len, o_t, i_hv, HV, BT, o_i)
        else:
            # A = beta k k^T (decayed): this block's channels give their part of k k^T
            b_decay = tl.zeros([BT, BT], dtype=tl.float32) + 1.0
            if GATE == 1:
                b_decay = tl.exp(tl.where(m_strict, b_gt[:, None] - b_gt[None, :], 0.0))
            b_kk = tl.dot(b_k, tl.trans(b_k))
            b_kk = tl.where(m_strict, b_kk * b_decay, 0.0)
            b_dbeta += tl.sum(b_da * b_kk, axis=1)
            b_mk = (b_da * b_decay * b_beta[:, None]).to(dtype)
            b_dkp = tl.dot(b_mk, b_k, b_dkp)
        tl.store(dbeta + p_part, b_dbeta.to(dbeta.dtype.element_ty), mask=m_t)
    if GATE == 2:
        b_db += b_k.to(tl.float32) * b_dkp
    elif GATE == 1:
        b_db += tl.sum(b_k.to(tl.float32) * b_dkp, axis=1)[:, None]

    # dk through S' = ... + (k exp(b_last - b))^T vn (decays with -b and +b_last) and through P and A (with -b)
    b_dks = tl.zeros([BT, BK], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        b_dh = _load_state(dh, i_tg, i_hv, HV, K, V, o_k, o_v)
        if DELTA:
            b_vn = _load_tile(vn, bos, seq_len, o_t, i_hv, HV, V, o_v)
        else:
            b_vn = _load_tile(v, bos, seq_len, o_t, i_hv, HV, V, o_v)
        b_dks = tl.dot(b_vn, tl.trans(b_dh).to(b_vn.dtype), b_dks)
    b_dk_state = b_dks * _masked_exp(b_gl - b_g, m_t[:, None])
    b_dkn = b_dk_state
    if GATE != 2:
        b_dkn = tl.dot(tl.trans(b_mp), b_q, b_dkn)
        if DELTA:
            b_dkn = tl.dot(tl.trans(b_mk), b_k, b_dkn)
    _store_tile(dk, b_dkp + b_dkn, bos, seq_len, o_t, i_hv, HV, K, o_k)
    if GATE != 0:
        b_kf = b_k.to(tl.float32)
        # S' = exp(b_last) S + ...: d/db_last = sum_v exp(b_last) S dS'
        b_dbl = b_dgl * tl.sum(tl.exp(b_gl), axis=0) + tl.sum(b_kf * b_dk_state, axis=0)
        last = tl.minimum(i_c * BT + BT, seq_len) - 1
        if GATE == 2:
            b_db -= b_kf * b_dkn
            b_db += tl.where((o_t == last)[:, None], b_dbl[None, :], 0.0)
            _store_tile(db, b_db, bos, seq_len, o_t, i_hv, HV, K, o_k)
        else:
            b_dbt = tl.sum(b_db, axis=1) - tl.sum(b_kf * b_dkn, axis=1)
            b_dbt += tl.where(o_t == last, tl.sum(b_dbl, axis=0), 0.0)
            tl.store(db + p_part, b_dbt, mask=m_t)


@triton.jit(do_not_specialize=["T", "NBH"])
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
    NBH,
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
    i_i, i_hv, i_h, bos, seq_len, i_c, row0 = _sub_block_program(
        T, NBH, cu_seqlens, chunk_indices, H, HV, BT, BC, IS_VARLEN
    )
    if row0 >= seq_len:
        return
    o_i = tl.arange(0, BC)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_r = row0 + o_i
    m_r = o_r < seq_len
    m_rk = m_r[:, None] & m_k[None, :]
    b_q = _load_tile(q, bos, seq_len, o_r, i_h, H, K, o_k).to(tl.float32)
    b_k = _load_tile(k, bos, seq_len, o_r, i_h, H, K, o_k).to(tl.float32)
    b_b = _load_tile(b, bos, seq_len, o_r, i_hv, HV, K, o_k)
    row_last = tl.minimum(row0 + BC, seq_len) - 1
    b_first = tl.load(b + ((bos + row0) * HV + i_hv) * K + o_k, mask=m_k, other=0.0)
    b_last = tl.load(b + ((bos + row_last) * HV + i_hv) * K + o_k, mask=m_k, other=0.0)

    # row side (this block's queries/keys against earlier sub-blocks), reference: the block's first row
    b_dq = tl.zeros([BC, BK], dtype=tl.float32)
    b_dkr = tl.zeros([BC, BK], dtype=tl.float32)
    p_a = _tile_offsets(bos, o_r, i_hv, HV, BT, o_i)
    for j in range(i_i):
        o_s = i_c * BT + j * BC + o_i
        b_ks = _load_tile(k, bos, seq_len, o_s, i_h, H, K, o_k).to(tl.float32)
        b_bs = _load_tile(b, bos, seq_len, o_s, i_hv, HV, K, o_k)
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
        b_es = _masked_exp(_load_tile(b, bos, seq_len, o_s, i_hv, HV, K, o_k) - b_last[None, :], m_sk)
        b_qs = _load_tile(q, bos, seq_len, o_s, i_h, H, K, o_k).to(tl.float32) * b_es
        b_ks = _load_tile(k, bos, seq_len, o_s, i_h, H, K, o_k).to(tl.float32) * b_es
        # blocks (m, i) of daqk and dakk, transposed: [BC (rows of block i), BC (rows of block m)]
        p_at = ((bos + o_s) * HV + i_hv)[None, :] * BT + (i_i * BC + o_i)[:, None]
        b_dkc += tl.dot(tl.load(daqk + p_at, mask=m_s[None, :], other=0.0), b_qs)
        if DELTA:
            b_dkc += tl.dot(tl.load(dakk + p_at, mask=m_s[None, :], other=0.0), b_ks)
    b_dkc *= _masked_exp(b_last[None, :] - b_b, m_rk)

    # diagonal sub-block, one token at a time
    for s in range(BC):
        # tensors, not a scalar: newer Triton interpreters reject the mask that scalar & tensor gives
        m_sk = ((o_k * 0 + row0 + s) < seq_len) & m_k
        m_sr = (o_i * 0 + row0 + s) < seq_len
        p_s = (bos + row0 + s) * H * K + i_h * K + o_k
        b_qs = tl.load(q + p_s, mask=m_sk, other=0.0).to(tl.float32)
        b_ks = tl.load(k + p_s, mask=m_sk, other=0.0).to(tl.float32)
        b_bs = tl.load(b + (bos + row0 + s) * HV * K + i_hv * K + o_k, mask=m_sk, other=0.0)
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
    p_hk = _tile_offsets(bos, o_r, i_hv, HV, K, o_k)
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
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h += _load_state(h0, i_nh, 0, 1, K, V, o_k, o_v)
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
        _store_state(ht, b_h, i_nh, 0, 1, K, V, o_k, o_v)
