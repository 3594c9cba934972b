"""Block-sparse top-k attention (MoBA/NSA-style) on Triton kernels, with a backward and packed sequences.

    block_topk_select     which key blocks each query block reads: `[B, NQ, Hkv, top_k]` block indices
    block_topk_attention  causal softmax over each query block's own block, block 0 and its top-k blocks
    block_topk_rotary     the rotary embedding of q and k with the block means of the result, in one pass: the
                          selection then reads neither q nor k again (`block_means=` of the two ops above)
    block_topk_decode     one decode step against a cache: the selection's scores from the kept block means, then
                          selection, attention and the update of those means in a second kernel

Semantics are those of `hf_effattn.ops_reference.block_topk_select` / `block_topk_attention`: blocks of
`block_size` tokens from each sequence start; query block i scores key blocks j < i by the mean of block i - 1's
queries (over its tokens and the GQA group's heads) dotted with the mean key of block j, keeps the `top_k` best
(ties: lower index), always reads its own block (causal) and, with `keep_first_block`, block 0. One selection per kv
head serves its whole query group, and the selection is not differentiable.

Layout `[B, T, H, D]` for q and `[B, T, Hkv, D]` for k/v; `cu_seqlens` packs sequences along T with B = 1. A batch
is run as packed sequences, so every kernel sees one token axis.
"""

import functools
import itertools

import torch

from .block_topk_kernels import (
    block_attn_bwd_delta_kernel,
    block_attn_bwd_dkv_kernel,
    block_attn_bwd_dq_kernel,
    block_attn_fwd_kernel,
    block_pool_kernel,
    block_rotary_pool_kernel,
    block_select_kernel,
    block_topk_decode_kernel,
    block_topk_decode_scores_kernel,
    triton,
)

MAX_HEAD_DIM = 256
BLOCK_SIZES = (16, 32, 64, 128, 256)
# query blocks per selection program, candidate blocks per scoring step (also the lanes of the selection's bound),
# and the slots per query block for candidates at or above the bound (past them, the tile falls back to rounds)
SELECT_BQ, SELECT_BN, SELECT_CAP = 16, 64, 64
# query blocks per dk/dv program: longer lists (block 0 is read by every query block) are split and added atomically
DKV_QUERY_CHUNK = 32
# launch choices: rows (group heads x block tokens) and warps per program of the forward, dq and dk/dv kernels.
# Measured on an H100 (bf16, 32/8 heads, D = 128, block 64, T = 32k): the forward took 1.59 ms with the whole group
# in one program (256 rows, 16 warps), 1.85 ms with 8 warps and 1.96 ms with 128 rows / 4 warps; forward + backward
# took 10.3 ms with 64-row dk/dv tiles on 4 warps, 13.3 ms on 8 warps and 11.2 ms with 128 rows.
TUNING = {
    "fwd_rows": 256,
    "fwd_warps": None,  # None: `_warps(rows)`
    "fwd_stages": 2,
    "dq_rows": 256,
    "dq_warps": None,
    "dkv_rows": 64,
    "dkv_warps": 4,
    "pool_elems": 8192,  # elements of q per load in the block-mean pass
    "pool_warps": 4,
}


def _warps(rows: int) -> int:
    """Warps for a row tile: a 256-row tile (the whole group) runs as four warpgroups of 64 rows."""
    return 16 if rows >= 256 else 4


def _row_tiling(groups: int, block_size: int, max_rows: int) -> tuple[int, int]:
    """(heads per program GH, rows BM): the largest divisor of the group that fits `max_rows` with the block."""
    heads = max([d for d in range(1, groups + 1) if groups % d == 0 and d * block_size <= max_rows] or [1])
    return heads, triton.next_power_of_2(heads * block_size)


