"""Triton kernels of causal sliding-window softmax attention with sink tokens and sink logits (host side:
`sliding_window.py`).

Query t sees key s when 0 <= t - s < window, plus the sink tokens (the first S valid keys) once they have left the
window, and a learned per-head sink logit joins every softmax denominator with no value. Online softmax in fp32,
log2 space (scores scaled by scale * log2(e)). A query block visits only the key blocks of its window in three
phases: masked blocks where the window starts, unmasked blocks inside it, masked blocks on the diagonal; the sink
keys are one extra masked tile. The backward is flash-attention-2's: a dq kernel over the key blocks a query block
sees (which first forms and stores delta = rowsum(do * o), and also sums the sink keys' gradients from queries
outside their window, one partial per query block), then a dk/dv kernel over the query blocks that see a key block,
looping over the query heads of its GQA group.

Layouts: q, o, do `[B, T, H, D]`; k, v `[B, T, HKV, D]`; lse, delta `[H, B * T]` fp32 (log2 units); packed
sequences have B = 1 and per-sequence block lists. `key_bounds` `[B, 2]` int32 restricts row b's keys to
`[first, end)` (left and right padding); the sink tokens are then `first ... first + S - 1`.
"""

try:
    import triton
    import triton.language as tl
except ImportError as error:  # the importer falls back to the torch reference
    raise ImportError("the sliding-window kernels need triton (`pip install triton`)") from error

# a constexpr: compiled kernels read no other globals
LOG2E = tl.constexpr(1.4426950408889634)
# how far (log2 units) a row's score max may exceed the forward's reference max before the reference moves
RESCALE_SLACK = tl.constexpr(8.0)


@triton.jit
def _locate(
    i_blk,
    i_b,
    T,
    cu_seqlens,
    block_index,
    key_bounds,
    BLOCK: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    HAS_BOUNDS: tl.constexpr,
):
    """(first token of the sequence in the flat token axis, sequence length, first row of the block, first valid
    key, end of the valid keys, sequence index) of block `i_blk` of batch row `i_b`."""
    if IS_VARLEN:
        i_n = tl.load(block_index + i_blk * 2)
        i_c = tl.load(block_index + i_blk * 2 + 1)
        bos = tl.load(cu_seqlens + i_n)
        seq_len = tl.load(cu_seqlens + i_n + 1) - bos
        k_lo = seq_len * 0
        k_hi = seq_len
        bos = bos.to(tl.int64)
    else:
        i_n = i_b
        i_c = i_blk
        bos = i_b.to(tl.int64) * T
        seq_len = T + i_b * 0
        if HAS_BOUNDS:
            k_lo = tl.load(key_bounds + i_b * 2)
            k_hi = tl.load(key_bounds + i_b * 2 + 1)
        else:
            k_lo = seq_len * 0
            k_hi = seq_len
    return bos, seq_len, i_c * BLOCK, k_lo, k_hi, i_n


@triton.jit
def _program_block(num_rows, num_full, HEAVY_FIRST: tl.constexpr):
    """(block, row) of this program in a 1-D grid over blocks x `num_rows` rows (batch row, head or head tile).
    Counted from the heaviest block (the last one with HEAVY_FIRST, for query blocks, whose work grows up to the
    window; the first one otherwise, for key blocks, whose work shrinks at the end of the sequence), the first
    `num_full` blocks of a row see a whole window: programs take them row by row (neighbouring blocks of a row share
    their tiles in L2), then the shorter blocks, block by block across the rows and longest first, so that the launch
    ends on the shortest block of every row rather than on all the blocks of its last row."""
    pid = tl.program_id(0)
    heavy = num_full * num_rows
    if pid < heavy:
        i_row = pid // tl.maximum(num_full, 1)
        i_blk = pid - i_row * num_full
    else:
        i_blk = num_full + (pid - heavy) // num_rows
        i_row = (pid - heavy) - (i_blk - num_full) * num_rows
    if HEAVY_FIRST:
        i_blk = tl.num_programs(0) // num_rows - 1 - i_blk
    return i_blk, i_row


@triton.jit
def _load_tile(ptr, m_rows, m_d, MASK_ROWS: tl.constexpr, MASK_D: tl.constexpr):
    """A [rows, BD] tile; masks only where the rows or the head dim can run out of bounds."""
    if MASK_ROWS and MASK_D:
        return tl.load(ptr, mask=m_rows[:, None] & m_d[None, :], other=0.0)
    elif MASK_ROWS:
        return tl.load(ptr, mask=m_rows[:, None], other=0.0)
    elif MASK_D:
        return tl.load(ptr, mask=m_d[None, :], other=0.0)
    else:
        return tl.load(ptr)


