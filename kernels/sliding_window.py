"""Triton causal sliding-window softmax attention with sink tokens (StreamingLLM) and sink logits (gpt-oss).

    sliding_window_attention   prefill and training: forward and backward (dq, dk, dv, d sink_logits), packed
                               sequences through `cu_seqlens`, padding through per-row key bounds
    sliding_window_decode      a few queries against a bounded cache (window + sinks), forward only; its cost does
                               not depend on how long the context is

Both follow `hf_effattn.ops_reference.sliding_window_attention`: query t sees key s when 0 <= t - s < window; the
sink tokens join once they have left the window; the sink logits join every softmax denominator with no value.
Layout `[B, T, H, D]` for q and `[B, T, HKV, D]` for k, v (GQA: H % HKV == 0); the output has q's dtype.
"""

import functools
import itertools
import math

import torch

from .sliding_window_kernels import (
    sliding_bwd_dkdv_kernel,
    sliding_bwd_dq_kernel,
    sliding_decode_combine_kernel,
    sliding_decode_kernel,
    sliding_fwd_kernel,
    triton,
)

try:  # remote-code checkpoints may meet a Triton older than the package's pin
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

MAX_HEAD_DIM = 256
# tiles (rows BM x keys BN), launch options and an optional register cap per thread per kernel and head-dim bound,
# for 16-bit inputs on a GPU; fp32 tiles are twice as large, so they run halved and uncapped; the interpreter (CPU)
# runs small tiles. D = 128 by sweeps on an H100 (bf16, window 4096; `scripts/sliding_window_gpu.py --sweep`):
# - fwd (128, 64, 8 warps, 2 stages) capped at 128 registers: at 255 registers and 128 KB of shared memory one
#   program ran per SM and its tensor cores idled through each block's softmax; at 128 registers and 96 KB two
#   programs share an SM and one's softmax overlaps the other's products. Per-kernel profiler times (medians of
#   three interleaved rounds): 0.915 -> 0.882 ms at 8k, 4.40 -> 4.05 ms at 32k (a cap of 168 keeps one program per
#   SM and spills: 1.18 / 6.06 ms). Timed back to back for 500 ms (do_bench), where the GPU runs at its power cap,
#   the gain mostly goes: 0.963 -> 0.949 ms at 8k, 4.63 / 4.64 ms at 32k;
# - dq (128, 128, 8, 2) and dk/dv (64, 64, 4, 2), both with tensor descriptors for every window tile (dq then
#   needs 252 registers and spills none, against 48 bytes with pointer tiles). Timed back to back (do_bench, five
#   rounds alternating with Flex), dk/dv at (64, 64, 4, 2) against (32, 64, 4, 3): backward 3.13 -> 3.04 ms at 8k,
#   15.21 -> 14.57 ms at 32k, 64.07 -> 61.50 ms at 128k, though it spills more (164 against 38 bytes); 8 warps
#   (64 x 64, 128 x 64, 64 x 128), 16 or 32 keys, or one stage were 1.3-2.5x slower.
GPU_TILES = {
    "fwd": {64: (128, 64, 4, 3), 128: (128, 64, 8, 2, 128), 256: (64, 64, 8, 2)},
    "dq": {64: (128, 128, 4, 2), 128: (128, 128, 8, 2), 256: (64, 64, 8, 2)},
    "dkdv": {64: (32, 64, 4, 4), 128: (64, 64, 4, 2), 256: (32, 64, 8, 2)},
}
CPU_TILES = {"fwd": (32, 16, 4, 1), "dq": (32, 16, 4, 1), "dkdv": (16, 32, 4, 1)}
# decode: key tile, and programs per SM to aim for when splitting the cache
DECODE_BLOCK_N = 64
DECODE_PROGRAMS_PER_SM = 2
DECODE_OPTIONS = {"num_warps": 4, "num_stages": 2}
# the forward and dq kernels put the query heads of a GQA group in one tile (rows = (query, head) pairs), so each k/v
# tile they load serves the whole group and a tile spans fewer queries (less of the window's edges is masked)
PACK_GQA_HEADS = True
# the window's tiles can load k/v (forward, dq) and q/do (dk/dv) through TMA tensor descriptors, on GPUs of compute
# capability 9 (Hopper) and later when the head dim is a power of two; the masked tiles at the window's edges then
# load whole tiles and mask the scores alone (the sink keys' tile keeps its masked pointer loads), so padding keys
# and values are zeroed on the host first (`_zero_padding`): p = 0 there, but 0 * NaN is not 0. Zeroing the masked
# rows in the kernels instead cost 3-6% per kernel on an H100 (dk/dv 7.43 -> 7.90 ms at 32k, forward 3.94 -> 4.07). With descriptors
# only for the fully visible tiles, the pointer tiles of the edges held the registers: the forward (capped at 128)
# spilled 66 bytes, dq 48, dk/dv 78. With every window tile on descriptors, on an H100 (bf16, D = 128, window 4096,
# do_bench, five rounds alternating with Flex; two runs, each against its own Flex): the forward spills 22 bytes and
# its ratio to Flex goes 1.209 -> 1.226 at 8k, 1.218 -> 1.241 at 32k, 1.233 -> 1.257 at 128k. USE_TENSOR_DESCRIPTORS = True or False forces every kernel (True
# also runs under the interpreter, which is how CPU tests cover that path).
TENSOR_DESCRIPTOR_KERNELS = {"fwd": True, "dq": True, "dkdv": True}
USE_TENSOR_DESCRIPTORS = None
# per kernel: launch the query blocks last first, so that the blocks that see a whole window start first and the
# short ones at the start of a sequence fill the end. On an H100 (bf16, window 4096): dq gains at 8k and 32k
# (profiler GPU times, medians of 3 interleaved rounds: 1.288 -> 1.248 ms, 6.41 -> 6.25 ms) and is flat at 128k.
# The forward with its capped tile and descriptors gains at 8k and is flat beyond (do_bench, seven alternating
# rounds: 0.939 -> 0.919 ms at 8k, 4.50 / 4.52 ms at 32k, 19.05 / 19.12 ms at 128k); with one program per SM and
# pointer loads it had lost at 128k (19.4 -> 20.2 ms)
HEAVY_BLOCKS_FIRST = {"fwd": True, "dq": True}
# per kernel: run the blocks that see a whole window row by row (batch row, head tile), then the shorter ones across
# the rows, longest first (`_program_block`); off: every block row by row, so the launch ends on all the blocks of its
# last row. On an H100 (profiler GPU times, bf16, window 4096) dk/dv gains at 8k, where a launch is a few waves of
# long programs: 1.82 -> 1.64 ms (8.39 -> 8.23 ms at 32k, 36.04 / 36.15 ms at 128k). dq lost at 8k and 32k
# (1.256 -> 1.279 ms, 6.17 -> 6.29 ms) and the forward did not change; every block across the rows (without the
# full ones row by row) lost at 32k and 128k, where a row's neighbouring blocks no longer share their L2 tiles
SHORT_BLOCKS_ACROSS_ROWS = {"fwd": False, "dq": False, "dkdv": True}
# the forward moves its running max (and rescales its accumulator) only when a tile's scores exceed it by more than
# 8 in log2 units, a factor of 2^8 (`RESCALE_SLACK`), instead of at every tile: on an H100 (do_bench, five rounds alternating with Flex) the
# forward's ratio to Flex went 1.201 -> 1.209 at 8k, 1.196 -> 1.218 at 32k, 1.218 -> 1.233 at 128k
LAZY_RESCALE = True