class _Layout:
    """Block tables of packed sequences, built on the device: `blocks [NB, 2]` (sequence, block inside it), each
    sequence's first block, and the selection tiles `[NT, 2]` (sequence, first block) of `SELECT_BQ` blocks."""

    def __init__(self, batch: int, seq_len: int, block_size: int, cu_seqlens: torch.Tensor | None, device):
        self.packed = cu_seqlens is not None
        if cu_seqlens is None:
            self.cu_seqlens = torch.arange(batch + 1, device=device, dtype=torch.int64) * seq_len
            num_seqs, per_row = batch, triton.cdiv(seq_len, block_size)
            counts = torch.full((batch,), per_row, dtype=torch.int64, device=device)
            self.num_blocks = batch * per_row
            self.num_tiles = batch * triton.cdiv(per_row, SELECT_BQ)
        else:
            self.cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int64).contiguous()
            num_seqs = self.cu_seqlens.numel() - 1
            counts = (self.cu_seqlens.diff() + block_size - 1) // block_size
            # one synchronisation: the grid sizes
            sizes = torch.stack([counts.sum(), ((counts + SELECT_BQ - 1) // SELECT_BQ).sum()])
            self.num_blocks, self.num_tiles = (int(x) for x in sizes.tolist())
        self.first_blocks = counts.cumsum(0) - counts
        self.blocks = self._table(counts, 1, num_seqs, self.num_blocks, device)
        tiles = self._table((counts + SELECT_BQ - 1) // SELECT_BQ, SELECT_BQ, num_seqs, self.num_tiles, device)
        # the last tiles of a sequence score the most candidates: launch them first so that they do not trail
        self.tiles = tiles.flip(0).contiguous()

    @staticmethod
    def _table(counts, step, num_seqs, total, device):
        """`[total, 2]` int32 rows (sequence n, step * c) for c < counts[n], sequence after sequence."""
        if total == 0:
            return torch.zeros(1, 2, dtype=torch.int32, device=device)
        seq = torch.repeat_interleave(torch.arange(num_seqs, device=device), counts, output_size=total)
        first = counts.cumsum(0) - counts
        local = torch.arange(total, device=device) - first[seq]
        return torch.stack([seq, local * step], dim=1).to(torch.int32).contiguous()


@functools.lru_cache(maxsize=16)
def _dense_layout(batch: int, seq_len: int, block_size: int, device: torch.device) -> _Layout:
    return _Layout(batch, seq_len, block_size, None, device)


def _layout(batch, seq_len, block_size, cu_seqlens, device) -> _Layout:
    if cu_seqlens is None:
        return _dense_layout(batch, seq_len, block_size, device)
    return _Layout(batch, seq_len, block_size, cu_seqlens, device)


def _shape(q, k, block_size):
    _, total, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    return total, num_heads, num_kv_heads, num_heads // num_kv_heads, head_dim, triton.next_power_of_2(head_dim)


def _pool(q, k, layout, block_size):
    """(qbar, kbar) `[NB, Hkv, D]` fp32 block means of packed q `[1, T, H, D]`, k `[1, T, Hkv, D]`."""
    _, num_heads, num_kv_heads, groups, head_dim, bd = _shape(q, k, block_size)
    qbar = q.new_empty(max(layout.num_blocks, 1), num_kv_heads, head_dim, dtype=torch.float32)
    kbar = torch.empty_like(qbar)
    if layout.num_blocks == 0:
        return qbar, kbar
    block_pool_kernel[(layout.num_blocks, num_kv_heads)](
        q,
        k,
        qbar,
        kbar,
        layout.blocks,
        layout.cu_seqlens,
        H=num_heads,
        HKV=num_kv_heads,
        G=groups,
        GP=triton.next_power_of_2(groups),
        D=head_dim,
        BD=bd,
        BS=block_size,
        BR=max(1, min(block_size, TUNING["pool_elems"] // (triton.next_power_of_2(groups) * bd))),
        num_warps=TUNING["pool_warps"],
    )
    return qbar, kbar


def _top_k(qbar, kbar, layout, block_size, top_k, keep_first_block):
    """`[NB, Hkv, top_k]` int32 selection from the block means."""
    num_kv_heads, head_dim = kbar.shape[1], kbar.shape[2]
    # every real query block belongs to one tile, whose program writes all its slots
    block_indices = torch.empty((layout.num_blocks, num_kv_heads, top_k), dtype=torch.int32, device=kbar.device)
    if layout.num_blocks == 0:
        return block_indices
    kp = max(2, triton.next_power_of_2(top_k))
    cap = max(SELECT_CAP, 2 * kp)
    scratch = torch.empty(layout.num_tiles * num_kv_heads * SELECT_BQ, cap, dtype=torch.int64, device=kbar.device)
    block_select_kernel[(layout.num_tiles, num_kv_heads)](
        qbar,
        kbar,
        block_indices,
        scratch,
        layout.tiles,
        layout.first_blocks,
        layout.cu_seqlens,
        HKV=num_kv_heads,
        D=head_dim,
        BD=triton.next_power_of_2(head_dim),
        BS=block_size,
        BQ=SELECT_BQ,
        # at least top_k lanes, so that the bound is the top_k-th largest of distinct candidates
        BN=max(SELECT_BN, kp),
        TOPK=top_k,
        KP=kp,
        CAP=cap,
        KEEP_FIRST=keep_first_block,
        num_warps=4,
    )
    return block_indices


def _select(q, k, layout, block_size, top_k, keep_first_block, block_means=None):
    """`[NB, Hkv, top_k]` int32 selection of packed q `[1, T, H, D]`, k `[1, T, Hkv, D]`, or of their given block
    means (as `block_topk_rotary` returns them)."""
    if block_means is None:
        qbar, kbar = _pool(q, k, layout, block_size)
    else:
        qbar, kbar = _given_means(block_means, layout, k.shape[2], k.shape[3])
    return _top_k(qbar, kbar, layout, block_size, top_k, keep_first_block)


def _given_means(block_means, layout, num_kv_heads, head_dim):
    """(qbar, kbar) `[NB, Hkv, D]` fp32 views of `block_means`, checked against the layout."""
    if layout.packed:
        raise ValueError(
            "block_means come from block_topk_rotary on a dense batch, whose blocks count from token 0 of each row; "
            "with cu_seqlens, leave block_means unset (the op pools each packed sequence's blocks itself)"
        )
    expected = (layout.num_blocks, num_kv_heads, head_dim)
    if not isinstance(block_means, (tuple, list)) or len(block_means) != 2:
        raise TypeError("block_means must be the (query means, key means) pair that block_topk_rotary returns")
    if not all(isinstance(m, torch.Tensor) for m in block_means):
        raise TypeError(
            "block_means must be the (query means, key means) pair of tensors that block_topk_rotary returns"
        )
    means = [m.reshape(-1, *m.shape[-2:]) for m in block_means]
    for name, m in zip(("query", "key"), means, strict=True):
        if m.device != layout.cu_seqlens.device:
            raise ValueError(
                f"block_means: the {name} means are on {m.device}, the inputs on {layout.cu_seqlens.device}"
            )
        if tuple(m.shape) != expected or m.dtype != torch.float32:
            raise ValueError(
                f"block_means: the {name} means must be fp32 of {expected} (blocks, kv heads, head dim) as "
                f"block_topk_rotary returns them for these inputs, got {m.dtype} {tuple(m.shape)}"
            )
    return means[0].contiguous(), means[1].contiguous()


def block_topk_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, block_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """transformers' rotary embedding of q `[B, T, H, D]` and k `[B, T, Hkv, D]` by cos, sin `[B or 1, T, D]` (with the
    bits of `decoder_fusion.rotary`), and in the same pass the block means the selection scores: the mean of each
    complete block's rotated queries over its tokens and the GQA group's heads, and its mean rotated key.

    For inference (no backward). Blocks count from token 0 of each row (a dense batch, no packing). Returns
    `(q_rot, k_rot, (qbar, kbar))`, the means fp32 `[B, NB, Hkv, D]`, to pass as `block_means=` to
    `block_topk_attention` / `block_topk_select` with the rotated q and k. The last block of a row, when incomplete,
    holds its query sum / (block_size * G) and a zero key mean (the decode state's convention; the selection reads
    neither).
    """
    batch, seq_len, num_heads, head_dim = q.shape
    if k.dim() != 4 or k.shape[:2] != q.shape[:2] or k.shape[3] != head_dim or num_heads % k.shape[2]:
        raise ValueError(f"expected q [B, T, H, D] and k [B, T, Hkv, D], got {tuple(q.shape)}, {tuple(k.shape)}")
    if head_dim % 2 or head_dim > MAX_HEAD_DIM or cos.shape != sin.shape or cos.dim() != 3:
        raise ValueError(
            f"expected an even head dim up to {MAX_HEAD_DIM} and cos/sin of shape (B or 1, {seq_len}, {head_dim}), "
            f"got q {tuple(q.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}"
        )
    if cos.shape[1:] != (seq_len, head_dim) or cos.shape[0] not in (1, batch):
        raise ValueError(f"cos/sin: expected shape (1 or {batch}, {seq_len}, {head_dim}), got {tuple(cos.shape)}")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES} (a power of two the kernels tile), got {block_size}")
    q, k = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k))
    cos, sin = cos.contiguous(), sin.contiguous()
    num_kv_heads, groups = k.shape[2], num_heads // k.shape[2]
    per_row = triton.cdiv(seq_len, block_size)
    dtype = torch.promote_types(q.dtype, cos.dtype)
    q_rot = torch.empty(q.shape, dtype=dtype, device=q.device)
    k_rot = torch.empty(k.shape, dtype=torch.promote_types(k.dtype, cos.dtype), device=k.device)
    if k_rot.dtype != dtype:
        raise ValueError(f"q and k must share a dtype, got {q.dtype} and {k.dtype}")
    qbar = q.new_empty(batch, per_row, num_kv_heads, head_dim, dtype=torch.float32)
    kbar = torch.empty_like(qbar)
    if batch * per_row:
        half, gp = head_dim // 2, triton.next_power_of_2(groups)
        hp = triton.next_power_of_2(half)
        block_rotary_pool_kernel[(batch * per_row, num_kv_heads)](
            q,
            k,
            cos,
            sin,
            q_rot,
            k_rot,
            qbar,
            kbar,
            seq_len,
            per_row,
            q.stride(0),
            q.stride(1),
            q.stride(2),
            k.stride(0),
            k.stride(1),
            k.stride(2),
            cos.stride(0) if cos.shape[0] > 1 else 0,
            cos.stride(1),
            H=num_heads,
            HKV=num_kv_heads,
            G=groups,
            GP=gp,
            HALF=half,
            HP=hp,
            BS=block_size,
            BR=max(1, min(block_size, TUNING["pool_elems"] // (gp * 2 * hp))),
            num_warps=TUNING["pool_warps"],
            # torch rounds each product before the sum: no fused multiply-add
            enable_fp_fusion=False,
        )
    return q_rot, k_rot, (qbar, kbar)


def _attention_fwd(q, k, v, block_indices, layout, block_size, keep_first_block, scale):
    total, num_heads, num_kv_heads, groups, head_dim, bd = _shape(q, k, block_size)
    top_k = block_indices.shape[-1]
    heads, rows = _row_tiling(groups, block_size, TUNING["fwd_rows"])
    o = torch.empty_like(q)
    lse = q.new_empty(total, num_heads, dtype=torch.float32)
    if layout.num_blocks:
        block_attn_fwd_kernel[(layout.num_blocks, num_kv_heads * (groups // heads))](
            q,
            k,
            v,
            o,
            lse,
            block_indices,
            layout.blocks,
            layout.cu_seqlens,
            scale,
            H=num_heads,
            HKV=num_kv_heads,
            G=groups,
            GH=heads,
            D=head_dim,
            BD=bd,
            BS=block_size,
            BM=rows,
            TOPK=top_k,
            KP=max(2, triton.next_power_of_2(top_k)),
            KEEP_FIRST=keep_first_block,
            num_warps=TUNING["fwd_warps"] or _warps(rows),
            num_stages=TUNING["fwd_stages"],
        )
    return o, lse


def _dkv_work(block_indices, layout, keep_first_block):
    """The transposed selection: `query_lists` holds, per (kv head, key block), the query blocks that read it
    (ascending); `items [W, 3]` = (kv head * NB + key block, first entry, count <= DKV_QUERY_CHUNK)."""
    num_blocks, num_kv_heads, _ = block_indices.shape
    device = block_indices.device
    query = torch.arange(num_blocks, device=device)
    base = query - layout.blocks[:, 1].long()
    selected = block_indices.long()
    selected = torch.where(selected >= 0, base[:, None, None] + selected, -1)
    first = torch.where((query > base) & keep_first_block, base, -1)[:, None, None].expand(-1, num_kv_heads, 1)
    own = query[:, None, None].expand(-1, num_kv_heads, 1)
    # [NB, Hkv, top_k + 2] global key blocks read by each query block
    key_blocks = torch.cat([first, selected, own], dim=-1)
    heads = torch.arange(num_kv_heads, device=device)[None, :, None].expand_as(key_blocks)
    valid = key_blocks >= 0
    keys = (heads * num_blocks + key_blocks)[valid]
    queries = query[:, None, None].expand_as(key_blocks)[valid]
    order = torch.sort(keys, stable=True).indices
    keys, query_lists = keys[order], queries[order].to(torch.int32)
    counts = torch.bincount(keys, minlength=num_kv_heads * num_blocks)
    starts = counts.cumsum(0) - counts
    pieces = (counts + DKV_QUERY_CHUNK - 1) // DKV_QUERY_CHUNK
    item_key = torch.repeat_interleave(torch.arange(counts.numel(), device=device), pieces)
    item_rank = torch.arange(item_key.numel(), device=device) - torch.repeat_interleave(
        pieces.cumsum(0) - pieces, pieces
    )
    item_start = starts[item_key] + item_rank * DKV_QUERY_CHUNK
    item_count = torch.clamp(counts[item_key] - item_rank * DKV_QUERY_CHUNK, max=DKV_QUERY_CHUNK)
    items = torch.stack([item_key, item_start, item_count], dim=1).to(torch.int32).contiguous()
    return items, query_lists.contiguous()


def _attention_bwd(q, k, v, o, lse, do, block_indices, layout, block_size, keep_first_block, scale):
    total, num_heads, num_kv_heads, groups, head_dim, bd = _shape(q, k, block_size)
    top_k = block_indices.shape[-1]
    delta = q.new_empty(total, num_heads, dtype=torch.float32)
    rows_per_program = 32
    block_attn_bwd_delta_kernel[(triton.cdiv(total * num_heads, rows_per_program),)](
        o, do, delta, total * num_heads, D=head_dim, BD=bd, BN=rows_per_program, num_warps=4
    )
    dq = torch.empty_like(q)
    dk = torch.zeros_like(k, dtype=torch.float32)
    dv = torch.zeros_like(v, dtype=torch.float32)
    if layout.num_blocks == 0:
        return dq.zero_(), dk.to(k.dtype), dv.to(v.dtype)
    heads, rows = _row_tiling(groups, block_size, TUNING["dq_rows"])
    block_attn_bwd_dq_kernel[(layout.num_blocks, num_kv_heads * (groups // heads))](
        q,
        k,
        v,
        do,
        lse,
        delta,
        dq,
        block_indices,
        layout.blocks,
        layout.cu_seqlens,
        scale,
        H=num_heads,
        HKV=num_kv_heads,
        G=groups,
        GH=heads,
        D=head_dim,
        BD=bd,
        BS=block_size,
        BM=rows,
        TOPK=top_k,
        KP=max(2, triton.next_power_of_2(top_k)),
        KEEP_FIRST=keep_first_block,
        num_warps=TUNING["dq_warps"] or _warps(rows),
        num_stages=2,
    )
    items, query_lists = _dkv_work(block_indices, layout, keep_first_block)
    heads, rows = _row_tiling(groups, block_size, TUNING["dkv_rows"])
    block_attn_bwd_dkv_kernel[(items.shape[0],)](
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
        layout.blocks,
        layout.cu_seqlens,
        scale,
        layout.num_blocks,
        items.shape[0],
        H=num_heads,
        HKV=num_kv_heads,
        G=groups,
        GH=heads,
        D=head_dim,
        BD=bd,
        BS=block_size,
        BM=rows,
        num_warps=TUNING["dkv_warps"] if rows >= 64 else 4,
        num_stages=2,
    )
    return dq, dk.to(k.dtype), dv.to(v.dtype)


class BlockTopkAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, block_indices, layout, block_size, keep_first_block, scale):
        o, lse = _attention_fwd(q, k, v, block_indices, layout, block_size, keep_first_block, scale)
        ctx.save_for_backward(q, k, v, o, lse, block_indices)
        ctx.layout, ctx.block_size, ctx.keep_first_block, ctx.scale = layout, block_size, keep_first_block, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, block_indices = ctx.saved_tensors
        dq, dk, dv = _attention_bwd(
            q,
            k,
            v,
            o,
            lse,
            do.contiguous(),
            block_indices,
            ctx.layout,
            ctx.block_size,
            ctx.keep_first_block,
            ctx.scale,
        )
        return dq, dk, dv, None, None, None, None, None


def _check_options(q, num_kv_heads, block_size, top_k):
    """The checks every op shares: heads, head dim, block size, top_k and dtype."""
    if q.shape[2] % num_kv_heads != 0:
        raise ValueError(f"the {q.shape[2]} query heads must be a multiple of the {num_kv_heads} key/value heads")
    if q.shape[3] > MAX_HEAD_DIM:
        raise ValueError(f"head dims up to {MAX_HEAD_DIM} are supported, got {q.shape[3]}")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES} (a power of two the kernels tile), got {block_size}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q, k, v must be float16, bfloat16 or float32, got {q.dtype}")


def _check_inputs(q, k, v, block_size, top_k, cu_seqlens):
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(
            f"expected q [B, T, H, D] and k, v [B, T, Hkv, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    _check_options(q, k.shape[2], block_size, top_k)
    if cu_seqlens is not None and q.shape[0] != 1:
        raise ValueError(
            f"The batch size is expected to be 1 rather than {q.shape[0]} when using `cu_seqlens`. "
            "Please flatten variable-length inputs before processing."
        )
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        if (
            not bounds
            or bounds[0] != 0
            or bounds[-1] != q.shape[1]
            or any(b < a for a, b in itertools.pairwise(bounds))
        ):
            raise ValueError(f"cu_seqlens {bounds} must rise from 0 to the {q.shape[1]} packed tokens")


def _packed(x: torch.Tensor) -> torch.Tensor:
    """`[B, T, ...]` -> contiguous `[1, B * T, ...]`."""
    return x.reshape(1, -1, *x.shape[2:]).contiguous()


@torch.compiler.disable
def block_topk_select(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int = 64,
    top_k: int = 16,
    keep_first_block: bool = True,
    cu_seqlens: torch.Tensor | None = None,
    block_means: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Block selection: `[B, NQ, Hkv, top_k]` int32 key-block indices relative to each sequence start, ascending,
    -1 for empty slots (NQ = ceil(T / block_size), or the total over packed sequences). The own block and block 0
    are implicit. Args as `block_topk_attention`."""
    _check_inputs(q, k, k, block_size, top_k, cu_seqlens)
    batch, seq_len = q.shape[:2]
    layout = _layout(batch, seq_len, block_size, cu_seqlens, q.device)
    with torch.no_grad():
        if block_means is not None:
            selected = _select(None, k, layout, block_size, top_k, keep_first_block, block_means)
        else:
            selected = _select(_packed(q), _packed(k.to(q.dtype)), layout, block_size, top_k, keep_first_block)
    return selected.view(batch, -1, *selected.shape[1:]) if cu_seqlens is None else selected[None]


@torch.compiler.disable
def block_topk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int = 64,
    top_k: int = 16,
    keep_first_block: bool = True,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    block_indices: torch.Tensor | None = None,
    block_means: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Causal block-sparse attention: each query block reads its own block, block 0 (`keep_first_block`) and its
    `top_k` selected earlier blocks, with exact softmax over their union.

    Args:
        q: `[B, T, H, D]`; k, v: `[B, T, Hkv, D]`, H a multiple of Hkv; D <= 256.
        block_size: one of 16, 32, 64, 128, 256.
        scale: softmax scale, default D ** -0.5.
        cu_seqlens: `[N + 1]` cumulative lengths of sequences packed along T (then B must be 1).
        block_indices: a selection in `block_topk_select`'s layout (valid entries first, each < its query block and
            not block 0 when `keep_first_block`); computed when None.
        block_means: `(qbar, kbar)` from `block_topk_rotary` on these q and k (dense batches): the selection scores
            them instead of pooling q and k again. Ignored when `block_indices` is given.
    Returns:
        `[B, T, H, D]` in q's dtype; gradients for q, k and v.

    Examples::
        >>> o = block_topk_attention(q, k, v, block_size=64, top_k=16)
    """
    _check_inputs(q, k, v, block_size, top_k, cu_seqlens)
    batch, seq_len = q.shape[:2]
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    layout = _layout(batch, seq_len, block_size, cu_seqlens, q.device)
    qp, kp, vp = _packed(q), _packed(k.to(q.dtype)), _packed(v.to(q.dtype))
    if block_indices is None:
        with torch.no_grad():
            block_indices = _select(qp.detach(), kp.detach(), layout, block_size, top_k, keep_first_block, block_means)
    else:
        expected = (layout.num_blocks, k.shape[2])
        block_indices = block_indices.to(device=q.device, dtype=torch.int32).reshape(-1, *block_indices.shape[-2:])
        if tuple(block_indices.shape[:2]) != expected:
            raise ValueError(
                f"block_indices must hold {expected} (query blocks, kv heads) rows, got {tuple(block_indices.shape)}"
            )
        block_indices = block_indices.contiguous()
    o = BlockTopkAttentionFunction.apply(qp, kp, vp, block_indices, layout, block_size, keep_first_block, scale)
    return o.view(q.shape)


# decode step: candidate blocks per program of the scores kernel, the most scores the selection holds at once
# (longer rows run in chunks of it), and the warps of the step's kernel. On an H100 (bf16, 32/8 heads, D = 128,
# block 64, top-16; GPU time of graph replays) 4 warps took 0.035 / 0.036 / 0.039 ms at B = 1 and 4k / 32k / 128k
# of context and 0.156 ms at B = 64, 8k, against 0.040 / 0.039 / 0.042 and 0.183 ms on 8 warps
DECODE_SCORE_BLOCKS = 64
DECODE_MAX_SCORES = 4096
DECODE_WARPS = 4


@torch.compiler.disable
@torch.no_grad()
def block_topk_decode(
    q: torch.Tensor,
    k_all: torch.Tensor,
    v_all: torch.Tensor,
    state: dict,
    first_real: torch.Tensor,
    block_size: int = 64,
    top_k: int = 16,
    keep_first_block: bool = True,
    scale: float | None = None,
):
    """`hf_effattn.ops_reference.block_topk_cached_attention` for one new token per row, in two kernel launches: the
    kept key-block means are scored, then the token's block selects its top-k, attends to block 0, those blocks and
    its own block up to itself, and the means take the new token. Forward only.

    Args:
        q: `[B, 1, H, D]` the new queries (last dim contiguous).
        k_all, v_all: `[B, L, Hkv, D]` the whole cache, the new token last, in any strides with a contiguous last dim
            (e.g. transformers' `[B, Hkv, L, D]` transposed).
        state: `{"kbar", "qbar", "qsum"}` as `block_topk_cached_attention` keeps it (fp32). `kbar` is updated in
            place when it has room for the token's block, else it is copied into a buffer with room for twice as
            many blocks; the other two are new tensors.
        first_real: `[B]` cache index of each row's first real token (left padding).
    Returns:
        (`[B, 1, H, D]` in q's dtype, zeros for rows whose first real token is later; the new state).
    """
    if q.dim() != 4 or q.shape[1] != 1:
        raise ValueError(f"block_topk_decode takes one new token per row, q [B, 1, H, D]; got {tuple(q.shape)}")
    batch, _, num_heads, head_dim = q.shape
    if k_all.dim() != 4 or k_all.shape != v_all.shape or k_all.shape[0] != batch or k_all.shape[3] != head_dim:
        raise ValueError(
            f"expected k_all, v_all [B, L, Hkv, D] for q {tuple(q.shape)}, got {tuple(k_all.shape)}, "
            f"{tuple(v_all.shape)}"
        )
    total, num_kv_heads = k_all.shape[1], k_all.shape[2]
    _check_options(q, num_kv_heads, block_size, top_k)
    if state is None or set(state) != {"kbar", "qbar", "qsum"}:
        raise ValueError(
            "block_topk_decode needs the block-mean state of the cache ({'kbar', 'qbar', 'qsum'}); build it with "
            "block_topk_cached_attention(..., attend=False) over the prompt"
        )
    q, k_all, v_all = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k_all.to(q.dtype), v_all.to(q.dtype)))
    state_shape = (batch, num_kv_heads, head_dim)
    qbar, qsum = (state[name].to(torch.float32).contiguous() for name in ("qbar", "qsum"))
    if tuple(qbar.shape) != state_shape or tuple(qsum.shape) != state_shape:
        raise ValueError(f"state qbar and qsum must be {state_shape}, got {tuple(qbar.shape)}, {tuple(qsum.shape)}")
    kbar = state["kbar"]
    if kbar.dim() != 4 or kbar.shape[0] != batch or tuple(kbar.shape[2:]) != state_shape[1:]:
        raise ValueError(f"state kbar must be [{batch}, blocks, {num_kv_heads}, {head_dim}], got {tuple(kbar.shape)}")
    # room for the block of the newest token of every row (block (L - 1 - first) // size < ceil(L / size))
    needed = triton.cdiv(total, block_size)
    if kbar.shape[1] < needed or kbar.dtype != torch.float32 or kbar.stride(-1) != 1 or kbar.stride(-2) != head_dim:
        grown = kbar.new_zeros(batch, max(needed, 2 * kbar.shape[1]), num_kv_heads, head_dim, dtype=torch.float32)
        grown[:, : kbar.shape[1]] = kbar
        kbar = grown
    new_qbar, new_qsum = torch.empty_like(qbar), torch.empty_like(qsum)
    o = torch.empty_like(q)
    scale = head_dim**-0.5 if scale is None else float(scale)
    first_real = first_real.to(device=q.device, dtype=torch.int64)
    bd = max(16, triton.next_power_of_2(head_dim))
    # [B * Hkv, needed] selection scores of every candidate block (-inf elsewhere)
    scores = torch.empty(batch * num_kv_heads, needed, dtype=torch.float32, device=q.device)
    block_topk_decode_scores_kernel[(triton.cdiv(needed, DECODE_SCORE_BLOCKS), batch * num_kv_heads)](
        kbar,
        qbar,
        first_real,
        scores,
        total,
        needed,
        kbar.stride(0),
        kbar.stride(1),
        HKV=num_kv_heads,
        D=head_dim,
        BD=bd,
        BS=block_size,
        BC=DECODE_SCORE_BLOCKS,
        KEEP_FIRST=keep_first_block,
    )
    block_topk_decode_kernel[(batch, num_kv_heads)](
        q,
        k_all,
        v_all,
        o,
        kbar,
        qbar,
        qsum,
        new_qbar,
        new_qsum,
        first_real,
        scores,
        total,
        needed,
        scale,
        q.stride(0),
        q.stride(2),
        k_all.stride(0),
        k_all.stride(1),
        k_all.stride(2),
        v_all.stride(0),
        v_all.stride(1),
        v_all.stride(2),
        o.stride(0),
        o.stride(2),
        kbar.stride(0),
        kbar.stride(1),
        H=num_heads,
        HKV=num_kv_heads,
        D=head_dim,
        BD=bd,
        BS=block_size,
        BG=max(16, triton.next_power_of_2(num_heads // num_kv_heads)),
        # the running list also takes block 0 and the own block to sort the blocks to read
        BN=max(16, triton.next_power_of_2(top_k + 2)),
        NBP=min(DECODE_MAX_SCORES, max(16, triton.next_power_of_2(needed))),
        TOPK=top_k,
        KEEP_FIRST=keep_first_block,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=DECODE_WARPS,
    )
    return o, {"kbar": kbar, "qbar": new_qbar, "qsum": new_qsum}