@triton.jit
def _window_phases(m0, k_lo, k_hi, window, BM: tl.constexpr, BN: tl.constexpr):
    """Key-block bounds of query block [m0, m0 + BM): [lo, a) and [b, hi) need masks, [a, b) is fully visible
    (inside every row's window, causal for every row, valid keys). All multiples of BN except hi."""
    lo = tl.maximum(m0 - window + 1, k_lo) // BN * BN
    hi = tl.minimum(m0 + BM, k_hi)
    a = (tl.maximum(m0 + BM - window, k_lo) + BN - 1) // BN * BN
    a = tl.minimum(tl.maximum(a, lo), tl.maximum(hi, lo))
    b = tl.minimum(m0, k_hi) // BN * BN
    b = tl.maximum(tl.minimum(b, hi), a)
    return lo, a, b, hi


@triton.jit
def _fwd_tile(
    b_acc,
    b_m,
    b_l,
    b_q,
    k_base,
    v_base,
    o_s,
    o_t,
    o_d,
    m_d,
    stride_kv,
    k_lo,
    k_hi,
    window,
    qk_scale,
    k_desc,
    v_desc,
    desc_row,
    desc_col,
    MODE: tl.constexpr,
    S: tl.constexpr,
    MASK_D: tl.constexpr,
    USE_DESC: tl.constexpr,
    LAZY_RESCALE: tl.constexpr,
):
    """One online-softmax step over keys `o_s`. MODE 0: fully visible; 1: window, causal and key-bound masks;
    2: sink keys (o_s = first + j), visible once out of the window. With USE_DESC, MODE 0 and 1 load their k and v
    tiles through tensor descriptors (TMA) at row `desc_row` (= the flat token of o_s[0]) and column `desc_col`,
    unmasked: a masked key gets p = 0, so the values its row holds add nothing as long as they are finite: a
    neighbouring sequence or batch row, TMA's zeros past the end, or padding, which the host zeros first."""
    # full pointer tiles per step: hoisting the [BN, BD] offsets out of the loop (as dq and dk/dv do) made this
    # kernel 19% slower on an H100 (4.59 -> 5.48 ms at T = 32k)
    p_k = k_base + o_s[:, None] * stride_kv + o_d[None, :]
    p_v = v_base + o_s[:, None] * stride_kv + o_d[None, :]
    if MODE != 0:
        m_s = (o_s >= k_lo) & (o_s < k_hi)
        if MODE == 2:
            m_s = m_s & (o_s - k_lo < S)
    if USE_DESC and MODE != 2:
        b_k = k_desc.load([desc_row, desc_col])
    elif MODE == 0:
        b_k = _load_tile(p_k, o_s, m_d, False, MASK_D)
    else:
        b_k = _load_tile(p_k, m_s, m_d, True, MASK_D)
    # [BM, BN]
    b_s = tl.dot(b_q, tl.trans(b_k))
    if MODE == 0 and LAZY_RESCALE:
        # the running max m is only a reference: o = acc / l and lse = m + log2(l) hold for any m that bounds the
        # scores closely enough, so m moves (and acc and l are rescaled) only when a row's max exceeds it by more than
        # RESCALE_SLACK; otherwise p <= 2^RESCALE_SLACK, exact in the fp32 sums and the 16-bit p
        b_mx = tl.max(b_s, 1) * qk_scale
        if tl.max(b_mx - b_m, 0) > RESCALE_SLACK:
            b_mn = tl.maximum(b_m, b_mx)
            b_alpha = tl.exp2(b_m - b_mn)
            b_l = b_l * b_alpha
            b_acc = b_acc * b_alpha[:, None]
            b_m = b_mn
        b_p = tl.exp2(b_s * qk_scale - b_m[:, None])
        b_l = b_l + tl.sum(b_p, 1)
        b_mn = b_m
    else:
        if MODE == 0:
            b_mn = tl.maximum(b_m, tl.max(b_s, 1) * qk_scale)
            b_p = tl.exp2(b_s * qk_scale - b_mn[:, None])
            b_ms = b_mn
        else:
            dist = o_t[:, None] - o_s[None, :]
            if MODE == 1:
                m_ts = (dist >= 0) & (dist < window) & m_s[None, :]
            else:
                m_ts = (dist >= window) & m_s[None, :]
            b_s = tl.where(m_ts, b_s * qk_scale, float("-inf"))
            b_mn = tl.maximum(b_m, tl.max(b_s, 1))
            # rows that have seen no key yet keep m = -inf; exponentiate against 0 there
            b_ms = tl.where(b_mn == float("-inf"), 0.0, b_mn)
            b_p = tl.exp2(b_s - b_ms[:, None])
        b_alpha = tl.exp2(b_m - b_ms)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_acc = b_acc * b_alpha[:, None]
    if USE_DESC and MODE != 2:
        b_v = v_desc.load([desc_row, desc_col])
    elif MODE == 0:
        b_v = _load_tile(p_v, o_s, m_d, False, MASK_D)
    else:
        b_v = _load_tile(p_v, m_s, m_d, True, MASK_D)
    b_acc = tl.dot(b_p.to(b_v.dtype), b_v, b_acc)
    return b_acc, b_mn, b_l


