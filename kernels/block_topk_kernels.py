"""Triton kernels of block-sparse top-k attention (host side: `block_topk.py`).

Sequences are packed along T (a batch is one packed row) and cut into blocks of BS tokens from each sequence start.
Query block i reads its own block (causal), block 0 (KEEP_FIRST, i > 0) and up to TOPK earlier blocks listed in
`block_indices[i, h, :]` (ascending, -1 = empty, empty slots last). One kv head's selection serves its GQA group.

  block_pool_kernel        means of every complete block: keys, and queries over the group's heads (fp32);
  block_rotary_pool_kernel the rotary embedding of q and k (a dense batch) with the same means in the same pass;
  block_select_kernel      scores qbar[i - 1] . kbar[j] for j < i and keeps the top TOPK per query block and kv head:
                           a bound from per-lane maxima, then one sort of the candidates at or above it;
  block_attn_fwd_kernel    one program per (query block, kv head, row tile): flash-style online softmax over the
                           selected blocks; each block's keys/values are loaded once for the tile's BM query rows;
  block_attn_bwd_dq_kernel the same loop for dq;
  block_attn_bwd_dkv_kernel one program per (kv block, kv head, list chunk): the query blocks that read the block
                           (transposed selection, built on the host side), dk/dv added atomically in fp32.

A row tile holds GH heads of the group times the BS tokens of the block (BM = next power of two of GH * BS); row r
is head r // BS, token r % BS. Log-sum-exps are stored in base 2.

Layouts: q, o, do `[T, H, D]`; k, v `[T, HKV, D]`; lse, delta `[T, H]`; pooled `[NB, HKV, D]`; block tables
`blocks [NB, 2]` (sequence, block within it) and `cu_seqlens [N + 1]`.
"""

try:
    import triton
    import triton.language as tl
except ImportError as error:  # the importer falls back to the torch reference
    raise ImportError("the block top-k kernels need triton (`pip install triton`)") from error

from .decode_attention import masked_attention_step
from .decoder_fusion import rotate_half_rounded


