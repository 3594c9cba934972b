"""Split-KV ("flash-decoding") softmax attention of one query token per sequence over a key/value cache, forward
only, registered as the torch custom op `hf_effattn::decode_attention`.

    decode_attention            the Triton kernels through the custom op: the form that eager code, torch.compile
                                graphs and CUDA-graph replays all run
    decode_attention_reference  the same in plain torch (fp32), for tests and CPUs

Layouts: q `[B, H, 1, D]` (the full-attention layer's query before its output transpose); k, v `[B, HKV, L, D]`,
transformers' cache layout, any strides with a contiguous last dim; H a multiple of HKV (GQA: query head h reads
key/value head h // (H / HKV)). The output is `[B, H, 1, D]` in q's dtype.

`kv_len` (int32/int64 tensor, `[B]`, `[1]` or 0-d) counts the valid keys of each row: the first `kv_len` positions of
a static cache buffer. The kernel reads it on the device, so one captured CUDA graph serves every decode step. None:
all L keys are valid. A row with no valid key gets a zero output.

One query token gives SDPA only B x H programs (16 at batch 1) on a GPU of 132 SMs. Here one program handles one
(row, kv head, split of the keys) with all the query heads of that group, so each key and value is read once; the
split count is chosen on the host from the static buffer length, B and HKV so that the programs fill the GPU. Each
split writes its normalised fp32 output and log-sum-exp; a second kernel merges the splits.
"""

import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError as error:  # the importer falls back to SDPA
    raise ImportError("the decode attention kernel needs triton (`pip install triton`)") from error

DECODE_OP_NAME = "hf_effattn::decode_attention"
MAX_HEAD_DIM = 256
# split programs to aim for per SM, and the fewest keys worth a split of their own
PROGRAMS_PER_SM = 4
MIN_SPLIT_KEYS = 256
MAX_SPLITS = 256
# (keys per tile, warps, pipeline stages) on a GPU, by element size; the interpreter (CPU) runs 16-key tiles
GPU_LAUNCH = {2: (64, 4, 3), 4: (32, 4, 2)}
# splits the merge kernel folds at a time
MERGE_CHUNK = 16
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def masked_attention_step(b_q, b_k, b_v, m_n, b_m, b_l, b_acc, qk_scale, PRECISION: tl.constexpr):
    """One online-softmax step of query rows `b_q` [BG, BD] over a key tile `b_k`, `b_v` [BN, BD] whose valid keys are
    `m_n` [BN] (at least one): returns the new (acc, running max, row sum), scores in log2 units (`qk_scale` = scale *
    log2(e)), so the running max stays finite. Also the block_topk decode kernel's step."""
    # [BG, BN]
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale
    b_s = tl.where(m_n[None, :], b_s, float("-inf"))
    b_mn = tl.maximum(b_m, tl.max(b_s, 1))
    b_p = tl.exp2(b_s - b_mn[:, None])
    b_alpha = tl.exp2(b_m - b_mn)
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    b_acc = tl.dot(b_p.to(b_v.dtype), b_v, b_acc * b_alpha[:, None], input_precision=PRECISION)
    return b_acc, b_mn, b_l