@triton.jit(do_not_specialize=["T", "N", "window", "num_rows", "num_full"])
def sliding_fwd_kernel(
    q,
    k,
    v,
    o,
    lse,
    sink_logits,
    k_desc,
    v_desc,
    cu_seqlens,
    block_index,
    key_bounds,
    scale,
    window,
    T,
    N,
    num_rows,
    num_full,
    H: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    S: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BS: tl.constexpr,
    BD: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    HAS_BOUNDS: tl.constexpr,
    HAS_SINK_LOGITS: tl.constexpr,
    USE_DESC: tl.constexpr,
    PACK: tl.constexpr,
    HEAVY_FIRST: tl.constexpr,
    LAZY_RESCALE: tl.constexpr,
):
    """o and the log2-sum-exp of one tile of BM rows: BM // PACK queries of PACK query heads of one GQA group (row r
    is query m0 + r // PACK of head i_hp * PACK + r % PACK), so the group's heads share every k/v tile they load."""
    BT: tl.constexpr = BM // PACK
    i_m, i_bh = _program_block(num_rows, num_full, HEAVY_FIRST)
    i_b, i_hp = i_bh // (H // PACK), i_bh % (H // PACK)
    i_hkv = i_hp * PACK // (H // HKV)
    bos, seq_len, m0, k_lo, k_hi, _i_seq = _locate(
        i_m, i_b, T, cu_seqlens, block_index, key_bounds, BT, IS_VARLEN, HAS_BOUNDS
    )
    MASK_D: tl.constexpr = BD != D
    o_r = tl.arange(0, BM)
    o_t = m0 + o_r // PACK
    o_h = i_hp * PACK + o_r % PACK
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    m_t = o_t < seq_len
    # [BM, BD] offsets of the rows' q and o
    o_qd = (bos * H) * D + (o_t * H + o_h)[:, None] * D + o_d[None, :]
    p_q = q + o_qd
    # [BM, BD]
    b_q = _load_tile(p_q, m_t, m_d, True, MASK_D)
    k_base = k + (bos * HKV + i_hkv) * D
    v_base = v + (bos * HKV + i_hkv) * D
    qk_scale = scale * LOG2E
    if HAS_SINK_LOGITS:
        b_m = tl.load(sink_logits + o_h).to(tl.float32) * LOG2E
        b_l = tl.full([BM], 1.0, dtype=tl.float32)
    else:
        b_m = tl.full([BM], float("-inf"), dtype=tl.float32)
        b_l = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([BM, BD], dtype=tl.float32)

    if S > 0:  # noqa: SIM102 (compile-time test outside, run-time test inside)
        # the sinks join only for rows where they have left the window
        if m0 + BT - 1 - window >= k_lo:
            o_j = k_lo + tl.arange(0, BS)
            b_acc, b_m, b_l = _fwd_tile(
                b_acc,
                b_m,
                b_l,
                b_q,
                k_base,
                v_base,
                o_j,
                o_t,
                o_d,
                m_d,
                HKV * D,
                k_lo,
                k_hi,
                window,
                qk_scale,
                k_desc,
                v_desc,
                0,
                0,
                2,
                S,
                MASK_D,
                False,
                LAZY_RESCALE,
            )
    lo, a, b, hi = _window_phases(m0, k_lo, k_hi, window, BT, BN)
    for n0 in range(lo, a, BN):
        b_acc, b_m, b_l = _fwd_tile(
            b_acc,
            b_m,
            b_l,
            b_q,
            k_base,
            v_base,
            n0 + tl.arange(0, BN),
            o_t,
            o_d,
            m_d,
            HKV * D,
            k_lo,
            k_hi,
            window,
            qk_scale,
            k_desc,
            v_desc,
            (bos + n0).to(tl.int32),
            i_hkv * D,
            1,
            S,
            MASK_D,
            USE_DESC,
            LAZY_RESCALE,
        )
    for n0 in range(a, b, BN):
        b_acc, b_m, b_l = _fwd_tile(
            b_acc,
            b_m,
            b_l,
            b_q,
            k_base,
            v_base,
            n0 + tl.arange(0, BN),
            o_t,
            o_d,
            m_d,
            HKV * D,
            k_lo,
            k_hi,
            window,
            qk_scale,
            k_desc,
            v_desc,
            (bos + n0).to(tl.int32),
            i_hkv * D,
            0,
            S,
            MASK_D,
            USE_DESC,
            LAZY_RESCALE,
        )
    for n0 in range(b, hi, BN):
        b_acc, b_m, b_l = _fwd_tile(
            b_acc,
            b_m,
            b_l,
            b_q,
            k_base,
            v_base,
            n0 + tl.arange(0, BN),
            o_t,
            o_d,
            m_d,
            HKV * D,
            k_lo,
            k_hi,
            window,
            qk_scale,
            k_desc,
            v_desc,
            (bos + n0).to(tl.int32),
            i_hkv * D,
            1,
            S,
            MASK_D,
            USE_DESC,
            LAZY_RESCALE,
        )

    # rows with no visible key (padding) give 0 and lse = +inf, so that the backward sees p = 0
    m_any = b_l > 0.0
    b_o = b_acc / tl.where(m_any, b_l, 1.0)[:, None]
    b_lse = tl.where(m_any, b_m + tl.log2(tl.where(m_any, b_l, 1.0)), float("inf"))
    tl.store(o + o_qd, b_o.to(o.dtype.element_ty), mask=m_t[:, None] & m_d[None, :])
    tl.store(lse + o_h.to(tl.int64) * N + bos + o_t, b_lse, mask=m_t)