@triton.jit
def _locate_block(i_b, blocks, cu_seqlens):
    """(first token of the sequence, its length, block index inside it) of global block `i_b`."""
    i_n = tl.load(blocks + i_b * 2).to(tl.int64)
    i_c = tl.load(blocks + i_b * 2 + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    seq_len = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    return bos, seq_len, i_c


@triton.jit
def block_pool_kernel(
    q,
    k,
    qbar,
    kbar,
    blocks,
    cu_seqlens,
    H: tl.constexpr,
    HKV: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    BS: tl.constexpr,
    BR: tl.constexpr,
):
    """qbar[b, h] = mean of block b's queries over its tokens and the group's heads; kbar[b, h] = mean key."""
    i_b, i_h = tl.program_id(0), tl.program_id(1)
    bos, seq_len, i_c = _locate_block(i_b, blocks, cu_seqlens)
    if (i_c + 1) * BS <= seq_len:
        o_r = tl.arange(0, BR).to(tl.int64)
        o_g = tl.arange(0, GP)
        o_d = tl.arange(0, BD)
        m_d = o_d < D
        # [GP, BD]: the group's heads of one token are contiguous, so each token's rows load as one segment
        m_gd = (o_g < G)[:, None] & m_d[None, :]
        o_gd = o_g[:, None] * D + o_d[None, :]
        # elementwise sums in the loop, one reduction at the end (no cross-warp reduction per step)
        b_qs = tl.zeros([BR, GP, BD], dtype=tl.float32)
        b_ks = tl.zeros([BR, BD], dtype=tl.float32)
        for r0 in range(0, BS, BR):
            o_t = bos + i_c * BS + r0 + o_r
            # [BR, GP, BD]
            b_q = tl.load(q + (o_t * H + i_h * G)[:, None, None] * D + o_gd[None, :, :], mask=m_gd[None], other=0.0)
            b_qs += b_q.to(tl.float32)
            b_k = tl.load(k + (o_t * HKV + i_h)[:, None] * D + o_d[None, :], mask=m_d[None, :], other=0.0)
            b_ks += b_k.to(tl.float32)
        o_out = (i_b.to(tl.int64) * HKV + i_h) * D + o_d
        tl.store(qbar + o_out, tl.sum(tl.sum(b_qs, 0), 0) / (BS * G), mask=m_d)
        tl.store(kbar + o_out, tl.sum(b_ks, 0) / BS, mask=m_d)


@triton.jit
def block_rotary_pool_kernel(
    q,  # [B, T, H, D], last dim contiguous
    k,  # [B, T, HKV, D], last dim contiguous
    cos,  # [B or 1, T, D]
    sin,  # [B or 1, T, D]
    q_out,  # [B, T, H, D] contiguous
    k_out,  # [B, T, HKV, D] contiguous
    qbar,  # [B * NB, HKV, D] fp32
    kbar,  # [B * NB, HKV, D] fp32
    T,
    NB,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_cb,
    stride_ct,
    H: tl.constexpr,
    HKV: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    HALF: tl.constexpr,
    HP: tl.constexpr,
    BS: tl.constexpr,
    BR: tl.constexpr,
):
    """The rotary embedding of one block's queries (the group's heads) and keys, written out, and the block means of
    the rotated values as `block_pool_kernel` computes them from the written tensors. An incomplete block (the last
    of a row) gets its query sum / (BS * G) and a zero key mean."""
    i_blk, i_h = tl.program_id(0), tl.program_id(1)
    i_b = (i_blk // NB).to(tl.int64)
    i_c = (i_blk % NB).to(tl.int64)
    o_r = tl.arange(0, BR).to(tl.int64)
    o_g = tl.arange(0, GP)
    o_d = tl.arange(0, HP)
    m_d = o_d < HALF
    m_g = o_g < G
    heads = i_h * G + o_g
    dtype = q_out.dtype.element_ty
    b_q1 = tl.zeros([BR, GP, HP], dtype=tl.float32)
    b_q2 = tl.zeros([BR, GP, HP], dtype=tl.float32)
    b_k1 = tl.zeros([BR, HP], dtype=tl.float32)
    b_k2 = tl.zeros([BR, HP], dtype=tl.float32)
    for r0 in range(0, BS, BR):
        t = i_c * BS + r0 + o_r
        m_td = (t < T)[:, None] & m_d[None, :]
        # [BR, HP] halves of cos and sin, shared by every head of the token
        o_c = i_b * stride_cb + t[:, None] * stride_ct + o_d[None, :]
        c1 = tl.load(cos + o_c, mask=m_td, other=0.0).to(tl.float32)
        c2 = tl.load(cos + o_c + HALF, mask=m_td, other=0.0).to(tl.float32)
        s1 = tl.load(sin + o_c, mask=m_td, other=0.0).to(tl.float32)
        s2 = tl.load(sin + o_c + HALF, mask=m_td, other=0.0).to(tl.float32)
        m_q = m_td[:, None, :] & m_g[None, :, None]
        o_q = i_b * stride_qb + t[:, None, None] * stride_qt + heads[None, :, None] * stride_qh + o_d[None, None, :]
        x1 = tl.load(q + o_q, mask=m_q, other=0.0).to(tl.float32)
        x2 = tl.load(q + o_q + HALF, mask=m_q, other=0.0).to(tl.float32)
        y1, y2 = rotate_half_rounded(x1, x2, c1[:, None, :], c2[:, None, :], s1[:, None, :], s2[:, None, :], dtype)
        o_qo = ((i_b * T + t)[:, None, None] * H + heads[None, :, None]) * (2 * HALF) + o_d[None, None, :]
        tl.store(q_out + o_qo, y1, mask=m_q)
        tl.store(q_out + o_qo + HALF, y2, mask=m_q)
        b_q1 += y1.to(tl.float32)
        b_q2 += y2.to(tl.float32)
        o_k = i_b * stride_kb + t[:, None] * stride_kt + i_h * stride_kh + o_d[None, :]
        x1 = tl.load(k + o_k, mask=m_td, other=0.0).to(tl.float32)
        x2 = tl.load(k + o_k + HALF, mask=m_td, other=0.0).to(tl.float32)
        y1, y2 = rotate_half_rounded(x1, x2, c1, c2, s1, s2, dtype)
        o_ko = ((i_b * T + t)[:, None] * HKV + i_h) * (2 * HALF) + o_d[None, :]
        tl.store(k_out + o_ko, y1, mask=m_td)
        tl.store(k_out + o_ko + HALF, y2, mask=m_td)
        b_k1 += y1.to(tl.float32)
        b_k2 += y2.to(tl.float32)
    o_out = (i_blk.to(tl.int64) * HKV + i_h) * (2 * HALF) + o_d
    tl.store(qbar + o_out, tl.sum(tl.sum(b_q1, 0), 0) / (BS * G), mask=m_d)
    tl.store(qbar + o_out + HALF, tl.sum(tl.sum(b_q2, 0), 0) / (BS * G), mask=m_d)
    # an incomplete block has no mean key yet (zeros, as in the decode state)
    complete = (i_c + 1) * BS <= T
    tl.store(kbar + o_out, tl.where(complete, tl.sum(b_k1, 0) / BS, 0.0), mask=m_d)
    tl.store(kbar + o_out + HALF, tl.where(complete, tl.sum(b_k2, 0) / BS, 0.0), mask=m_d)


@triton.jit
def _insert(b_val, b_idx, b_top, j_top):
    """Puts (b_top, j_top) `[BQ]` into the running top-k (b_val, b_idx) `[BQ, KP]` where it beats the minimum:
    the evicted entry is the lowest value, among equal values the highest index (lower indices win ties)."""
    b_min = tl.min(b_val, 1)
    evict = tl.max(tl.where(b_val == b_min[:, None], b_idx, -2147483647), 1)
    take = (b_idx == evict[:, None]) & (b_val == b_min[:, None]) & (b_top > b_min)[:, None]
    return tl.where(take, b_top[:, None], b_val), tl.where(take, j_top[:, None], b_idx)


@triton.jit
def _store_selection(
    block_indices, b_val, b_idx, first, o_i, m_i, i_h, HKV: tl.constexpr, TOPK: tl.constexpr, KP: tl.constexpr
):
    """Stores the running top-k sorted by block index, -1 for empty slots."""
    o_k = tl.arange(0, KP)
    big = 2147483647
    b_key = tl.where((b_val > float("-inf")) & (b_val < float("inf")), b_idx, big)
    b_key = tl.sort(b_key, 1)
    b_key = tl.where(b_key == big, -1, b_key)
    p_o = block_indices + ((first + o_i) * HKV + i_h)[:, None] * TOPK + o_k[None, :]
    tl.store(p_o, b_key, mask=m_i[:, None] & (o_k < TOPK)[None, :])


@triton.jit
def _select_tile(tiles, first_blocks, cu_seqlens, i_t, BS: tl.constexpr, BQ: tl.constexpr):
    """(first global block of the sequence, its block count, first query block of tile i_t, the tile's query blocks
    o_i [BQ], their validity)."""
    i_n = tl.load(tiles + i_t * 2).to(tl.int64)
    i_c0 = tl.load(tiles + i_t * 2 + 1).to(tl.int64)
    first = tl.load(first_blocks + i_n).to(tl.int64)
    seq_len = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - tl.load(cu_seqlens + i_n).to(tl.int64)
    num_blocks = tl.cdiv(seq_len, BS)
    o_i = i_c0 + tl.arange(0, BQ)
    return first, num_blocks, i_c0, o_i, o_i < num_blocks


@triton.jit
def _chunk_scores(
    b_q, kbar, first, o_i, m_i, i_h, j0, j_hi, HKV: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr
):
    """[BQ, BN] scores qbar[i - 1] . kbar[j] of the candidates j = j0 ... j0 + BN - 1 (-inf where j >= i or
    j >= j_hi), and their block indices [BN]."""
    o_j = j0 + tl.arange(0, BN)
    o_d = tl.arange(0, BD)
    p_k = kbar + ((first + o_j) * HKV + i_h)[:, None] * D + o_d[None, :]
    b_k = tl.load(p_k, mask=(o_j < j_hi)[:, None] & (o_d < D)[None, :], other=0.0)
    # fp32-accurate scores (3xTF32; plain tf32 would differ from decode's fp32 scores at 1e-3)
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision="tf32x3")
    return tl.where((o_j[None, :] < o_i[:, None]) & (o_j < j_hi)[None, :] & m_i[:, None], b_s, float("-inf")), o_j


@triton.jit
def _top_k_rounds(
    b_q,
    kbar,
    first,
    o_i,
    m_i,
    i_h,
    j_lo,
    j_hi,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    BQ: tl.constexpr,
    BN: tl.constexpr,
    TOPK: tl.constexpr,
    KP: tl.constexpr,
):
    """Running top-k (values, block indices) `[BQ, KP]` over every candidate: per chunk, `top_k` rounds at most of
    max/argmax against the buffer's minimum, skipped when no row can improve."""
    o_k = tl.arange(0, KP)
    o_n = tl.arange(0, BN)
    # slots past TOPK hold +inf so that they are never evicted
    b_val = tl.where(o_k < TOPK, float("-inf"), float("inf")).to(tl.float32)[None, :] + tl.zeros([BQ, KP], tl.float32)
    b_idx = (-1 - o_k)[None, :] + tl.zeros([BQ, KP], tl.int32)
    for j0 in range(j_lo, j_hi, BN):
        b_s, _ = _chunk_scores(b_q, kbar, first, o_i, m_i, i_h, j0, j_hi, HKV, D, BD, BN)
        # candidates that beat their row's current minimum bound the rounds needed (the minimum only grows)
        better = tl.sum((b_s > tl.min(b_val, 1)[:, None]).to(tl.int32), 1)
        for _round in range(tl.minimum(tl.max(better, 0), TOPK)):
            # ties within the chunk: the lowest position, i.e. the lowest block index
            b_top, a_top = tl.max(b_s, 1, return_indices=True, return_indices_tie_break_left=True)
            b_val, b_idx = _insert(b_val, b_idx, b_top, (j0 + a_top).to(tl.int32))
            b_s = tl.where(o_n[None, :] == a_top[:, None], float("-inf"), b_s)
    return b_val, b_idx


@triton.jit
def block_select_kernel(
    qbar,
    kbar,
    block_indices,
    scratch,
    tiles,
    first_blocks,
    cu_seqlens,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    BS: tl.constexpr,
    BQ: tl.constexpr,
    BN: tl.constexpr,
    TOPK: tl.constexpr,
    KP: tl.constexpr,
    CAP: tl.constexpr,
    KEEP_FIRST: tl.constexpr,
):
    """Top-TOPK key blocks j < i (j >= 1 with KEEP_FIRST) by qbar[i - 1] . kbar[j], for BQ query blocks of one
    sequence and one kv head. Ties go to the lower index; the result is sorted ascending, -1 padded.

    Two passes over the candidates. The first keeps, per row, the maximum of each of the BN lanes (candidate j's
    lane is its position in its chunk); the lanes hold distinct candidates, so the TOPK-th largest lane maximum is a
    lower bound of the TOPK-th largest score. The second writes every candidate at or above that bound (about TOPK
    of them for unordered scores) to the row's CAP slots of `scratch` as one int64 key (score order, then lower
    index), and one sort picks the top TOPK. A row with more than CAP candidates at the bound (many equal scores)
    sends its tile to the rounds of `_top_k_rounds` instead."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    first, num_blocks, i_c0, o_i, m_i = _select_tile(tiles, first_blocks, cu_seqlens, i_t, BS, BQ)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    # [BQ, BD] the query mean that selects for each block: its predecessor's
    p_q = qbar + ((first + o_i - 1) * HKV + i_h)[:, None] * D + o_d[None, :]
    b_q = tl.load(p_q, mask=(m_i & (o_i >= 1))[:, None] & m_d[None, :], other=0.0)
    j_lo = 1 if KEEP_FIRST else 0
    # candidates j < i for the last valid query block of the tile
    j_hi = tl.minimum(i_c0 + BQ, num_blocks) - 1
    o_n = tl.arange(0, BN)

    b_lane = tl.full([BQ, BN], float("-inf"), tl.float32)
    for j0 in range(j_lo, j_hi, BN):
        b_s, _ = _chunk_scores(b_q, kbar, first, o_i, m_i, i_h, j0, j_hi, HKV, D, BD, BN)
        b_lane = tl.maximum(b_lane, b_s)
    # -inf when the row has fewer than TOPK candidates: then every candidate is kept
    b_bound = tl.max(tl.where(o_n[None, :] == BN - TOPK, tl.sort(b_lane, 1), float("-inf")), 1)

    o_q = tl.arange(0, BQ)
    p_row = scratch + ((i_t * HKV + i_h) * BQ + o_q).to(tl.int64)[:, None] * CAP
    b_cnt = tl.zeros([BQ], dtype=tl.int32)
    for j0 in range(j_lo, j_hi, BN):
        b_s, o_j = _chunk_scores(b_q, kbar, first, o_i, m_i, i_h, j0, j_hi, HKV, D, BD, BN)
        keep = (b_s > float("-inf")) & (b_s >= b_bound[:, None])
        b_keep = keep.to(tl.int32)
        b_pos = b_cnt[:, None] + tl.cumsum(b_keep, 1) - 1
        # order-preserving int32 image of the fp32 score, then 2^31 - 1 - j (lower index first among equal scores)
        b_bits = b_s.to(tl.int32, bitcast=True)
        b_ord = tl.where(b_bits >= 0, b_bits, b_bits ^ 0x7FFFFFFF)
        b_key = (b_ord.to(tl.int64) << 32) | (2147483647 - o_j)[None, :].to(tl.int64)
        tl.store(p_row + b_pos, b_key, mask=keep & (b_pos < CAP))
        b_cnt += tl.sum(b_keep, 1)

    if tl.max(b_cnt, 0) > CAP:
        b_val, b_idx = _top_k_rounds(b_q, kbar, first, o_i, m_i, i_h, j_lo, j_hi, HKV, D, BD, BQ, BN, TOPK, KP)
        _store_selection(block_indices, b_val, b_idx, first, o_i, m_i, i_h, HKV, TOPK, KP)
    else:
        # the stores above came from other threads of the program
        tl.debug_barrier()
        o_c = tl.arange(0, CAP)
        b_keys = tl.load(p_row + o_c[None, :], mask=o_c[None, :] < b_cnt[:, None], other=-9223372036854775808)
        # a full sort, not tl.topk: Triton 3.6 fails to compile tl.topk here for D = 64 on sm_90
        b_keys = tl.sort(b_keys, 1, descending=True)
        big = 2147483647
        b_sel = (2147483647 - (b_keys & 0xFFFFFFFF)).to(tl.int32)
        b_sel = tl.where((o_c[None, :] < TOPK) & (o_c[None, :] < b_cnt[:, None]), b_sel, big)
        b_sel = tl.sort(b_sel, 1)
        b_sel = tl.where(b_sel == big, -1, b_sel)
        p_o = block_indices + ((first + o_i) * HKV + i_h)[:, None] * TOPK + o_c[None, :]
        tl.store(p_o, b_sel, mask=m_i[:, None] & (o_c < TOPK)[None, :])


@triton.jit
def _row_tile(i_c, i_h, i_r, seq_len, BS: tl.constexpr, BM: tl.constexpr, G: tl.constexpr, GH: tl.constexpr):
    """(token inside the sequence, head, validity) of the BM rows of row tile i_r of kv head i_h, query block i_c."""
    o_r = tl.arange(0, BM)
    tok = i_c * BS + (o_r % BS)
    head = i_h * G + i_r * GH + o_r // BS
    return tok, head, (o_r // BS < GH) & (tok < seq_len)


@triton.jit
def _load_kv(k, v, bos, seq_len, i_j, i_h, HKV: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr):
    """[BS, BD] keys and values of block i_j (past the sequence end: zeros), and the key positions."""
    key = i_j * BS + tl.arange(0, BS)
    o_d = tl.arange(0, BD)
    m = (key < seq_len)[:, None] & (o_d < D)[None, :]
    o_kv = ((bos + key) * HKV + i_h)[:, None] * D + o_d[None, :]
    return tl.load(k + o_kv, mask=m, other=0.0), tl.load(v + o_kv, mask=m, other=0.0), key


@triton.jit
def _attend_block(
    b_q,
    b_acc,
    b_m,
    b_l,
    k,
    v,
    bos,
    seq_len,
    i_j,
    i_h,
    tok,
    qk_scale,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    BS: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    """One online-softmax step of the BM query rows over key block i_j."""
    b_k, b_v, key = _load_kv(k, v, bos, seq_len, i_j, i_h, HKV, D, BD, BS)
    # [BM, BS] in base-2 units
    b_s = tl.dot(b_q, tl.trans(b_k)) * qk_scale
    if CAUSAL:
        b_s = tl.where((key[None, :] <= tok[:, None]) & (key < seq_len)[None, :], b_s, float("-inf"))
    b_mn = tl.maximum(b_m, tl.max(b_s, 1))
    b_p = tl.exp2(b_s - b_mn[:, None])
    b_alpha = tl.exp2(b_m - b_mn)
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v)
    return b_acc, b_mn, b_l


@triton.jit
def _num_selected(block_indices, i_q, i_h, HKV: tl.constexpr, TOPK: tl.constexpr, KP: tl.constexpr):
    o_k = tl.arange(0, KP)
    b_sel = tl.load(block_indices + (i_q.to(tl.int64) * HKV + i_h) * TOPK + o_k, mask=o_k < TOPK, other=-1)
    return tl.sum((b_sel >= 0).to(tl.int32), 0)


@triton.jit
def block_attn_fwd_kernel(
    q,
    k,
    v,
    o,
    lse,
    block_indices,
    blocks,
    cu_seqlens,
    scale,
    H: tl.constexpr,
    HKV: tl.constexpr,
    G: tl.constexpr,
    GH: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    BS: tl.constexpr,
    BM: tl.constexpr,
    TOPK: tl.constexpr,
    KP: tl.constexpr,
    KEEP_FIRST: tl.constexpr,
):
    i_q, i_hr = tl.program_id(0), tl.program_id(1)
    i_h, i_r = i_hr // (G // GH), i_hr % (G // GH)
    bos, seq_len, i_c = _locate_block(i_q, blocks, cu_seqlens)
    tok, head, m_r = _row_tile(i_c, i_h, i_r, seq_len, BS, BM, G, GH)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    o_q = ((bos + tok) * H + head)[:, None] * D + o_d[None, :]
    b_q = tl.load(q + o_q, mask=m_r[:, None] & m_d[None, :], other=0.0)
    qk_scale = scale * 1.4426950408889634
    b_m = tl.full([BM], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([BM, BD], dtype=tl.float32)
    if (i_c > 0) & KEEP_FIRST:
        b_acc, b_m, b_l = _attend_block(
            b_q, b_acc, b_m, b_l, k, v, bos, seq_len, 0, i_h, tok, qk_scale, HKV, D, BD, BS, False
        )
    num_selected = _num_selected(block_indices, i_q, i_h, HKV, TOPK, KP)
    for i_s in range(num_selected):
        i_j = tl.load(block_indices + (i_q.to(tl.int64) * HKV + i_h) * TOPK + i_s).to(tl.int64)
        b_acc, b_m, b_l = _attend_block(
            b_q, b_acc, b_m, b_l, k, v, bos, seq_len, i_j, i_h, tok, qk_scale, HKV, D, BD, BS, False
        )
    b_acc, b_m, b_l = _attend_block(
        b_q, b_acc, b_m, b_l, k, v, bos, seq_len, i_c, i_h, tok, qk_scale, HKV, D, BD, BS, True
    )
    b_o = b_acc / b_l[:, None]
    tl.store(o + o_q, b_o.to(o.dtype.element_ty), mask=m_r[:, None] & m_d[None, :])
    tl.store(lse + (bos + tok) * H + head, b_m + tl.log2(b_l), mask=m_r)


@triton.jit
def _dq_block(
    b_q,
    b_do,
    b_lse,
    b_delta,
    b_dq,
    k,
    v,
    bos,
    seq_len,
    i_j,
    i_h,
    tok,
    qk_scale,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    BS: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    b_k, b_v, key = _load_kv(k, v, bos, seq_len, i_j, i_h, HKV, D, BD, BS)
    b_p = tl.exp2(tl.dot(b_q, tl.trans(b_k)) * qk_scale - b_lse[:, None])
    if CAUSAL:
        b_p = tl.where((key[None, :] <= tok[:, None]) & (key < seq_len)[None, :], b_p, 0.0)
    b_dp = tl.dot(b_do, tl.trans(b_v))
    b_ds = b_p * (b_dp - b_delta[:, None])
    return b_dq + tl.dot(b_ds.to(b_k.dtype), b_k)


@triton.jit
def block_attn_bwd_dq_kernel(
    q,
    k,
    v,
    do,
    lse,
    delta,
    dq,
    block_indices,
    blocks,
    cu_seqlens,
    scale,
    H: tl.constexpr,
    HKV: tl.constexpr,
    G: tl.constexpr,
    GH: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    BS: tl.constexpr,
    BM: tl.constexpr,
    TOPK: tl.constexpr,
    KP: tl.constexpr,
    KEEP_FIRST: tl.constexpr,
):
    i_q, i_hr = tl.program_id(0), tl.program_id(1)
    i_h, i_r = i_hr // (G // GH), i_hr % (G // GH)
    bos, seq_len, i_c = _locate_block(i_q, blocks, cu_seqlens)
    tok, head, m_r = _row_tile(i_c, i_h, i_r, seq_len, BS, BM, G, GH)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    o_q = ((bos + tok) * H + head)[:, None] * D + o_d[None, :]
    m_q = m_r[:, None] & m_d[None, :]
    b_q = tl.load(q + o_q, mask=m_q, other=0.0)
    b_do = tl.load(do + o_q, mask=m_q, other=0.0)
    b_lse = tl.load(lse + (bos + tok) * H + head, mask=m_r, other=0.0)
    b_delta = tl.load(delta + (bos + tok) * H + head, mask=m_r, other=0.0)
    qk_scale = scale * 1.4426950408889634
    b_dq = tl.zeros([BM, BD], dtype=tl.float32)
    if (i_c > 0) & KEEP_FIRST:
        b_dq = _dq_block(
            b_q, b_do, b_lse, b_delta, b_dq, k, v, bos, seq_len, 0, i_h, tok, qk_scale, HKV, D, BD, BS, False
        )
    num_selected = _num_selected(block_indices, i_q, i_h, HKV, TOPK, KP)
    for i_s in range(num_selected):
        i_j = tl.load(block_indices + (i_q.to(tl.int64) * HKV + i_h) * TOPK + i_s).to(tl.int64)
        b_dq = _dq_block(
            b_q, b_do, b_lse, b_delta, b_dq, k, v, bos, seq_len, i_j, i_h, tok, qk_scale, HKV, D, BD, BS, False
        )
    b_dq = _dq_block(b_q, b_do, b_lse, b_delta, b_dq, k, v, bos, seq_len, i_c, i_h, tok, qk_scale, HKV, D, BD, BS, True)
    tl.store(dq + o_q, (b_dq * scale).to(dq.dtype.element_ty), mask=m_q)


@triton.jit
def block_attn_bwd_dkv_kernel(
    q,
    k,
    v,
    do,
    lse,
    delta,
    dk,
    dv,
    items,
    query_lists,
    blocks,
    cu_seqlens,
    scale,
    NB,
    NW,
    H: tl.constexpr,
    HKV: tl.constexpr,
    G: tl.constexpr,
    GH: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    BS: tl.constexpr,
    BM: tl.constexpr,
):
    """dk, dv of one key block and kv head from a chunk of the query blocks that read it: items[w] = (kv head *
    NB + key block, first entry in query_lists, entry count). A key block with one item stores its fp32 dk/dv; one
    split over several items (long lists) adds them atomically."""
    i_w = tl.program_id(0)
    i_key = tl.load(items + i_w * 3).to(tl.int64)
    i_start = tl.load(items + i_w * 3 + 1).to(tl.int64)
    count = tl.load(items + i_w * 3 + 2)
    i_h, i_j = i_key // NB, i_key % NB
    bos, seq_len, i_cj = _locate_block(i_j, blocks, cu_seqlens)
    b_k, b_v, key = _load_kv(k, v, bos, seq_len, i_cj, i_h, HKV, D, BD, BS)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    qk_scale = scale * 1.4426950408889634
    b_dk = tl.zeros([BS, BD], dtype=tl.float32)
    b_dv = tl.zeros([BS, BD], dtype=tl.float32)
    for i_e in range(count):
        i_q = tl.load(query_lists + i_start + i_e).to(tl.int64)
        i_cq = tl.load(blocks + i_q * 2 + 1).to(tl.int64)
        for i_r in range(G // GH):
            tok, head, m_r = _row_tile(i_cq, i_h, i_r, seq_len, BS, BM, G, GH)
            o_q = ((bos + tok) * H + head)[:, None] * D + o_d[None, :]
            m_q = m_r[:, None] & m_d[None, :]
            b_q = tl.load(q + o_q, mask=m_q, other=0.0)
            b_do = tl.load(do + o_q, mask=m_q, other=0.0)
            b_lse = tl.load(lse + (bos + tok) * H + head, mask=m_r, other=float("inf"))
            b_delta = tl.load(delta + (bos + tok) * H + head, mask=m_r, other=0.0)
            # [BM, BS]; the own block is causal, every other block complete and fully visible
            b_p = tl.exp2(tl.dot(b_q, tl.trans(b_k)) * qk_scale - b_lse[:, None])
            visible = m_r[:, None] & ((key[None, :] <= tok[:, None]) | (i_q != i_j))
            b_p = tl.where(visible, b_p, 0.0)
            b_dv += tl.dot(tl.trans(b_p.to(b_do.dtype)), b_do)
            b_ds = b_p * (tl.dot(b_do, tl.trans(b_v)) - b_delta[:, None])
            b_dk += tl.dot(tl.trans(b_ds.to(b_q.dtype)), b_q)
    o_kv = ((bos + key) * HKV + i_h)[:, None] * D + o_d[None, :]
    m_kv = (key < seq_len)[:, None] & m_d[None, :]
    # the neighbouring items hold the same key block when its list was split
    alone = i_w >= 0
    if i_w > 0:
        alone = tl.load(items + (i_w - 1) * 3) != i_key
    if i_w < NW - 1:
        alone = alone & (tl.load(items + (i_w + 1) * 3) != i_key)
    if alone:
        tl.store(dk + o_kv, b_dk * scale, mask=m_kv)
        tl.store(dv + o_kv, b_dv, mask=m_kv)
    else:
        tl.atomic_add(dk + o_kv, b_dk * scale, mask=m_kv)
        tl.atomic_add(dv + o_kv, b_dv, mask=m_kv)


@triton.jit
def block_attn_bwd_delta_kernel(o, do, delta, N, D: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr):
    """delta[n] = sum_d o[n, d] * do[n, d] in fp32 over the N = T * H rows."""
    o_n = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    o_d = tl.arange(0, BD)
    m = (o_n < N)[:, None] & (o_d < D)[None, :]
    o_nd = o_n[:, None] * D + o_d[None, :]
    b_o = tl.load(o + o_nd, mask=m, other=0.0).to(tl.float32)
    b_do = tl.load(do + o_nd, mask=m, other=0.0).to(tl.float32)
    tl.store(delta + o_n, tl.sum(b_o * b_do, 1), mask=o_n < N)


@triton.jit(do_not_specialize=["total", "num_blocks"])
def block_topk_decode_scores_kernel(
    kbar,
    qbar,
    first_real,
    scores,
    total,
    num_blocks,
    stride_cb,
    stride_cj,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    BS: tl.constexpr,
    BC: tl.constexpr,
    KEEP_FIRST: tl.constexpr,
):
    """Decode step, selection scores: qbar . kbar[j] in fp32 for BC candidate blocks j < i (j >= 1 with KEEP_FIRST)
    of one (row, kv head), i the block of the token at cache index total - 1; -inf for the other slots of its
    `num_blocks`-long row of `scores`."""
    i_c, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // HKV, i_bh % HKV
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    # a row whose first real token comes later has rel < 0: no candidates
    rel = total - 1 - tl.load(first_real + i_b).to(tl.int64)
    i_blk = tl.where(rel >= 0, rel // BS, 0)
    o_j = i_c * BC + tl.arange(0, BC)
    m_j = (o_j >= (1 if KEEP_FIRST else 0)) & (o_j < i_blk)
    b_q = tl.load(qbar + i_bh * D + o_d, mask=m_d, other=0.0)
    p_c = kbar + i_b * stride_cb + i_h * D + o_j[:, None] * stride_cj + o_d[None, :]
    b_c = tl.load(p_c, mask=m_j[:, None] & m_d[None, :], other=0.0)
    b_s = tl.where(m_j, tl.sum(b_c * b_q[None, :], 1), float("-inf"))
    tl.store(scores + i_bh * num_blocks + o_j, b_s, mask=o_j < num_blocks)


@triton.jit
def _decode_load_block(k_base, v_base, stride_kt, stride_vt, i_j, num_valid, o_d, m_d, BS: tl.constexpr):
    """[BS, BD] keys and values of cache block i_j (its first num_valid tokens; zeros past them)."""
    o_t = tl.arange(0, BS)
    m_td = (o_t < num_valid)[:, None] & m_d[None, :]
    b_k = tl.load(k_base + (i_j * BS + o_t)[:, None] * stride_kt + o_d[None, :], mask=m_td, other=0.0)
    b_v = tl.load(v_base + (i_j * BS + o_t)[:, None] * stride_vt + o_d[None, :], mask=m_td, other=0.0)
    return b_k, b_v


@triton.jit
def _decode_entry(b_list, s):
    """Entry s of a [BL] block list (a scalar)."""
    return tl.sum(tl.where(tl.arange(0, b_list.shape[0]) == s, b_list, 0), 0).to(tl.int64)


@triton.jit(do_not_specialize=["total", "num_blocks"])
def block_topk_decode_kernel(
    q,
    k,
    v,
    o,
    kbar,
    qbar,
    qsum,
    new_qbar,
    new_qsum,
    first_real,
    scores,
    total,
    num_blocks,
    scale,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_ob,
    stride_oh,
    stride_cb,
    stride_cj,
    H: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    BS: tl.constexpr,
    BG: tl.constexpr,
    BN: tl.constexpr,
    NBP: tl.constexpr,
    TOPK: tl.constexpr,
    KEEP_FIRST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One decode step of one (row, kv head): the token at cache index total - 1 selects, attends and updates the
    block means, as `block_topk_cached_attention` does for one new token.

    Selection: the row's scores (`block_topk_decode_scores_kernel`), NBP at a time; TOPK rounds of max (the lowest
    index among equal maxima) per chunk, merged with the running list as int64 keys (score order, then lower
    index) by one sort, so ties go to the lower index. Attention: the G query heads (rows of a BG tile) over block
    0, the selected blocks and the own block up to the token, in ascending order, each block's keys and values
    loaded while the previous block is computed. State: the block's query sum gains the group's queries; when the
    token completes block i, its query mean becomes qbar and the mean of its keys kbar[i] (written in place; kbar has
    room for it). Rows whose first real token comes later give zeros and keep their state."""
    i_b, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    G: tl.constexpr = H // HKV
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    o_g = tl.arange(0, BG)
    m_qd = (o_g < G)[:, None] & m_d[None, :]
    # [BG, BD] the group's queries
    o_q = (i_h * G + o_g)[:, None]
    b_q = tl.load(q + i_b * stride_qb + o_q * stride_qh + o_d[None, :], mask=m_qd, other=0.0)
    p_o = o + i_b * stride_ob + o_q * stride_oh + o_d[None, :]
    p_state = (i_b * HKV + i_h) * D + o_d
    qk_scale = scale * 1.4426950408889634
    b_qbar = tl.load(qbar + p_state, mask=m_d, other=0.0)
    b_qsum = tl.load(qsum + p_state, mask=m_d, other=0.0)
    first = tl.load(first_real + i_b).to(tl.int64)
    rel = total - 1 - first
    if rel < 0:
        tl.store(p_o, tl.zeros([BG, BD], dtype=tl.float32).to(o.dtype.element_ty), mask=m_qd)
        tl.store(new_qbar + p_state, b_qbar, mask=m_d)
        tl.store(new_qsum + p_state, b_qsum, mask=m_d)
    else:
        i_blk = rel // BS
        k_base = k + i_b * stride_kb + i_h * stride_kh + first * stride_kt
        v_base = v + i_b * stride_vb + i_h * stride_vh + first * stride_vt
        o_n = tl.arange(0, BN)
        lowest = -9223372036854775808
        b_top = tl.full([BN], lowest, tl.int64)
        p_s = scores + (i_b * HKV + i_h) * num_blocks
        for j0 in range(0, i_blk, NBP):
            o_j = j0 + tl.arange(0, NBP)
            b_s = tl.load(p_s + o_j, mask=o_j < i_blk, other=float("-inf"))
            b_key = tl.full([BN], lowest, tl.int64)
            for r in range(TOPK):
                b_max, a_max = tl.max(b_s, 0, return_indices=True, return_indices_tie_break_left=True)
                # order-preserving int32 image of the fp32 score, then 2^31 - 1 - j (lower index first)
                bits = b_max.to(tl.int32, bitcast=True)
                key = (tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64) << 32) | (2147483647 - j0 - a_max)
                b_key = tl.where(o_n == r, tl.where(b_max > float("-inf"), key, lowest), b_key)
                b_s = tl.where(tl.arange(0, NBP) == a_max, float("-inf"), b_s)
            # the best BN of the running list and this chunk's: the first half of both, sorted
            b_both = tl.sort(tl.reshape(tl.join(b_top, b_key), [2 * BN]), descending=True)
            b_top, _ = tl.split(tl.permute(tl.reshape(b_both, [2, BN]), (1, 0)))

        # the blocks to read, ascending: block 0, the selected ones (all between), the own block (the last)
        big = 2147483647
        b_list = tl.where((o_n < TOPK) & (b_top != lowest), (2147483647 - (b_top & 0xFFFFFFFF)).to(tl.int32), big)
        if KEEP_FIRST:
            b_list = tl.where((o_n == TOPK) & (i_blk > 0), 0, b_list)
        b_list = tl.sort(tl.where(o_n == TOPK + 1, i_blk.to(tl.int32), b_list))
        num_list = tl.sum((b_list != big).to(tl.int32), 0)

        b_m = tl.full([BG], float("-inf"), dtype=tl.float32)
        b_l = tl.zeros([BG], dtype=tl.float32)
        b_acc = tl.zeros([BG, BD], dtype=tl.float32)
        # tokens of a block the token sees: all of them, but in its own block only those up to itself
        own_valid = rel - i_blk * BS + 1
        i_j = _decode_entry(b_list, 0)
        n_j = tl.where(i_j == i_blk, own_valid, BS)
        b_k, b_v = _decode_load_block(k_base, v_base, stride_kt, stride_vt, i_j, n_j, o_d, m_d, BS)
        for s in range(num_list):
            # the next block's loads go out before this block's products (the last iteration reloads the own block)
            i_next = tl.where(s + 1 < num_list, _decode_entry(b_list, s + 1), i_blk)
            n_next = tl.where(i_next == i_blk, own_valid, BS)
            b_kn, b_vn = _decode_load_block(k_base, v_base, stride_kt, stride_vt, i_next, n_next, o_d, m_d, BS)
            m_t = tl.arange(0, BS) < n_j
            b_acc, b_m, b_l = masked_attention_step(b_q, b_k, b_v, m_t, b_m, b_l, b_acc, qk_scale, PRECISION)
            b_k, b_v, n_j = b_kn, b_vn, n_next
        tl.store(p_o, (b_acc / b_l[:, None]).to(o.dtype.element_ty), mask=m_qd)

        b_sum = b_qsum + tl.sum(b_q.to(tl.float32), 0)
        if (rel + 1) % BS == 0:
            tl.store(new_qbar + p_state, b_sum / (BS * G), mask=m_d)
            tl.store(new_qsum + p_state, tl.zeros([BD], dtype=tl.float32), mask=m_d)
            # the own block is complete: the mean of its keys (b_k holds them after the last iteration)
            c_base = kbar + i_b * stride_cb + i_h * D
            tl.store(c_base + i_blk * stride_cj + o_d, tl.sum(b_k.to(tl.float32), 0) / BS, mask=m_d)
        else:
            tl.store(new_qbar + p_state, b_qbar, mask=m_d)
            tl.store(new_qsum + p_state, b_sum, mask=m_d)