@triton.jit(do_not_specialize=["L", "stride_len"])
def decode_attention_split_kernel(
    q,
    k,
    v,
    kv_len,
    o_part,
    lse_part,
    scale,
    L,
    stride_len,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    H: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BG: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    MIN_SPLIT: tl.constexpr,
    HAS_KV_LEN: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One split of one row's valid keys for one kv head, against the group's query heads (rows of the tile)."""
    i_split, i_bh = tl.program_id(0), tl.program_id(1)
    num_splits = tl.num_programs(0)
    i_b, i_hkv = i_bh // HKV, i_bh % HKV
    G: tl.constexpr = H // HKV
    if HAS_KV_LEN:
        n_keys = tl.minimum(tl.maximum(tl.load(kv_len + i_b * stride_len).to(tl.int32), 0), L)
    else:
        n_keys = L
    # the valid keys in equal runs of whole tiles, at least MIN_SPLIT each: the last splits may get none
    split_len = tl.maximum(tl.cdiv(tl.cdiv(n_keys, num_splits), BN) * BN, MIN_SPLIT)
    lo = i_split * split_len
    hi = tl.minimum(lo + split_len, n_keys)

    o_g = tl.arange(0, BG)
    m_g = o_g < G
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    # [BG, BD] the group's queries (rows past G are zero and never stored)
    p_q = q + i_b.to(tl.int64) * stride_qb + (i_hkv * G + o_g).to(tl.int64)[:, None] * stride_qh + o_d[None, :]
    b_q = tl.load(p_q, mask=m_g[:, None] & m_d[None, :], other=0.0)
    k_base = k + i_b.to(tl.int64) * stride_kb + i_hkv.to(tl.int64) * stride_kh
    v_base = v + i_b.to(tl.int64) * stride_vb + i_hkv.to(tl.int64) * stride_vh
    qk_scale = scale * LOG2E
    b_m = tl.full([BG], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BG], dtype=tl.float32)
    b_acc = tl.zeros([BG, BD], dtype=tl.float32)
    for n0 in range(lo, hi, BN):
        o_n = n0 + tl.arange(0, BN)
        m_n = o_n < hi
        m_nd = m_n[:, None] & m_d[None, :]
        # [BN, BD]
        b_k = tl.load(k_base + o_n.to(tl.int64)[:, None] * stride_kt + o_d[None, :], mask=m_nd, other=0.0)
        b_v = tl.load(v_base + o_n.to(tl.int64)[:, None] * stride_vt + o_d[None, :], mask=m_nd, other=0.0)
        # every tile holds a valid key
        b_acc, b_m, b_l = masked_attention_step(b_q, b_k, b_v, m_n, b_m, b_l, b_acc, qk_scale, PRECISION)

    # an empty split stores a zero output and lse = -inf: it weighs nothing in the merge
    m_any = b_l > 0.0
    b_l = tl.where(m_any, b_l, 1.0)
    b_o = b_acc / b_l[:, None]
    b_lse = tl.where(m_any, (b_m + tl.log2(b_l)) * LN2, float("-inf"))
    # o_part [B, H, splits, D], lse_part [B, H, splits]
    i_row = (i_b * H + i_hkv * G + o_g).to(tl.int64) * num_splits + i_split
    tl.store(o_part + i_row[:, None] * D + o_d[None, :], b_o, mask=m_g[:, None] & m_d[None, :])
    tl.store(lse_part + i_row, b_lse, mask=m_g)


@triton.jit
def decode_attention_merge_kernel(
    o_part,
    lse_part,
    o,
    num_splits,
    stride_ob,
    stride_oh,
    H: tl.constexpr,
    D: tl.constexpr,
    BS: tl.constexpr,
    BC: tl.constexpr,
    BD: tl.constexpr,
):
    """o = sum over splits of exp(lse_split - lse) o_split for one (row, query head); zero when every split is
    empty."""
    i_bh = tl.program_id(0)
    i_b, i_h = i_bh // H, i_bh % H
    base = i_bh.to(tl.int64) * num_splits
    o_s = tl.arange(0, BS)
    b_lse = tl.load(lse_part + base + o_s, mask=o_s < num_splits, other=float("-inf"))
    b_top = tl.max(b_lse, 0)
    b_top = tl.where(b_top == float("-inf"), 0.0, b_top)
    b_total = tl.sum(tl.exp(b_lse - b_top), 0)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    b_acc = tl.zeros([BD], dtype=tl.float32)
    for s0 in range(0, num_splits, BC):
        o_c = s0 + tl.arange(0, BC)
        m_c = o_c < num_splits
        # [BC] weights (exp(-inf) = 0 for empty splits and padding), [BC, BD] split outputs
        b_w = tl.exp(tl.load(lse_part + base + o_c, mask=m_c, other=float("-inf")) - b_top)
        b_oc = tl.load(o_part + (base + o_c)[:, None] * D + o_d[None, :], mask=m_c[:, None] & m_d[None, :], other=0.0)
        b_acc += tl.sum(b_w[:, None] * b_oc, 0)
    b_o = b_acc / tl.where(b_total > 0.0, b_total, 1.0)
    tl.store(o + i_b.to(tl.int64) * stride_ob + i_h * stride_oh + o_d, b_o.to(o.dtype.element_ty), mask=m_d)


@functools.cache
def _num_sms(device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def num_splits_for(length: int, batch: int, kv_heads: int, device) -> int:
    """Splits of an L-key buffer: enough (batch x kv heads x splits) programs for PROGRAMS_PER_SM per SM, each with
    at least MIN_SPLIT_KEYS keys. Depends only on static sizes, so a captured graph keeps it."""
    wanted = triton.cdiv(PROGRAMS_PER_SM * _num_sms(device), batch * kv_heads)
    return max(1, min(wanted, length // MIN_SPLIT_KEYS, MAX_SPLITS))


def _decode_attention(q, k, v, kv_len, scale: float, num_splits: int) -> torch.Tensor:
    """The two launches; `num_splits` > 0 forces the split count (the keys are then spread over them in whole tiles,
    with no minimum per split)."""
    batch, num_heads, _, head_dim = q.shape
    num_kv_heads, length = k.shape[1], k.shape[2]
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if batch * num_heads == 0:
        return o
    if q.is_cuda:
        block_n, warps, stages = GPU_LAUNCH[2 if k.element_size() <= 2 else 4]
    else:
        block_n, warps, stages = 16, 4, 1
    min_split = MIN_SPLIT_KEYS
    if num_splits > 0:
        min_split = block_n
    else:
        num_splits = num_splits_for(length, batch, num_kv_heads, q.device)
    if kv_len is not None:
        kv_len = kv_len.reshape(-1).contiguous()
    groups = num_heads // num_kv_heads
    block_d = max(16, triton.next_power_of_2(head_dim))
    o_part = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    decode_attention_split_kernel[(num_splits, batch * num_kv_heads)](
        q,
        k,
        v,
        kv_len,
        o_part,
        lse_part,
        scale,
        length,
        0 if kv_len is None or kv_len.numel() == 1 else 1,
        # (batch, head) strides of q, (batch, head, position) strides of k and v
        *q.stride()[:2],
        *k.stride()[:3],
        *v.stride()[:3],
        H=num_heads,
        HKV=num_kv_heads,
        D=head_dim,
        BG=max(16, triton.next_power_of_2(groups)),
        BN=block_n,
        BD=block_d,
        MIN_SPLIT=min_split,
        HAS_KV_LEN=kv_len is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=warps,
        num_stages=stages,
    )
    decode_attention_merge_kernel[(batch * num_heads,)](
        o_part,
        lse_part,
        o,
        num_splits,
        o.stride(0),
        o.stride(1),
        H=num_heads,
        D=head_dim,
        BS=triton.next_power_of_2(num_splits),
        BC=min(MERGE_CHUNK, triton.next_power_of_2(num_splits)),
        BD=block_d,
        num_warps=4,
    )
    return o


def _decode_impl(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: torch.Tensor | None, scale: float, num_splits: int
) -> torch.Tensor:
    return _decode_attention(q, k, v, kv_len, scale, num_splits)


def _decode_fake(q, k, v, kv_len, scale, num_splits):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def _register():
    # this file is imported under two module names (the kernels package, and the flat copy beside the model that
    # checkpoints carry): the first import registers the op, later ones reuse it
    namespace, name = DECODE_OP_NAME.split("::")
    try:
        return getattr(getattr(torch.ops, namespace), name)
    except (AttributeError, RuntimeError):
        torch.library.custom_op(DECODE_OP_NAME, _decode_impl, mutates_args=()).register_fake(_decode_fake)
    return getattr(getattr(torch.ops, namespace), name)


_decode_op = _register()


def _check(q, k, v, kv_len):
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"q must be [B, H, 1, D] (one query token per row), got {tuple(q.shape)}")
    batch, num_heads, _, head_dim = q.shape
    if k.dim() != 4 or k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(
            f"k and v must both be [B, HKV, L, D] with q's B = {batch} and D = {head_dim}, got {tuple(k.shape)} and "
            f"{tuple(v.shape)}"
        )
    if k.shape[1] == 0 or num_heads % k.shape[1]:
        raise ValueError(f"the {num_heads} query heads must be a multiple of the {k.shape[1]} key/value heads")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head dims up to {MAX_HEAD_DIM} are supported, got {head_dim}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    if kv_len is not None and (
        kv_len.dtype not in (torch.int32, torch.int64) or kv_len.numel() not in (1, batch) or kv_len.device != q.device
    ):
        raise ValueError(
            f"kv_len must be an int32/int64 tensor of {batch} or 1 elements on q's device {q.device}, got "
            f"{kv_len.dtype} {tuple(kv_len.shape)} on {kv_len.device}"
        )


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_len: torch.Tensor | None = None,
    scale: float | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Softmax attention of one query token per row over the first `kv_len` keys of each row (forward only).

    Args:
        q: `[B, H, 1, D]`, D up to 256 (any, masked to the next power of two).
        k, v: `[B, HKV, L, D]`, q's dtype (fp32, fp16 or bf16); H % HKV == 0.
        kv_len: valid keys per row, an int32/int64 device tensor `[B]`, `[1]` or 0-d (values clamped to [0, L]);
            None = all L.
        scale: of the scores; None = D ** -0.5.
        num_splits: force the split count (tests); None = from L, B, HKV and the SM count.
    Returns:
        `[B, H, 1, D]` in q's dtype; zeros for rows with no valid key.
    """
    _check(q, k, v, kv_len)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _decode_op(q, k, v, kv_len, scale, int(num_splits or 0))


def decode_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_len: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """`decode_attention` in plain fp32 torch, with the same arguments; returns fp32 `[B, H, 1, D]`."""
    batch, num_heads, _, head_dim = q.shape
    num_kv_heads, length = k.shape[1], k.shape[2]
    scale = head_dim**-0.5 if scale is None else float(scale)
    # [B, HKV, G, D]: query head h = kv head * G + g
    queries = q.float().reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    # [B, HKV, G, L]
    scores = queries @ k.float().transpose(-1, -2) * scale
    if kv_len is None:
        valid = torch.ones(batch, length, dtype=torch.bool, device=q.device)
    else:
        valid = torch.arange(length, device=q.device) < kv_len.reshape(-1, 1).to(q.device)
        valid = valid.expand(batch, length)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = scores.softmax(-1).masked_fill(~valid.any(-1)[:, None, None, None], 0.0)
    return (probs @ v.float()).reshape(batch, num_heads, 1, head_dim)