@triton.jit
def _dq_tile(
    b_dq,
    b_q,
    b_do,
    b_lse,
    b_delta,
    k_base,
    v_base,
    n0,
    o_n,
    o_kv,
    o_t,
    m_d,
    stride_kv,
    k_lo,
    k_hi,
    window,
    qk_scale,
    k_desc,
    v_desc,
    desc_row0,
    desc_col,
    MODE: tl.constexpr,
    S: tl.constexpr,
    MASK_D: tl.constexpr,
    USE_DESC: tl.constexpr,
):
    """dq += ds k over keys o_s = n0 + o_n (MODE and the descriptors as in `_fwd_tile`; desc_row0 is the flat token
    of the sequence's first key); also returns p and ds for the sink partials."""
    o_s = n0 + o_n
    p_k = (k_base + n0 * stride_kv) + o_kv
    p_v = (v_base + n0 * stride_kv) + o_kv
    if MODE != 0:
        m_s = (o_s >= k_lo) & (o_s < k_hi)
        if MODE == 2:
            m_s = m_s & (o_s - k_lo < S)
    if USE_DESC and MODE != 2:
        b_k = k_desc.load([desc_row0 + n0, desc_col])
        b_v = v_desc.load([desc_row0 + n0, desc_col])
    elif MODE == 0:
        b_k = _load_tile(p_k, o_s, m_d, False, MASK_D)
        b_v = _load_tile(p_v, o_s, m_d, False, MASK_D)
    else:
        b_k = _load_tile(p_k, m_s, m_d, True, MASK_D)
        b_v = _load_tile(p_v, m_s, m_d, True, MASK_D)
    # [BM, BN]
    b_p = tl.exp2(tl.dot(b_q, tl.trans(b_k)) * qk_scale - b_lse[:, None])
    if MODE != 0:
        dist = o_t[:, None] - o_s[None, :]
        if MODE == 1:
            m_ts = (dist >= 0) & (dist < window) & m_s[None, :]
        else:
            m_ts = (dist >= window) & m_s[None, :]
        b_p = tl.where(m_ts, b_p, 0.0)
    b_dp = tl.dot(b_do, tl.trans(b_v))
    b_ds = b_p * (b_dp - b_delta[:, None])
    b_dq = tl.dot(b_ds.to(b_k.dtype), b_k, b_dq)
    return b_dq, b_p, b_ds