def _full_blocks(kind: str, count: int, block: int, seq_len: int, window: int, packed: bool) -> int:
    """How many blocks of a row see a whole window, counted from the heaviest (`_program_block`): query blocks
    (forward, dq) whose first query is past the window's reach, key blocks (dk/dv) whose window of queries ends in the
    sequence. Packed sequences run every block row by row."""
    if packed or not SHORT_BLOCKS_ACROSS_ROWS[kind]:
        return count
    if kind == "dkdv":
        full = (seq_len - window - block + 1) // block + 1
    else:
        full = count - triton.cdiv(window - 1, block)
    return min(max(full, 0), count)


def _block(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


@functools.cache
def _num_sms(device) -> int:
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def _tiles(kind: str, head_dim: int, dtype: torch.dtype, device) -> dict:
    """{"BM", "BN", "num_warps", "num_stages", "maxnreg"} of kernel `kind` ("fwd", "dq", "dkdv"); maxnreg (a cap
    on registers per thread) is None where the tiles set none, or Triton cannot take one."""
    max_regs = None
    if device.type != "cuda":
        bm, bn, warps, stages = CPU_TILES[kind]
    else:
        bound = min(bound for bound in GPU_TILES[kind] if bound >= head_dim)
        bm, bn, warps, stages, *cap = GPU_TILES[kind][bound]
        if dtype == torch.float32:
            bm, bn, stages = max(16, bm // 2), max(16, bn // 2), min(stages, 2)
        elif cap and takes_register_caps():
            max_regs = cap[0]
    return {"BM": bm, "BN": bn, "num_warps": warps, "num_stages": stages, "maxnreg": max_regs}


@functools.cache
def takes_register_caps() -> bool:
    """Whether Triton takes a `maxnreg` launch option (its CUDA backend does; older releases and other backends
    do not)."""
    if torch.version.hip is not None:
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "maxnreg" in getattr(CUDAOptions, "__dataclass_fields__", {})


def _use_descriptors(kind: str, x: torch.Tensor, head_dim: int) -> bool:
    """Whether kernel `kind` ("fwd", "dq", "dkdv") loads the tiles of the window through tensor descriptors."""
    if TensorDescriptor is None or _block(head_dim) != head_dim or x.numel() == 0:
        return False
    if USE_TENSOR_DESCRIPTORS is not None:
        return bool(USE_TENSOR_DESCRIPTORS)
    hopper = (
        x.device.type == "cuda" and torch.version.hip is None and torch.cuda.get_device_capability(x.device)[0] >= 9
    )
    return hopper and TENSOR_DESCRIPTOR_KERNELS[kind]


def _descriptor(x: torch.Tensor, rows: int, use: bool):
    """A 2-D tensor descriptor of contiguous `[B, T, heads, D]` x as `[B * T, heads * D]` in `[rows, D]` tiles, or
    x itself when descriptors are off (the kernel then never reads it)."""
    if not use:
        return x
    return TensorDescriptor.from_tensor(x.view(x.shape[0] * x.shape[1], x.shape[2] * x.shape[3]), [rows, x.shape[3]])


def _pack(num_heads: int, num_kv_heads: int, rows: int) -> int:
    """Query heads per tile of the forward and dq kernels: the whole GQA group when PACK_GQA_HEADS is on, the group
    size is a power of two and a tile keeps at least 8 queries; else 1."""
    groups = num_heads // num_kv_heads
    if PACK_GQA_HEADS and groups > 1 and groups & (groups - 1) == 0 and rows // groups >= 8:
        return groups
    return 1


def _launch_options(tiles: dict) -> dict:
    options = {"num_warps": tiles["num_warps"], "num_stages": tiles["num_stages"]}
    if tiles["maxnreg"] is not None:
        options["maxnreg"] = tiles["maxnreg"]
    return options


class _Blocks:
    """Grid of one block size: per-row block count, or for packed sequences the (sequence, block) list."""

    def __init__(self, seq_len: int, seq_lens: list[int] | None, block: int, device):
        if seq_lens is None:
            self.count, self.index, self.seq_ids = triton.cdiv(seq_len, block), None, None
            return
        pairs = [(n, c) for n, length in enumerate(seq_lens) for c in range(triton.cdiv(length, block))]
        self.count = len(pairs)
        self.index = torch.tensor(pairs or [(0, 0)], dtype=torch.int32, device=device)
        self.seq_ids = self.index[: self.count, 0].long()


def _forward(q, k, v, sink_logits, window, num_sinks, scale, cu_seqlens, seq_lens, key_bounds):
    batch, seq_len, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    tokens = batch * seq_len
    tiles = _tiles("fwd", head_dim, q.dtype, q.device)
    pack = _pack(num_heads, num_kv_heads, tiles["BM"])
    blocks = _Blocks(seq_len, seq_lens, tiles["BM"] // pack, q.device)
    o = torch.empty_like(q)
    lse = torch.empty(num_heads, tokens, dtype=torch.float32, device=q.device)
    use_desc = _use_descriptors("fwd", q, head_dim)
    grid_rows = (1 if seq_lens else batch) * num_heads // pack
    num_full = _full_blocks("fwd", blocks.count, tiles["BM"] // pack, seq_len, window, seq_lens is not None)
    sliding_fwd_kernel[(blocks.count * grid_rows,)](
        q,
        k,
        v,
        o,
        lse,
        sink_logits,
        _descriptor(k, tiles["BN"], use_desc),
        _descriptor(v, tiles["BN"], use_desc),
        cu_seqlens,
        blocks.index,
        key_bounds,
        scale,
        window,
        seq_len,
        tokens,
        grid_rows,
        num_full,
        H=num_heads,
        HKV=num_kv_heads,
        D=head_dim,
        S=num_sinks,
        BM=tiles["BM"],
        BN=tiles["BN"],
        BS=_block(num_sinks),
        BD=_block(head_dim),
        IS_VARLEN=seq_lens is not None,
        HAS_BOUNDS=key_bounds is not None,
        HAS_SINK_LOGITS=sink_logits is not None,
        USE_DESC=use_desc,
        PACK=pack,
        HEAVY_FIRST=HEAVY_BLOCKS_FIRST["fwd"],
        LAZY_RESCALE=LAZY_RESCALE,
        **_launch_options(tiles),
    )
    return o, lse


def _backward(q, k, v, o, lse, do, sink_logits, window, num_sinks, scale, cu_seqlens, seq_lens, key_bounds):
    batch, seq_len, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    groups = num_heads // num_kv_heads
    tokens = batch * seq_len
    rows = 1 if seq_lens else batch
    num_seqs = len(seq_lens) if seq_lens else batch
    shape = {
        "H": num_heads,
        "HKV": num_kv_heads,
        "D": head_dim,
        "S": num_sinks,
        "BD": _block(head_dim),
        "IS_VARLEN": seq_lens is not None,
        "HAS_BOUNDS": key_bounds is not None,
    }

    # filled by the dq kernel
    delta = torch.empty_like(lse)

    tiles = _tiles("dq", head_dim, q.dtype, q.device)
    use_desc = _use_descriptors("dq", q, head_dim)
    pack = _pack(num_heads, num_kv_heads, tiles["BM"])
    blocks = _Blocks(seq_len, seq_lens, tiles["BM"] // pack, q.device)
    dq = torch.empty_like(q)
    grid_rows = rows * num_heads // pack
    sink_dk = sink_dv = None
    if num_sinks:
        # one partial per query block and tile of query heads; blocks whose queries never see a sink out of the
        # window leave theirs at zero
        partial_shape = (blocks.count, grid_rows, num_sinks, head_dim)
        sink_dk = torch.zeros(partial_shape, dtype=torch.float32, device=q.device)
        sink_dv = torch.zeros(partial_shape, dtype=torch.float32, device=q.device)
    num_full = _full_blocks("dq", blocks.count, tiles["BM"] // pack, seq_len, window, seq_lens is not None)
    sliding_bwd_dq_kernel[(blocks.count * grid_rows,)](
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
        _descriptor(k, tiles["BN"], use_desc),
        _descriptor(v, tiles["BN"], use_desc),
        cu_seqlens,
        blocks.index,
        key_bounds,
        scale,
        window,
        seq_len,
        tokens,
        grid_rows,
        num_full,
        BM=tiles["BM"],
        BN=tiles["BN"],
        BS=_block(num_sinks),
        USE_DESC=use_desc,
        PACK=pack,
        HEAVY_FIRST=HEAVY_BLOCKS_FIRST["dq"],
        **shape,
        **_launch_options(tiles),
    )
    if num_sinks:
        # [num_seqs, HKV, S, D]: summed over the query blocks of each sequence and the head tiles of each group
        sums = []
        tiles_per_group = groups // pack
        for partial in (sink_dk, sink_dv):
            if seq_lens is None:
                partial = partial.view(blocks.count, batch, num_heads // pack, num_sinks, head_dim).sum(0)
            else:
                partial = partial.new_zeros(num_seqs, num_heads // pack, num_sinks, head_dim).index_add_(
                    0, blocks.seq_ids, partial
                )
            sums.append(partial.view(num_seqs, num_kv_heads, tiles_per_group, num_sinks, head_dim).sum(2).contiguous())
        sink_dk, sink_dv = sums

    tiles = _tiles("dkdv", head_dim, q.dtype, q.device)
    use_desc = _use_descriptors("dkdv", q, head_dim)
    blocks = _Blocks(seq_len, seq_lens, tiles["BN"], q.device)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    grid_rows = rows * num_kv_heads
    num_full = _full_blocks("dkdv", blocks.count, tiles["BN"], seq_len, window, seq_lens is not None)
    sliding_bwd_dkdv_kernel[(blocks.count * grid_rows,)](
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
        _descriptor(q, tiles["BM"], use_desc),
        _descriptor(do, tiles["BM"], use_desc),
        cu_seqlens,
        blocks.index,
        key_bounds,
        scale,
        window,
        seq_len,
        tokens,
        grid_rows,
        num_full,
        BM=tiles["BM"],
        BN=tiles["BN"],
        USE_DESC=use_desc,
        **shape,
        **_launch_options(tiles),
    )
    dsink = None
    if sink_logits is not None:
        # d o / d z = -p_sink o, so dz = -sum_t p_sink(t) (do_t . o_t)
        p_sink = torch.exp2(sink_logits.float()[:, None] * math.log2(math.e) - lse)
        dsink = -(p_sink * delta).sum(1)
    return dq, dk, dv, dsink


class SlidingWindowAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sink_logits, window, num_sinks, scale, cu_seqlens, seq_lens, key_bounds):
        o, lse = _forward(q, k, v, sink_logits, window, num_sinks, scale, cu_seqlens, seq_lens, key_bounds)
        ctx.save_for_backward(q, k, v, o, lse, sink_logits, cu_seqlens, key_bounds)
        ctx.options = (window, num_sinks, scale, seq_lens)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, sink_logits, cu_seqlens, key_bounds = ctx.saved_tensors
        window, num_sinks, scale, seq_lens = ctx.options
        dq, dk, dv, dsink = _backward(
            q, k, v, o, lse, do.contiguous(), sink_logits, window, num_sinks, scale, cu_seqlens, seq_lens, key_bounds
        )
        if dsink is not None:
            dsink = dsink.to(sink_logits.dtype)
        return dq, dk, dv, dsink, None, None, None, None, None, None


def _zero_padding(k: torch.Tensor, v: torch.Tensor, key_bounds: torch.Tensor):
    """k and v with the keys outside each row's `[first, end)` set to 0: tensor-descriptor loads read them with the
    window's edge tiles, and a model's padding positions may hold anything, NaN and inf included."""
    positions = torch.arange(k.shape[1], device=k.device)
    padding = ((positions < key_bounds[:, :1]) | (positions >= key_bounds[:, 1:]))[:, :, None, None]
    return k.masked_fill(padding, 0), v.masked_fill(padding, 0)


def _check_head_dims(q, k, v):
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(
            f"expected q [B, T, H, D] and k, v [B, T, HKV, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3] or q.shape[2] % k.shape[2] != 0:
        raise ValueError(
            f"k and v must be [B, T, HKV, D] with the batch and head dim of q {tuple(q.shape)} and HKV dividing "
            f"its {q.shape[2]} heads, got {tuple(k.shape)}"
        )
    if q.shape[3] > MAX_HEAD_DIM:
        raise ValueError(f"head dims up to {MAX_HEAD_DIM} are supported, got {q.shape[3]}")


def _check_sink_logits(sink_logits, num_heads):
    if sink_logits is not None and tuple(sink_logits.shape) != (num_heads,):
        raise ValueError(f"sink_logits must be [H] = [{num_heads}], got {tuple(sink_logits.shape)}")


@torch.compiler.disable
def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    num_sink_tokens: int = 0,
    sink_logits: torch.Tensor | None = None,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    key_bounds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal sliding-window softmax attention, with a backward.

    Args:
        q: `[B, T, H, D]`. k, v: `[B, T, HKV, D]`, H a multiple of HKV.
        window: query t sees key s when 0 <= t - s < window.
        num_sink_tokens: the first tokens of each sequence (of each row's valid keys), visible to every later query.
        sink_logits: `[H]` learned logits that join each softmax denominator with no value (gpt-oss).
        scale: score scale, default D ** -0.5.
        cu_seqlens: `[N + 1]` cumulative lengths of sequences packed along T (then B must be 1).
        key_bounds: `[B, 2]` (first, end): row b's keys outside [first, end) are padding; the sinks start at first.
    Returns:
        `[B, T, H, D]` in q's dtype.
    """
    _check_head_dims(q, k, v)
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"q and k must have the same length, got {q.shape[1]} and {k.shape[1]}")
    batch, seq_len, num_heads, head_dim = q.shape
    if window < 1 or num_sink_tokens < 0:
        raise ValueError(f"expected window >= 1 and num_sink_tokens >= 0, got {window} and {num_sink_tokens}")
    _check_sink_logits(sink_logits, num_heads)
    if seq_len * num_heads * head_dim >= 2**31:
        raise ValueError(f"one sequence of {seq_len} tokens x {num_heads} heads x {head_dim} overflows int32 offsets")
    seq_lens = None
    if cu_seqlens is not None:
        if batch != 1:
            raise ValueError(
                f"The batch size is expected to be 1 rather than {batch} when using `cu_seqlens`. "
                "Please flatten variable-length inputs before processing."
            )
        if key_bounds is not None:
            raise ValueError("key_bounds (padding) cannot be combined with cu_seqlens (packed sequences)")
        bounds = cu_seqlens.tolist()
        seq_lens = [hi - lo for lo, hi in itertools.pairwise(bounds)]
        if not bounds or bounds[0] != 0 or bounds[-1] != seq_len or min(seq_lens, default=0) < 0:
            raise ValueError(f"cu_seqlens {cu_seqlens.tolist()} must rise from 0 to the {seq_len} packed tokens")
        cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    if key_bounds is not None:
        if tuple(key_bounds.shape) != (batch, 2):
            raise ValueError(f"key_bounds must be [B, 2] = [{batch}, 2], got {tuple(key_bounds.shape)}")
        key_bounds = key_bounds.to(device=q.device, dtype=torch.int32).contiguous()
    if seq_len == 0:
        return q.new_zeros(q.shape)
    scale = head_dim**-0.5 if scale is None else float(scale)
    dtype = q.dtype
    q, k, v = q.contiguous(), k.to(dtype).contiguous(), v.to(dtype).contiguous()
    if key_bounds is not None and any(_use_descriptors(kind, q, head_dim) for kind in ("fwd", "dq")):
        k, v = _zero_padding(k, v, key_bounds)
    return SlidingWindowAttentionFunction.apply(
        q, k, v, sink_logits, int(window), int(num_sink_tokens), scale, cu_seqlens, seq_lens, key_bounds
    )


@torch.compiler.disable
def sliding_window_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    query_start: int,
    sink_k: torch.Tensor | None = None,
    sink_v: torch.Tensor | None = None,
    sink_index: torch.Tensor | None = None,
    sink_logits: torch.Tensor | None = None,
    scale: float | None = None,
    first_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """A few queries against a bounded key/value cache (forward only): split-K over the cache, one combine.

    Args:
        q: `[B, Tq, H, D]` at absolute positions `query_start ... query_start + Tq - 1`.
        k, v: `[B, Tk, HKV, D]`, any strides with a contiguous last dim (e.g. a `[B, HKV, Tk, D]` cache transposed);
            the keys end at the last query (cached window followed by the current tokens).
        sink_k, sink_v: `[B, S, HKV, D]` sink tokens with absolute indices `sink_index` `[B, S]` (-1: none yet);
            a sink joins once it has left the window.
        sink_logits: `[H]` learned logits joining each softmax denominator.
        first_index: `[B]` absolute index of each row's first real token; earlier keys are padding.
    Returns:
        `[B, Tq, H, D]` in q's dtype.
    """
    _check_head_dims(q, k, v)
    if any(x is not None and x.requires_grad for x in (q, k, v, sink_k, sink_v, sink_logits)) and (
        torch.is_grad_enabled()
    ):
        raise RuntimeError("sliding_window_decode has no backward; use sliding_window_attention for training")
    batch, num_queries, num_heads, head_dim = q.shape
    num_keys, num_kv_heads = k.shape[1], k.shape[2]
    groups = num_heads // num_kv_heads
    _check_sink_logits(sink_logits, num_heads)
    num_sinks = 0 if sink_k is None else sink_k.shape[1]
    if num_sinks and (sink_v is None or sink_index is None or tuple(sink_index.shape) != (batch, num_sinks)):
        raise ValueError("sink_k needs sink_v [B, S, HKV, D] and sink_index [B, S]")
    if num_keys < num_queries:
        raise ValueError(f"the cache must end with the {num_queries} queries' own keys, got {num_keys} keys")
    if num_queries == 0:
        return q.new_zeros(q.shape)
    q = q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    # integer indices of any width: the kernel reads them as they are
    if num_sinks:
        sink_k, sink_v, sink_index = sink_k.contiguous(), sink_v.contiguous(), sink_index.contiguous()
    if first_index is not None:
        first_index = first_index.contiguous()
    scale = head_dim**-0.5 if scale is None else float(scale)

    rows = num_queries * groups
    block_m = min(64, _block(rows))
    row_tiles = triton.cdiv(rows, block_m)
    block_n = DECODE_BLOCK_N if q.is_cuda else 16
    target = max(1, int(DECODE_PROGRAMS_PER_SM * _num_sms(q.device)))
    splits = max(1, min(triton.cdiv(max(num_keys, 1), block_n), triton.cdiv(target, batch * num_kv_heads * row_tiles)))
    split_len = triton.cdiv(triton.cdiv(max(num_keys, 1), splits), block_n) * block_n
    splits = triton.cdiv(max(num_keys, 1), split_len)
    block_d = _block(head_dim)
    o_part = q.new_empty(batch * num_kv_heads, row_tiles, splits, block_m, block_d, dtype=torch.float32)
    lse_part = q.new_empty(batch * num_kv_heads, row_tiles, splits, block_m, dtype=torch.float32)
    sliding_decode_kernel[(splits, row_tiles, batch * num_kv_heads)](
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
        int(window),
        int(query_start),
        num_queries,
        num_keys,
        split_len,
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        H=num_heads,
        HKV=num_kv_heads,
        D=head_dim,
        S=num_sinks,
        BM=block_m,
        BN=block_n,
        BS=_block(num_sinks),
        BD=block_d,
        HAS_FIRST=first_index is not None,
        **DECODE_OPTIONS,
    )
    o = torch.empty_like(q)
    sliding_decode_combine_kernel[(row_tiles, batch * num_kv_heads)](
        o_part,
        lse_part,
        sink_logits,
        o,
        num_queries,
        splits,
        H=num_heads,
        HKV=num_kv_heads,
        D=head_dim,
        BM=block_m,
        BD=block_d,
        HAS_SINK_LOGITS=sink_logits is not None,
        num_warps=4,
    )
    return o