@triton.jit(do_not_specialize=["T", "N", "window", "num_rows", "num_full"])
def sliding_bwd_dq_kernel(
    q,
    k,
    v,
    o,
    do,
    lse,
    delta,
    dq,
    sink_dk,
    sink_dv,
    k_desc,
    v_desc,
    cu_seqlens,
    block_index,
    key_bounds,
    scale,
    window,
    T,
    N,
    num_rows,
    num_full,
    H: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    S: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BS: tl.constexpr,
    BD: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    HAS_BOUNDS: tl.constexpr,
    USE_DESC: tl.constexpr,
    PACK: tl.constexpr,
    HEAVY_FIRST: tl.constexpr,
):
    """dq and delta = rowsum(do * o) of one tile of BM rows (BM // PACK queries of PACK heads, as in
    `sliding_fwd_kernel`); with sinks, also this tile's share of the sink keys' dk (unscaled) and dv from the queries
    outside their window, into `sink_dk/sink_dv[i_m, b * (H / PACK) + i_hp, j]`."""
    BT: tl.constexpr = BM // PACK
    i_m, i_bh = _program_block(num_rows, num_full, HEAVY_FIRST)
    i_b, i_hp = i_bh // (H // PACK), i_bh % (H // PACK)
    i_hkv = i_hp * PACK // (H // HKV)
    bos, seq_len, m0, k_lo, k_hi, _i_seq = _locate(
        i_m, i_b, T, cu_seqlens, block_index, key_bounds, BT, IS_VARLEN, HAS_BOUNDS
    )
    MASK_D: tl.constexpr = BD != D
    o_r = tl.arange(0, BM)
    o_t = m0 + o_r // PACK
    o_h = i_hp * PACK + o_r % PACK
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    m_t = o_t < seq_len
    p_q = (bos * H) * D + (o_t * H + o_h)[:, None] * D + o_d[None, :]
    # [BM, BD]
    b_q = _load_tile(q + p_q, m_t, m_d, True, MASK_D)
    b_do = _load_tile(do + p_q, m_t, m_d, True, MASK_D)
    # rows past the end get lse = +inf: p = 0
    b_lse = tl.load(lse + o_h.to(tl.int64) * N + bos + o_t, mask=m_t, other=float("inf"))
    # delta = rowsum(do * o) in fp32, stored for the dk/dv kernel and the sink logits' gradient
    b_o = _load_tile(o + p_q, m_t, m_d, True, MASK_D)
    b_delta = tl.sum(b_o.to(tl.float32) * b_do.to(tl.float32), 1)
    tl.store(delta + o_h.to(tl.int64) * N + bos + o_t, b_delta, mask=m_t)
    k_base = k + (bos * HKV + i_hkv) * D
    v_base = v + (bos * HKV + i_hkv) * D
    qk_scale = scale * LOG2E
    b_dq = tl.zeros([BM, BD], dtype=tl.float32)

    if S > 0:  # noqa: SIM102 (compile-time test outside, run-time test inside)
        if m0 + BT - 1 - window >= k_lo:
            o_j = tl.arange(0, BS)
            b_dq, b_p, b_ds = _dq_tile(
                b_dq,
                b_q,
                b_do,
                b_lse,
                b_delta,
                k_base,
                v_base,
                k_lo,
                o_j,
                o_j[:, None] * (HKV * D) + o_d[None, :],
                o_t,
                m_d,
                HKV * D,
                k_lo,
                k_hi,
                window,
                qk_scale,
                k_desc,
                v_desc,
                0,
                0,
                2,
                S,
                MASK_D,
                False,
            )
            # [BS, BD]
            b_sdv = tl.dot(tl.trans(b_p.to(b_do.dtype)), b_do)
            b_sdk = tl.dot(tl.trans(b_ds.to(b_q.dtype)), b_q)
            o_j = tl.arange(0, BS)
            p_s = (i_m.to(tl.int64) * num_rows + i_bh) * S * D + o_j[:, None] * D + o_d[None, :]
            m_s = (o_j < S)[:, None] & m_d[None, :]
            tl.store(sink_dk + p_s, b_sdk, mask=m_s)
            tl.store(sink_dv + p_s, b_sdv, mask=m_s)
    lo, a, b, hi = _window_phases(m0, k_lo, k_hi, window, BT, BN)
    o_n = tl.arange(0, BN)
    o_kv = o_n[:, None] * (HKV * D) + o_d[None, :]
    for n0 in range(lo, a, BN):
        b_dq, _b_p, _b_ds = _dq_tile(
            b_dq,
            b_q,
            b_do,
            b_lse,
            b_delta,
            k_base,
            v_base,
            n0,
            o_n,
            o_kv,
            o_t,
            m_d,
            HKV * D,
            k_lo,
            k_hi,
            window,
            qk_scale,
            k_desc,
            v_desc,
            bos.to(tl.int32),
            i_hkv * D,
            1,
            S,
            MASK_D,
            USE_DESC,
        )
    for n0 in range(a, b, BN):
        b_dq, _b_p, _b_ds = _dq_tile(
            b_dq,
            b_q,
            b_do,
            b_lse,
            b_delta,
            k_base,
            v_base,
            n0,
            o_n,
            o_kv,
            o_t,
            m_d,
            HKV * D,
            k_lo,
            k_hi,
            window,
            qk_scale,
            k_desc,
            v_desc,
            bos.to(tl.int32),
            i_hkv * D,
            0,
            S,
            MASK_D,
            USE_DESC,
        )
    for n0 in range(b, hi, BN):
        b_dq, _b_p, _b_ds = _dq_tile(
            b_dq,
            b_q,
            b_do,
            b_lse,
            b_delta,
            k_base,
            v_base,
            n0,
            o_n,
            o_kv,
            o_t,
            m_d,
            HKV * D,
            k_lo,
            k_hi,
            window,
            qk_scale,
            k_desc,
            v_desc,
            bos.to(tl.int32),
            i_hkv * D,
            1,
            S,
            MASK_D,
            USE_DESC,
        )
    tl.store(dq + p_q, (b_dq * scale).to(dq.dtype.element_ty), mask=m_t[:, None] & m_d[None, :])


@triton.jit
def _dkdv_tile(
    b_dk,
    b_dv,
    b_k,
    b_v,
    q_base,
    do_base,
    lse_base,
    delta_base,
    o_s,
    m0,
    o_m,
    o_qd,
    m_d,
    seq_len,
    window,
    qk_scale,
    q_desc,
    do_desc,
    desc_row0,
    desc_col,
    H: tl.constexpr,
    D: tl.constexpr,
    MASKED: tl.constexpr,
    MASK_D: tl.constexpr,
    USE_DESC: tl.constexpr,
):
    """dk += ds^T q, dv += p^T do over queries o_t = m0 + o_m (tile offsets `o_qd`, loop-invariant; MASKED:
    causal, window and sequence-end masks). With USE_DESC a tile loads q and do through tensor descriptors at row
    desc_row0 + m0 (desc_row0: the flat token of the sequence's first query), column desc_col, unmasked (a masked
    query gets p = 0, as in `_fwd_tile`: rows past the sequence are the next sequence's or batch row's)."""
    o_t = m0 + o_m
    m_t = o_t < seq_len
    if USE_DESC:
        b_q = q_desc.load([desc_row0 + m0, desc_col])
        b_do = do_desc.load([desc_row0 + m0, desc_col])
    else:
        b_q = _load_tile((q_base + m0 * (H * D)) + o_qd, m_t, m_d, MASKED, MASK_D)
        b_do = _load_tile((do_base + m0 * (H * D)) + o_qd, m_t, m_d, MASKED, MASK_D)
    if MASKED:
        b_lse = tl.load(lse_base + o_t, mask=m_t, other=float("inf"))
        b_delta = tl.load(delta_base + o_t, mask=m_t, other=0.0)
    else:
        b_lse = tl.load(lse_base + o_t)
        b_delta = tl.load(delta_base + o_t)
    # [BN, BM]
    b_pt = tl.exp2(tl.dot(b_k, tl.trans(b_q)) * qk_scale - b_lse[None, :])
    if MASKED:
        dist = o_t[None, :] - o_s[:, None]
        b_pt = tl.where((dist >= 0) & (dist < window) & m_t[None, :], b_pt, 0.0)
    b_dv = tl.dot(b_pt.to(b_do.dtype), b_do, b_dv)
    b_dpt = tl.dot(b_v, tl.trans(b_do))
    b_dst = b_pt * (b_dpt - b_delta[None, :])
    b_dk = tl.dot(b_dst.to(b_q.dtype), b_q, b_dk)
    return b_dk, b_dv


@triton.jit(do_not_specialize=["T", "N", "window", "num_rows", "num_full"])
def sliding_bwd_dkdv_kernel(
    q,
    k,
    v,
    do,
    lse,
    delta,
    dk,
    dv,
    sink_dk,
    sink_dv,
    q_desc,
    do_desc,
    cu_seqlens,
    block_index,
    key_bounds,
    scale,
    window,
    T,
    N,
    num_rows,
    num_full,
    H: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    S: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    HAS_BOUNDS: tl.constexpr,
    USE_DESC: tl.constexpr,
):
    """dk, dv of one [BN]-key block of one kv head: every query head of the group, every query block inside the
    keys' window; the sink keys add the partials of `sliding_bwd_dq_kernel` (summed per sequence and kv head)."""
    i_n, i_bh = _program_block(num_rows, num_full, False)
    i_b, i_hkv = i_bh // HKV, i_bh % HKV
    G: tl.constexpr = H // HKV
    bos, seq_len, n0, k_lo, k_hi, i_seq = _locate(
        i_n, i_b, T, cu_seqlens, block_index, key_bounds, BN, IS_VARLEN, HAS_BOUNDS
    )
    MASK_D: tl.constexpr = BD != D
    o_s = n0 + tl.arange(0, BN)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    m_s = o_s < seq_len
    p_k = (bos * HKV + i_hkv) * D + o_s[:, None] * (HKV * D) + o_d[None, :]
    # [BN, BD]
    b_k = _load_tile(k + p_k, m_s, m_d, True, MASK_D)
    b_v = _load_tile(v + p_k, m_s, m_d, True, MASK_D)
    b_dk = tl.zeros([BN, BD], dtype=tl.float32)
    b_dv = tl.zeros([BN, BD], dtype=tl.float32)
    qk_scale = scale * LOG2E

    # query-block bounds: [start, c) and [d, e) need masks, [c, d) is fully visible
    start = n0 // BM * BM
    e = tl.minimum(seq_len, n0 + BN - 1 + window)
    c = tl.minimum((n0 + BN - 1 + BM - 1) // BM * BM, e)
    d = tl.minimum((n0 + window) // BM, seq_len // BM) * BM
    d = tl.maximum(d, c)
    # [BM, BD] offsets of a query tile from its first query, the same for every tile
    o_m = tl.arange(0, BM)
    o_qd = o_m[:, None] * (H * D) + o_d[None, :]
    if (n0 + BN > k_lo) & (n0 < k_hi):
        for g in range(G):
            i_h = i_hkv * G + g
            q_base = q + (bos * H + i_h) * D
            do_base = do + (bos * H + i_h) * D
            lse_base = lse + i_h.to(tl.int64) * N + bos
            delta_base = delta + i_h.to(tl.int64) * N + bos
            for m0 in range(start, c, BM):
                b_dk, b_dv = _dkdv_tile(
                    b_dk,
                    b_dv,
                    b_k,
                    b_v,
                    q_base,
                    do_base,
                    lse_base,
                    delta_base,
                    o_s,
                    m0,
                    o_m,
                    o_qd,
                    m_d,
                    seq_len,
                    window,
                    qk_scale,
                    q_desc,
                    do_desc,
                    bos.to(tl.int32),
                    i_h * D,
                    H,
                    D,
                    True,
                    MASK_D,
                    USE_DESC,
                )
            for m0 in range(c, d, BM):
                b_dk, b_dv = _dkdv_tile(
                    b_dk,
                    b_dv,
                    b_k,
                    b_v,
                    q_base,
                    do_base,
                    lse_base,
                    delta_base,
                    o_s,
                    m0,
                    o_m,
                    o_qd,
                    m_d,
                    seq_len,
                    window,
                    qk_scale,
                    q_desc,
                    do_desc,
                    bos.to(tl.int32),
                    i_h * D,
                    H,
                    D,
                    False,
                    MASK_D,
                    USE_DESC,
                )
            for m0 in range(d, e, BM):
                b_dk, b_dv = _dkdv_tile(
                    b_dk,
                    b_dv,
                    b_k,
                    b_v,
                    q_base,
                    do_base,
                    lse_base,
                    delta_base,
                    o_s,
                    m0,
                    o_m,
                    o_qd,
                    m_d,
                    seq_len,
                    window,
                    qk_scale,
                    q_desc,
                    do_desc,
                    bos.to(tl.int32),
                    i_h * D,
                    H,
                    D,
                    True,
                    MASK_D,
                    USE_DESC,
                )
        if S > 0:  # noqa: SIM102 (compile-time test outside, run-time test inside)
            if n0 < k_lo + S:
                o_j = o_s - k_lo
                m_j = (o_j >= 0) & (o_j < S) & (o_s < k_hi)
                p_j = (i_seq.to(tl.int64) * HKV + i_hkv) * S * D + o_j[:, None] * D + o_d[None, :]
                m_jd = m_j[:, None] & m_d[None, :]
                b_dk += tl.load(sink_dk + p_j, mask=m_jd, other=0.0)
                b_dv += tl.load(sink_dv + p_j, mask=m_jd, other=0.0)
    # keys outside [k_lo, k_hi) are padding: no gradient
    m_valid = (o_s >= k_lo) & (o_s < k_hi)
    b_dk = tl.where(m_valid[:, None], b_dk * scale, 0.0)
    b_dv = tl.where(m_valid[:, None], b_dv, 0.0)
    m_store = m_s[:, None] & m_d[None, :]
    tl.store(dk + p_k, b_dk.to(dk.dtype.element_ty), mask=m_store)
    tl.store(dv + p_k, b_dv.to(dv.dtype.element_ty), mask=m_store)


@triton.jit(do_not_specialize=["query_start", "Tq", "Tk", "window", "split_len"])
def sliding_decode_kernel(
    q,
    k,
    v,
    sink_k,
    sink_v,
    sink_index,
    first_index,
    o_part,
    lse_part,
    scale,
    window,
    query_start,
    Tq,
    Tk,
    split_len,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    H: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    S: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BS: tl.constexpr,
    BD: tl.constexpr,
    HAS_FIRST: tl.constexpr,
):
    """One key split of a few queries against a bounded cache, for one kv head: rows are (query, head of the
    group) pairs, so the group's queries share each key tile. Writes the split's normalised output and lse.
    Cache positions are relative to its first key (absolute index query_start + Tq - Tk)."""
    i_split, i_r, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_hkv = i_bh // HKV, i_bh % HKV
    G: tl.constexpr = H // HKV
    o_r = i_r * BM + tl.arange(0, BM)
    m_r = o_r < Tq * G
    o_i = o_r // G
    o_h = i_hkv * G + o_r % G
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    p_q = ((i_b.to(tl.int64) * Tq + o_i) * H + o_h)[:, None] * D + o_d[None, :]
    # [BM, BD]
    b_q = tl.load(q + p_q, mask=m_r[:, None] & m_d[None, :], other=0.0)
    qk_scale = scale * LOG2E
    b_m = tl.full([BM], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([BM, BD], dtype=tl.float32)

    if S > 0:  # noqa: SIM102 (compile-time test outside, run-time test inside)
        if i_split == 0:
            o_j = tl.arange(0, BS)
            m_j = o_j < S
            b_idx = tl.load(sink_index + i_b * S + o_j, mask=m_j, other=-1).to(tl.int32)
            m_j = m_j & (b_idx >= 0)
            p_s = ((i_b * S + o_j) * HKV + i_hkv)[:, None] * D + o_d[None, :]
            b_sk = tl.load(sink_k + p_s, mask=m_j[:, None] & m_d[None, :], other=0.0)
            b_sv = tl.load(sink_v + p_s, mask=m_j[:, None] & m_d[None, :], other=0.0)
            b_ss = tl.dot(b_q, tl.trans(b_sk.to(b_q.dtype))) * qk_scale
            # absolute positions: the sinks' indices are absolute
            m_ts = ((query_start + o_i)[:, None] - b_idx[None, :] >= window) & m_j[None, :] & m_r[:, None]
            b_ss = tl.where(m_ts, b_ss, float("-inf"))
            b_m = tl.max(b_ss, 1)
            b_sp = tl.exp2(b_ss - tl.where(b_m == float("-inf"), 0.0, b_m)[:, None])
            b_l = tl.sum(b_sp, 1)
            b_acc = tl.dot(b_sp.to(b_q.dtype), b_sv.to(b_q.dtype))

    # [BM] query positions in the cache; keys of this split that the tile's queries can see
    o_t = Tk - Tq + o_i
    t_lo = Tk - Tq + i_r * BM // G
    t_hi = tl.minimum(Tk - Tq + ((i_r + 1) * BM - 1) // G, Tk - 1)
    lo = tl.maximum(tl.maximum(i_split * split_len, t_lo - window + 1), 0)
    if HAS_FIRST:
        k_first = tl.load(first_index + i_b).to(tl.int32) - (query_start + Tq - Tk)
        lo = tl.maximum(lo, k_first)
    hi = tl.minimum(tl.minimum((i_split + 1) * split_len, Tk), t_hi + 1)
    k_base = k + i_b.to(tl.int64) * stride_kb + i_hkv * stride_kh
    v_base = v + i_b.to(tl.int64) * stride_vb + i_hkv * stride_vh
    for n0 in range(lo, hi, BN):
        o_n = n0 + tl.arange(0, BN)
        m_n = o_n < hi
        b_k = tl.load(k_base + o_n[:, None] * stride_kt + o_d[None, :], mask=m_n[:, None] & m_d[None, :], other=0.0)
        b_v = tl.load(v_base + o_n[:, None] * stride_vt + o_d[None, :], mask=m_n[:, None] & m_d[None, :], other=0.0)
        b_s = tl.dot(b_q, tl.trans(b_k.to(b_q.dtype))) * qk_scale
        # keys before `lo` (padding) never enter: o_n >= lo
        dist = o_t[:, None] - o_n[None, :]
        b_s = tl.where((dist >= 0) & (dist < window) & m_n[None, :], b_s, float("-inf"))
        b_mn = tl.maximum(b_m, tl.max(b_s, 1))
        b_ms = tl.where(b_mn == float("-inf"), 0.0, b_mn)
        b_p = tl.exp2(b_s - b_ms[:, None])
        b_alpha = tl.exp2(b_m - b_ms)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_acc = tl.dot(b_p.to(b_q.dtype), b_v.to(b_q.dtype), b_acc * b_alpha[:, None])
        b_m = b_mn

    m_any = b_l > 0.0
    b_o = b_acc / tl.where(m_any, b_l, 1.0)[:, None]
    b_lse = tl.where(m_any, b_m + tl.log2(tl.where(m_any, b_l, 1.0)), float("-inf"))
    # [B * HKV, row tiles, splits, BM, BD]
    i_part = (i_bh.to(tl.int64) * tl.num_programs(1) + i_r) * tl.num_programs(0) + i_split
    tl.store(o_part + i_part * BM * BD + tl.arange(0, BM)[:, None] * BD + o_d[None, :], b_o)
    tl.store(lse_part + i_part * BM + tl.arange(0, BM), b_lse)


@triton.jit
def sliding_decode_combine_kernel(
    o_part,
    lse_part,
    sink_logits,
    o,
    Tq,
    num_splits,
    H: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BM: tl.constexpr,
    BD: tl.constexpr,
    HAS_SINK_LOGITS: tl.constexpr,
):
    """o = sum over splits of exp2(lse_split - lse) o_split, with the sink logit in the denominator."""
    i_r, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_hkv = i_bh // HKV, i_bh % HKV
    G: tl.constexpr = H // HKV
    o_m = tl.arange(0, BM)
    o_r = i_r * BM + o_m
    o_h = i_hkv * G + o_r % G
    o_d = tl.arange(0, BD)
    base = (i_bh.to(tl.int64) * tl.num_programs(0) + i_r) * num_splits
    if HAS_SINK_LOGITS:
        b_m = tl.load(sink_logits + o_h).to(tl.float32) * LOG2E
        b_l = tl.full([BM], 1.0, dtype=tl.float32)
    else:
        b_m = tl.full([BM], float("-inf"), dtype=tl.float32)
        b_l = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([BM, BD], dtype=tl.float32)
    for i_split in range(num_splits):
        b_lse = tl.load(lse_part + (base + i_split) * BM + o_m)
        b_o = tl.load(o_part + (base + i_split) * BM * BD + o_m[:, None] * BD + o_d[None, :])
        b_mn = tl.maximum(b_m, b_lse)
        b_ms = tl.where(b_mn == float("-inf"), 0.0, b_mn)
        b_alpha = tl.exp2(b_m - b_ms)
        b_w = tl.exp2(b_lse - b_ms)
        b_l = b_l * b_alpha + b_w
        b_acc = b_acc * b_alpha[:, None] + b_w[:, None] * b_o
        b_m = b_mn
    b_o = b_acc / tl.where(b_l > 0.0, b_l, 1.0)[:, None]
    m_r = o_r < Tq * G
    p_o = ((i_b.to(tl.int64) * Tq + o_r // G) * H + o_h)[:, None] * D + o_d[None, :]
    tl.store(o + p_o, b_o.to(o.dtype.element_ty), mask=m_r[:, None] & (o_d < D)[None, :])
