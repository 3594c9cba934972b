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

Launch configs (V block, warps, pipeline stages) and the segment length of the sequential passes are tuned on a
CUDA device at the first call of each shape class: every candidate runs once, is checked against the first
candidate's results and timed, and the fastest is kept (`tuned_configs()` lists the choices). `TUNE = False` keeps
the first candidates.
"""

import itertools
import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from .linear_attn_kernels import (
    chunk_combine_kernel,
    chunk_cumsum_kernel,
    chunk_grad_kernel,
    chunk_pairwise_bwd_kernel,
    chunk_pairwise_fwd_kernel,
    chunk_segment_fwd_kernel,
    chunk_state_bwd_kernel,
    chunk_state_fwd_kernel,
    chunk_state_fwd_t_kernel,
    chunk_wu_fwd_kernel,
    chunk_wy_fwd_kernel,
    fused_recurrent_fwd_kernel,
    triton,
)
from .sliding_window import takes_register_caps

CHUNK_SIZE = 64
# sub-block of the per-channel pairwise kernels
SUB_CHUNK = 16
MAX_HEAD_DIM = 256
# u = Ai (beta v) and the pseudo-values vn = u - w h are stored in fp32: vn cancels when the state predicts v well
# (u, w and vn in bf16 put the GDN output 0.014 off the fp64 reference, fp32 0.0018). w = Ai (beta k exp(b)) is
# stored in this dtype, or (None) in the input dtype when there is a decay and in fp32 when there is none (without
# decay its rounding accumulates in the state: DeltaNet's final state 1.2e-3 off at T = 640 in bf16, 4e-6 in fp32);
# w h is formed from two bf16 halves of h (`_dot_split`).
W_DTYPE: torch.dtype | None = None
# the forward's state passes form the pseudo-values from Ai, beta, k and v (False), instead of storing w and u and
# reading them back (True). A training forward stores w either way (the backward's state pass reads it); its state
# passes keep the split products. On an H100 (bf16, H = 16, D = 128) GDN's forward + backward took 9.33 -> 8.84 ms at
# B = 2, T = 32k and 18.35 -> 17.36 ms at B = 1, T = 128k (True -> False; the state pass 1.82 -> 1.64 ms and the w/u
# kernel 0.71 -> 0.39 ms at 32k), and the backward no longer keeps u
WY_IN_MEMORY = False
# (gate, delta rule) pairs whose forwards without a backward run the sequential pass in transposed form
# (`chunk_state_fwd_t_kernel`, where the state-dependent operand of every product is the one an MMA reads from
# registers) instead of `chunk_state_fwd_kernel`. On an H100 (bf16, B = 32, T = 2k, H = 16, D = 128) the forward
# took: GLA 4.91 -> 4.66 ms, GDN 1.762 -> 1.743 ms; KDA 7.29 -> 7.99 ms while its passes formed the gated keys
# themselves, and 3.30 -> 3.25 ms with the pregated operands below (1-2% faster at every length)
STATE_PASS_TRANSPOSED = {(0, True), (1, True), (2, False), (2, True)}
# per-channel decays, forwards without a backward: the pairwise kernel also writes the gated operands of the
# sequential passes (scale q e^b, k e^(b_last - b) and, delta rule, k e^b, in the input dtype, as those passes
# rounded them), which then read them instead of q, k and the fp32 decays and form no exponential on their chain
PREGATED_OPERANDS = True
# forwards without a backward form the state's products on the recurrence (S k^T for the pseudo-values, the state
# update, the segment maps) with one bf16 MMA, the state rounded to bf16 as fla rounds it, instead of two
# (`_dot_split`: the state as two bf16 halves, about 16 bits). On an H100 (bf16, H = 16, D = 128) GDN's forward took
# 1.712 -> 1.514 ms at B = 32, T = 2k, 2.655 -> 2.191 ms at B = 2, T = 32k and 5.353 -> 4.405 ms at B = 1, T = 128k;
# KDA's 3.261 -> 3.115 ms and 4.163 -> 3.804 ms. Against the fp64 recurrence the outputs did not move (GDN 2.02e-3
# -> 2.05e-3 relative RMS at T = 8k, KDA 2.50e-3 -> 2.52e-3 at 4k) and the final states kept within the 5e-3
# bound: GDN 4.1e-4 -> 1.75e-3, KDA 1.65e-3 -> 2.36e-3. Training keeps the split products: its stored states feed
# the backward's gradients. True: split products everywhere. Without it, and with a decay, Ai times the residual is
# one bf16 MMA too instead of a tf32 one (`_dot_ai`; see kernels/README.md for its measurements)
SPLIT_STATE_PRODUCTS = False
# launch candidates (V block, warps, stages[, register cap]) of the segment maps (`chunk_segment_fwd_kernel`). With
# single bf16 products (forwards without a backward) the 4-warp kernel needs 170 registers and 74 KB of shared memory
# for GDN (Triton 3.6, sm_90): capped at 168 registers, without spilling, three programs share an SM instead of two.
# On an H100 (bf16, H = 16, D = 128) GDN's segment maps took 0.678 -> 0.431 ms at B = 2, T = 32k and 1.371 ->
# 1.187 ms at B = 1, T = 128k (profiler); KDA's need 98 KB of shared memory, so two programs per SM either way, and
# the two candidates time alike for them
SEGMENT_CANDIDATES = ((64, 4, 2), (64, 4, 2, 168), (64, 8, 2))
# per-head decays, delta rule (GDN): the segment maps skip what the decays have erased. Where every transition of a
# sequence contracts the state by its decay (g <= 0 and 0 <= beta |k|^2 <= 2, checked per chunk by the WY kernel),
# the writes of a chunk reach the end of its segment scaled by at most the decay in between; chunks from which that
# is below exp(-DECAY_HORIZON) are left out of the segment's C, and M is zero when the whole segment decays that far.
# exp(-70) < 2^-100: what is left out stays below 2^-100 of the sum of the writes' norms, far under fp32 rounding.
# Weak decays (long memories) skip nothing and cost what they did. None: never skip
DECAY_HORIZON: float | None = 70.0
# key channels per program of the backward's gradient kernel (`chunk_grad_kernel`; None: all of K). In blocks, a
# program holds a block's share of the [BT, K] accumulators and the grid has a program per block; the products over
# V that involve no key channels (dP, dA) are formed by each of them. On an H100 (bf16, B = 2, T = 32k, H = 16,
# D = 128) the kernel took 4.31 ms in blocks of 64 (4 warps, tuned) and 4.33 ms whole (8 warps): alike, but blocks
# bound the registers a larger K needs
GRAD_KEY_BLOCK: int | None = 64
# its launch candidates (V block, warps, stages), for key blocks of at least 64 channels and for narrower ones
GRAD_CANDIDATES = {
    True: ((32, 8, 3), (32, 8, 2), (64, 8, 2), (16, 8, 2), (32, 4, 2), (64, 4, 2)),
    False: ((32, 4, 3), (32, 8, 2), (64, 8, 2), (16, 8, 2), (64, 4, 2)),
}
# launch candidates of the per-channel pairwise kernel: BC rows per program, a whole chunk (64) or a 16-row
# sub-block. On an H100 (bf16, H = 16, D = 128, pregated operands; whole forward, B = 32, T = 2k): whole chunks at 8
# warps took 2.02 ms (GLA) and 3.24 ms (KDA), at 16 warps 1.89 / 3.24 ms, 16-row sub-blocks at 2 warps 2.15 /
# 4.38 ms. Where a chunk's decays exceed `DIAGONAL_SPAN` (the chunk is then formed sub-block by sub-block) the order
# turns: with log decays of -5 softplus(N(0, 1)) per step, 16-row programs took 4.13 / 6.62 ms, whole chunks at 8
# warps 6.9-7.8 / 10.7-11.6 ms and at 16 warps 8.4 / 21.8 ms. The tuner times the first call's decays
PAIRWISE_CONFIGS = [
    {"BC": CHUNK_SIZE, "num_warps": 8, "num_stages": 1},
    {"BC": CHUNK_SIZE, "num_warps": 8, "num_stages": 2},
    {"BC": CHUNK_SIZE, "num_warps": 16, "num_stages": 2},
    {"BC": SUB_CHUNK, "num_warps": 2, "num_stages": 2},
    {"BC": CHUNK_SIZE, "num_warps": 4, "num_stages": 2},
    {"BC": SUB_CHUNK, "num_warps": 4, "num_stages": 3},
    {"BC": SUB_CHUNK, "num_warps": 2, "num_stages": 3},
]

# tune launch configs on CUDA devices (the first candidate of each list is used otherwise)
TUNE = True
# do_bench budget of one candidate (ms): a first call of a new shape class costs about this per candidate
TUNE_WARMUP_MS, TUNE_REP_MS = 3, 15
# relative RMS difference from the first candidate's results above which a candidate is rejected as miscompiled
TUNE_REJECT_DIFF = 1e-2
# testing overrides: {kernel name: index of the candidate to launch}, and the segment length (chunks) of the
# sequential passes (0: whole sequences)
CONFIG_OVERRIDE: dict[str, int] = {}
SEGMENT_CHUNKS: int | None = None

_CHOICES: dict[tuple, dict] = {}


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


# programs per SM that the fused recurrent kernel's V blocks aim for
STATE_PROGRAMS_PER_SM = 1


def _state_block_v(value_dim: int, programs: int, device) -> int:
    """V block of the fused recurrent kernel: the largest of 64/32/16 that still gives every SM
    `STATE_PROGRAMS_PER_SM` programs, so that a few sequences run on more than B * HV programs. (The chunked
    sequential passes use V blocks of 64 and get their programs from segments; see `_state_pass_configs`.)"""
    block = _block(value_dim, 64)
    while block > 16 and programs * triton.cdiv(value_dim, block) < STATE_PROGRAMS_PER_SM * _num_sms(device):
        block //= 2
    return block


def _size_class(n: int) -> int:
    """Tuning keys hold sizes rounded to powers of two, so that a new length rarely triggers a new tuning."""
    return max(int(n), 1).bit_length()


def _configs(dtype: torch.dtype, dim: int, candidates, device=None) -> list[dict]:
    """Launch configs from (V block, warps, stages[, register cap]) tuples: V blocks capped at the padded dim, one
    stage for fp32 inputs, duplicates dropped (order kept: the first is the untuned default). A register cap
    (`maxnreg`, registers per thread) is kept for 16-bit inputs on a CUDA `device` whose Triton takes one, and
    dropped otherwise (the candidate then equals its uncapped twin)."""
    configs = []
    capped = device is not None and device.type == "cuda" and dtype != torch.float32 and takes_register_caps()
    for block, warps, stages, *cap in candidates:
        config = {"BV": _block(dim, block), "num_warps": warps, "num_stages": _stages(dtype, stages)}
        if cap and capped:
            config["maxnreg"] = cap[0]
        if config not in configs:
            configs.append(config)
    return configs


def _label(config: dict) -> str:
    return " ".join(f"{key}={value}" for key, value in config.items())


def _tuning(device) -> bool:
    return TUNE and device.type == "cuda" and not torch.cuda.is_current_stream_capturing()


def _difference(results, reference) -> float:
    """Largest relative RMS difference between two lists of tensors (inf where one is non-finite and the other
    is not)."""
    worst = 0.0
    for a, b in zip(results, reference, strict=True):
        a, b = a.double(), b.double()
        finite_a, finite_b = torch.isfinite(a), torch.isfinite(b)
        if not torch.equal(finite_a, finite_b):
            return float("inf")
        a, b = a[finite_b], b[finite_b]
        scale = b.pow(2).mean().sqrt().clamp_min(1e-30) if b.numel() else 1.0
        worst = max(worst, float((a - b).pow(2).mean().sqrt() / scale) if b.numel() else 0.0)
    return worst


def _pick(name: str, key: tuple, options: list, run, outputs, device):
    """The option to use for `name` at `key`: the first, or when tuning the fastest of those whose results (the
    tensors `outputs()` returns after `run(option)`) match the first's."""
    if len(options) == 1 or not _tuning(device):
        return options[0]
    full_key = (name, *key)
    if full_key in _CHOICES:
        return _CHOICES[full_key]["choice"]
    reference, timings, best, best_ms = None, {}, None, float("inf")
    start = time.perf_counter()
    for option in options:
        label = option if isinstance(option, str) else (_label(option) if isinstance(option, dict) else str(option))
        try:
            # NaN first: a candidate that leaves part of an output unwritten differs from the reference there
            for x in outputs():
                if x.is_floating_point():
                    x.fill_(float("nan"))
            run(option)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except Exception as error:  # noqa: BLE001 (compile failures, e.g. too much shared memory, rule out a candidate)
            timings[label] = f"failed: {type(error).__name__}: {str(error)[:200]}"
            continue
        results = [x.clone() for x in outputs()]
        if reference is None:
            reference = results
        else:
            difference = _difference(results, reference)
            if not difference <= TUNE_REJECT_DIFF:
                timings[label] = f"rejected: results differ from the first candidate's by {difference:.1e}"
                continue
        ms = triton.testing.do_bench(lambda option=option: run(option), warmup=TUNE_WARMUP_MS, rep=TUNE_REP_MS)
        timings[label] = ms
        if ms < best_ms:
            best, best_ms = option, ms
    if best is None:
        # every candidate failed: launch the first, which raises its error
        best = options[0]
    seconds = time.perf_counter() - start
    _CHOICES[full_key] = {"kernel": name, "key": key, "choice": best, "timings": timings, "seconds": seconds}
    return best


def _precompile(kernel, grid, configs, args, kwargs):
    """Compiles the candidate configs in parallel threads (Triton's asynchronous compile mode), so that tuning
    waits for the slowest compile rather than their sum; on any failure the launches compile them instead."""
    try:
        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:
        return
    try:
        workers = min(len(configs), os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=workers) as pool, AsyncCompileMode(pool, ignore_errors=True):
            for config in configs:
                kernel.warmup(*args, grid=grid(config), **kwargs, **config)
    except Exception:  # noqa: BLE001, S110 (the launches compile serially instead)
        pass


def _launch(kernel, grid, configs: list[dict], key: tuple, args: tuple, kwargs: dict, outputs: tuple, device):
    """kernel[grid(config)](*args, **kwargs, **config), config one of `configs` (see `_pick`); the tuning key adds
    the constexpr arguments and the tensor dtypes to `key`. Kernels tuned this way only write their outputs."""
    name = kernel.fn.__name__
    if name in CONFIG_OVERRIDE:
        config = configs[min(CONFIG_OVERRIDE[name], len(configs) - 1)]
        _CHOICES[(name, "override", *key)] = {
            "kernel": name,
            "key": key,
            "choice": config,
            "timings": {},
            "seconds": 0.0,
        }
    else:
        dtypes = tuple(str(x.dtype) for x in args if isinstance(x, torch.Tensor))
        full_key = (*key, tuple(sorted(kwargs.items())), dtypes)
        if len(configs) > 1 and _tuning(device) and (name, *full_key) not in _CHOICES:
            _precompile(kernel, grid, configs, args, kwargs)

        def run(config):
            kernel[grid(config)](*args, **kwargs, **config)

        config = _pick(name, full_key, configs, run, lambda: [x for x in outputs if x is not None], device)
    kernel[grid(config)](*args, **kwargs, **config)


def tuned_configs() -> list[dict]:
    """The tuning choices made so far: kernel (or pass) name, key, choice, the timing (ms) or fate of every candidate,
    and the seconds its runs took (a segment-length choice includes the tunings of the kernels it ran first)."""
    return [dict(entry) for entry in _CHOICES.values()]


class _Chunks:
    """Where each chunk lives: per-program chunk list and per-sequence first chunk for packed sequences."""

    def __init__(self, batch: int, seq_len: int, cu_seqlens: torch.Tensor | None, device):
        self.is_varlen = cu_seqlens is not None
        self.cu_seqlens = cu_seqlens
        self.device = device
        if cu_seqlens is None:
            self.num_seqs = batch
            self.per_row = triton.cdiv(seq_len, CHUNK_SIZE)
            self.total = batch * self.per_row
            self.counts = [self.per_row] * batch
            self.indices = self.offsets = None
            return
        bounds = cu_seqlens.tolist()
        self.counts = [triton.cdiv(hi - lo, CHUNK_SIZE) for lo, hi in itertools.pairwise(bounds)]
        pairs = [(n, c) for n, count in enumerate(self.counts) for c in range(count)]
        starts = [0]
        for count in self.counts[:-1]:
            starts.append(starts[-1] + count)
        self.num_seqs = len(self.counts)
        self.per_row = len(pairs)
        self.total = len(pairs)
        self.indices = torch.tensor(pairs or [(0, 0)], dtype=torch.int32, device=device)
        self.offsets = torch.tensor(starts, dtype=torch.int64, device=device)


class _Segments:
    """The units of the sequential passes: whole sequences, or runs of `length` chunks of them (split), which
    `chunk_segment_fwd_kernel` and `chunk_combine_kernel` join."""

    def __init__(self, chunks: _Chunks, length: int | None):
        longest = max(chunks.counts, default=0)
        self.split = bool(length) and length < longest
        self.length = length if self.split else max(longest, 1)
        self.table = self.offsets = None
        if not chunks.is_varlen:
            self.per_seq = triton.cdiv(chunks.per_row, self.length) if self.split else 1
            self.total = chunks.num_seqs * self.per_seq
            return
        self.per_seq = 1
        if self.split:
            starts = [[(n, c) for c in range(0, count, self.length)] for n, count in enumerate(chunks.counts)]
        else:
            # one segment per sequence, empty ones included: their final state is their initial state
            starts = [[(n, 0)] for n in range(chunks.num_seqs)]
        table = [pair for pairs in starts for pair in pairs]
        self.total = len(table)
        self.table = torch.tensor(table or [(0, 0)], dtype=torch.int32, device=chunks.device)
        self.offsets = torch.tensor(
            [0, *itertools.accumulate(len(pairs) for pairs in starts)], dtype=torch.int64, device=chunks.device
        )


def _segment_options(chunks: _Chunks, num_v_heads: int, value_dim: int, device) -> list[int]:
    """Segment lengths (chunks; 0 = whole sequences) to try for the sequential passes, the untuned choice first.
    Sequences are split when they give fewer than four programs per SM at V blocks of 64, into segments that give
    about four; below one program per SM whole sequences are not tried."""
    if SEGMENT_CHUNKS is not None:
        return [SEGMENT_CHUNKS]
    longest = max(chunks.counts, default=0)
    programs = chunks.num_seqs * num_v_heads * triton.cdiv(value_dim, 64)
    sms = _num_sms(device)
    if programs >= 4 * sms or longest < 32:
        return [0]
    length = max(16, triton.next_power_of_2(triton.cdiv(longest * programs, 4 * sms)))
    options = [length, length // 2, 2 * length] if programs < sms else [0, length, 2 * length]
    return [x for x in options if x == 0 or 16 <= x <= longest // 2] or [0]


def _chunk_cumsum(x, cu_seqlens, chunks, reverse, out_dtype):
    batch, seq_len = x.shape[:2]
    # per-head decays: one program per chunk sums every head, as the channels of one head (the same memory). On an
    # H100 (B = 1, T = 128k, 16 heads) this took 0.030 -> 0.006 ms against one program per chunk and head
    num_v_heads, width = x.shape[2:] if x.dim() == 4 else (1, x.shape[2])
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    chunk_cumsum_kernel[(chunks.per_row * batch * num_v_heads,)](
        x,
        y,
        cu_seqlens,
        chunks.indices,
        seq_len,
        batch * num_v_heads,
        HV=num_v_heads,
        G=width,
        BG=triton.next_power_of_2(width),
        BT=CHUNK_SIZE,
        REVERSE=reverse,
        IS_VARLEN=chunks.is_varlen,
    )
    return y


def _shape(q, v, chunks) -> dict:
    """The constexpr shape arguments shared by the chunk kernels."""
    return {
        "H": q.shape[2],
        "HV": v.shape[2],
        "K": q.shape[3],
        "BT": CHUNK_SIZE,
        "BK": _block(q.shape[3], MAX_HEAD_DIM),
        "IS_VARLEN": chunks.is_varlen,
    }


def _horizon(expand) -> float:
    """The decay horizon the kernels get: `DECAY_HORIZON` where the WY kernel's contraction flags `expand` exist, 0
    (none) otherwise."""
    return float(DECAY_HORIZON) if expand is not None and DECAY_HORIZON else 0.0


def _join_segments(
    k,
    w,
    y,
    b,
    initial_state,
    final_state,
    segments,
    chunks,
    shape,
    value_dim,
    gate,
    delta,
    reverse,
    maps=None,
    ai=None,
    beta=None,
    gated=None,
    split=True,
    expand=None,
):
    """The state (reverse: state gradient) at every segment boundary: the map M S + C across each segment, then a
    sequential pass over the segments. y: the segments' C (reverse) or the writes (u, or v for additive writes and
    when the delta rule's writes come from `ai` and `beta`) to compute it from; gated: the pairwise kernel's gated
    operands (qg, kl, kb), or None; split: the maps' state products as two bf16 MMAs (`SPLIT_STATE_PRODUCTS`);
    expand: the WY kernel's per-sequence flags of non-contracting transitions, which enable `DECAY_HORIZON` where
    they are 0 (None: no horizon). Returns (hs `[NS, HV, K, V]`, M)."""
    seq_len, num_v_heads, key_dim = k.shape[1], shape["HV"], shape["K"]
    device = k.device
    common = (chunks.cu_seqlens, chunks.offsets, segments.table, seq_len, segments.per_seq, segments.length)
    key = (_size_class(segments.total * num_v_heads), _size_class(segments.length))
    if maps is None:
        maps = k.new_empty(segments.total, num_v_heads, key_dim, key_dim, dtype=torch.float32)
        # reverse: M only (the columns past K are not launched)
        ct = maps if reverse else k.new_empty(segments.total, num_v_heads, key_dim, value_dim, dtype=torch.float32)
        kwargs = {
            "V": value_dim,
            "GATE": gate,
            "DELTA": delta,
            "FROM_AI": ai is not None,
            "PREGATED": gated is not None,
            "SKIP_ENDS": not reverse,
            "FIRST_M": reverse or initial_state is not None,
            "SPLIT": split,
            "HORIZON": _horizon(expand),
            **shape,
        }
        kl, kb = (None, None) if gated is None else gated[1:]
        _launch(
            chunk_segment_fwd_kernel,
            lambda c: (
                triton.cdiv(key_dim, c["BV"]) + (0 if reverse else triton.cdiv(value_dim, c["BV"])),
                segments.total * num_v_heads,
            ),
            _configs(k.dtype, max(key_dim, value_dim), SEGMENT_CANDIDATES, device),
            (*key, reverse),
            (k, w, y, b, ai, beta, kl, kb, maps, ct, expand, *common),
            kwargs,
            (maps, ct),
            device,
        )
        if not reverse:
            y = ct
    hs = k.new_empty(segments.total, num_v_heads, key_dim, value_dim, dtype=torch.float32)
    num_seqs = chunks.num_seqs
    _launch(
        chunk_combine_kernel,
        lambda c: (triton.cdiv(value_dim, c["BV"]), num_seqs * num_v_heads),
        _configs(torch.float32, value_dim, ((32, 8, 1), (16, 8, 1), (32, 8, 2), (64, 8, 1))),
        (_size_class(num_seqs * num_v_heads), _size_class(segments.per_seq)),
        (maps, y, initial_state, hs, final_state, segments.offsets, segments.per_seq),
        {
            "HV": num_v_heads,
            "K": key_dim,
            "V": value_dim,
            "BK": shape["BK"],
            "REVERSE": reverse,
            "USE_INITIAL_STATE": initial_state is not None,
            "STORE_FINAL_STATE": final_state is not None,
            "SKIP_ENDS": not reverse,
            "IS_VARLEN": chunks.is_varlen,
        },
        (hs, final_state),
        device,
    )
    return hs, maps


def _state_pass_configs(dtype, value_dim):
    """(V block, warps, stages) candidates of the sequential passes, all with V blocks of 64 (the segments, not
    narrower V blocks, give long sequences enough programs).

    Narrower V blocks are left out: on the H100 with Triton 3.6 several of them are miscompiled (V blocks of 16 and
    32 made illegal memory accesses in DeltaNet's forward pass, whose `w` is fp32; V blocks of 32 with one pipeline
    stage did in GDN's forward pass, and gave wrong gradients in its backward pass). A tuner cannot survive a
    candidate that corrupts the CUDA context. `scripts/check_kernels_gpu.py --candidates` checks each candidate
    alone."""
    return _configs(dtype, value_dim, ((64, 4, 2), (64, 8, 2), (64, 4, 1)))


def _state_fwd(
    q,
    k,
    v,
    w,
    u,
    b,
    ai,
    beta,
    aqk,
    o,
    h,
    vn,
    initial_state,
    final_state,
    scale,
    chunks,
    shape,
    gate,
    delta,
    gated,
    expand=None,
):
    """The forward sequential pass: o, and h and vn when given (for the backward); final_state when given. The delta
    rule's pseudo-values come from w and u, or from `ai` and `beta` when u is None (w may then be given for the
    backward; the passes do not read it). gated: the pairwise kernel's gated operands (qg, kl, kb) to read instead of
    q, k and b (forwards without a backward), or None. expand: see `_join_segments`."""
    qg, kl, kb = (None, None, None) if gated is None else gated
    from_ai = delta and u is None
    # h is stored for a backward only
    split = SPLIT_STATE_PRODUCTS or h is not None
    seq_len, num_v_heads, key_dim, value_dim = q.shape[1], v.shape[2], q.shape[3], v.shape[3]
    device = q.device

    def run(length):
        segments = _Segments(chunks, length)
        if segments.split:
            h0, _ = _join_segments(
                k,
                w,
                u if delta and not from_ai else v,
                b,
                initial_state,
                final_state,
                segments,
                chunks,
                shape,
                value_dim,
                gate,
                delta,
                reverse=False,
                ai=ai if from_ai else None,
                beta=beta,
                gated=gated,
                split=split,
                expand=expand,
            )
            init = 2
        else:
            h0, init = initial_state, 0 if initial_state is None else 1
        programs = segments.total * num_v_heads
        transposed = h is None and (from_ai or not delta) and (gate, delta) in STATE_PASS_TRANSPOSED
        _launch(
            chunk_state_fwd_t_kernel if transposed else chunk_state_fwd_kernel,
            lambda c: (triton.cdiv(value_dim, c["BV"]), programs),
            _state_pass_configs(q.dtype, value_dim),
            (_size_class(programs), _size_class(segments.length)),
            (
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
                final_state,
                chunks.cu_seqlens,
                chunks.offsets,
                segments.table,
                scale,
                seq_len,
                segments.per_seq,
                segments.length,
            ),
            {
                "V": value_dim,
                "GATE": gate,
                "DELTA": delta,
                "FROM_AI": from_ai,
                "PREGATED": gated is not None,
                "INIT": init,
                # the last segment of each sequence writes its final state (the combine kernel does not form it)
                "STORE_FINAL_STATE": final_state is not None,
                "STORE_STATES": h is not None,
                "SPLIT": split,
                **shape,
            },
            (o, h, vn, final_state),
            device,
        )

    options = _segment_options(chunks, num_v_heads, value_dim, device)
    key = (
        _size_class(chunks.num_seqs * num_v_heads),
        _size_class(max(chunks.counts, default=0)),
        q.dtype,
        gate,
        delta,
        key_dim,
        value_dim,
        h is not None,
        gated is not None,
        initial_state is not None,
        final_state is not None,
    )
    run(
        _pick(
            "state_fwd segment length",
            key,
            options,
            run,
            lambda: [x for x in (o, final_state) if x is not None],
            device,
        )
    )


def _state_bwd(q, k, w, b, aqk, do, dh, dvn, dht, dh0, scale, chunks, shape, gate, delta, expand=None):
    """The backward sequential pass: dh, dvn, and dh0 when given. expand: see `_join_segments`."""
    seq_len, num_v_heads, key_dim, value_dim = q.shape[1], do.shape[2], q.shape[3], do.shape[3]
    device = q.device

    def launch(segments, init, final, store, state_in, state_out):
        programs = segments.total * num_v_heads
        # the decay horizon applies to a segment's own share of its entering state's gradient
        horizon = _horizon(expand) if init == 0 and final == 2 and not store else 0.0
        _launch(
            chunk_state_bwd_kernel,
            lambda c: (triton.cdiv(value_dim, c["BV"]), programs),
            _state_pass_configs(q.dtype, value_dim),
            (_size_class(programs), _size_class(segments.length)),
            (
                q,
                k,
                w,
                b,
                aqk,
                do,
                dh,
                dvn,
                state_in,
                state_out,
                expand if horizon else None,
                chunks.cu_seqlens,
                chunks.offsets,
                segments.table,
                scale,
                seq_len,
                segments.per_seq,
                segments.length,
            ),
            {
                "V": value_dim,
                "GATE": gate,
                "DELTA": delta,
                "INIT": init,
                "FINAL": final,
                "STORE_STATES": store,
                "HORIZON": horizon,
                **shape,
            },
            (dh, dvn, state_out) if store else (state_out,),
            device,
        )

    def run(length):
        segments = _Segments(chunks, length)
        if not segments.split:
            launch(segments, 0 if dht is None else 1, 0 if dh0 is None else 1, True, dht, dh0)
            return
        # per segment, the gradient of its entering state from its own chunks (C of the reverse map)
        local = k.new_empty(segments.total, num_v_heads, key_dim, value_dim, dtype=torch.float32)
        launch(segments, 0, 2, False, None, local)
        dhs, _ = _join_segments(
            k, w, local, b, dht, dh0, segments, chunks, shape, value_dim, gate, delta, reverse=True, expand=expand
        )
        launch(segments, 2, 0, True, dhs, None)

    options = _segment_options(chunks, num_v_heads, value_dim, device)
    key = (
        _size_class(chunks.num_seqs * num_v_heads),
        _size_class(max(chunks.counts, default=0)),
        q.dtype,
        gate,
        delta,
        key_dim,
        value_dim,
        dht is not None,
        dh0 is not None,
    )
    run(
        _pick(
            "state_bwd segment length", key, options, run, lambda: [x for x in (dh, dvn, dh0) if x is not None], device
        )
    )


def rule_of(g: torch.Tensor | None, beta: torch.Tensor | None) -> tuple[int, bool]:
    """(GATE, DELTA) of the kernels for log decays g (or their cumulative sums) and writes beta: GATE 0 without a
    decay, 1 per head (`[B, T, HV]`), 2 per key channel (`[B, T, HV, K]`); DELTA when beta is given."""
    return 0 if g is None else (1 if g.dim() == 3 else 2), beta is not None


def _chunk_fwd(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, chunks, needs_grad):
    batch, seq_len, _, key_dim = q.shape
    num_v_heads, value_dim = v.shape[2], v.shape[3]
    gate, delta = rule_of(g, beta)
    shape = _shape(q, v, chunks)
    pair_shape = (batch, seq_len, num_v_heads, CHUNK_SIZE)
    device = q.device

    gated = None
    if gate == 2 and PREGATED_OPERANDS and not (needs_grad or WY_IN_MEMORY):
        gated_shape = (batch, seq_len, num_v_heads, key_dim)
        gated = tuple(q.new_empty(gated_shape) for _ in range(3 if delta else 2))
        gated += (None,) * (3 - len(gated))
    b = None if g is None else _chunk_cumsum(g, cu_seqlens, chunks, False, torch.float32)
    aqk = akk = None
    if gate == 2:
        # the kernels write the zero blocks above the diagonal too
        # without a backward (single bf16 products) the scores P are stored, and multiply vn, in bf16, as fla forms
        # them. On an H100 (bf16, H = 16, D = 128) KDA's forward took 3.115 -> 2.926 ms at B = 32, T = 2k and
        # 3.747 -> 3.634 ms at B = 2, T = 32k, GLA's 1.864 -> 1.772 and 2.081 -> 1.991 ms; against the fp64
        # recurrence the output moved from 2.84e-3 to 3.44e-3 relative RMS (KDA, T = 4k) and from 2.06e-3 to
        # 2.50e-3 (GLA), the final state not at all
        single = not (needs_grad or SPLIT_STATE_PRODUCTS) and q.dtype == torch.bfloat16
        aqk = q.new_empty(pair_shape, dtype=torch.bfloat16 if single else torch.float32)
        akk = q.new_empty(pair_shape, dtype=torch.float32) if delta else None
        _launch(
            chunk_pairwise_fwd_kernel,
            lambda c: (chunks.per_row * (CHUNK_SIZE // c["BC"]) * batch * num_v_heads,),
            PAIRWISE_CONFIGS,
            (_size_class(chunks.total * num_v_heads),),
            (
                q,
                k,
                b,
                aqk,
                akk,
                *(gated or (None,) * 3),
                cu_seqlens,
                chunks.indices,
                scale,
                seq_len,
                batch * num_v_heads,
            ),
            {"DELTA": delta, "PREGATED": gated is not None, **shape},
            (aqk, akk, *(gated or ())),
            device,
        )
    ai = w = u = expand = None
    if delta:
        ai = q.new_empty(pair_shape, dtype=torch.float32)
        if gate == 1 and DECAY_HORIZON:
            expand = torch.zeros(chunks.num_seqs, num_v_heads, dtype=torch.int32, device=device)
        _launch(
            chunk_wy_fwd_kernel,
            lambda c: (chunks.per_row * batch * num_v_heads,),
            [{"num_warps": 4, "num_stages": 1}, {"num_warps": 8, "num_stages": 1}, {"num_warps": 2, "num_stages": 1}],
            (_size_class(chunks.total * num_v_heads),),
            (k, b, beta, akk, ai, expand, cu_seqlens, chunks.indices, seq_len, batch * num_v_heads),
            {"GATE": gate, "CHECK_CONTRACTION": expand is not None, **shape},
            (ai,),
            device,
        )
        # w for the backward's state pass; u (and w) for the forward's state passes only where they do not form vn
        # from Ai
        if needs_grad or WY_IN_MEMORY:
            w_dtype = W_DTYPE or (k.dtype if gate else torch.float32)
            w = k.new_empty(batch, seq_len, num_v_heads, key_dim, dtype=w_dtype)
            u = torch.empty_like(v, dtype=torch.float32) if WY_IN_MEMORY else None
            _launch(
                chunk_wu_fwd_kernel,
                lambda c: (chunks.per_row * batch * num_v_heads,),
                _configs(q.dtype, value_dim, ((64, 4, 1), (128, 8, 1), (32, 4, 1))),
                (_size_class(chunks.total * num_v_heads),),
                (k, v, b, beta, ai, w, u, cu_seqlens, chunks.indices, seq_len, batch * num_v_heads),
                {"V": value_dim, "GATE": gate, **shape},
                (w, u),
                device,
            )

    o = torch.empty_like(v)
    h = k.new_empty(chunks.total, num_v_heads, key_dim, value_dim) if needs_grad else None
    vn = torch.empty_like(v, dtype=torch.float32) if needs_grad and delta else None
    ht = (
        q.new_empty(chunks.num_seqs, num_v_heads, key_dim, value_dim, dtype=torch.float32)
        if output_final_state
        else None
    )
    _state_fwd(
        q, k, v, w, u, b, ai, beta, aqk, o, h, vn, initial_state, ht, scale, chunks, shape, gate, delta, gated, expand
    )
    # the backward needs w (its state pass) but not u: the gradient of Ai is formed from vn = u - w h
    return o, ht, (b, aqk, akk, ai, w, h, vn, expand)


def _chunk_bwd(q, k, v, beta, g_dtype, scale, initial_state, chunks, saved, do, dht):
    b, aqk, akk, ai, w, h, vn, expand = saved
    batch, seq_len, num_heads, key_dim = q.shape
    num_v_heads, value_dim = v.shape[2], v.shape[3]
    gate, delta = rule_of(b, beta)
    shape = _shape(q, v, chunks)
    device = q.device

    dh = h.new_empty(h.shape)
    dvn = v.new_empty(v.shape, dtype=torch.float32)
    dh0 = torch.empty_like(initial_state, dtype=torch.float32) if initial_state is not None else None
    _state_bwd(q, k, w, b, aqk, do, dh, dvn, dht, dh0, scale, chunks, shape, gate, delta, expand)

    groups = num_v_heads // num_heads
    # without GVA and pairwise corrections the gradients of q and k are final here
    direct = groups == 1 and gate != 2
    per_value_head = (batch, seq_len, num_v_heads, key_dim)
    dq = q.new_empty(per_value_head, dtype=q.dtype if direct else torch.float32)
    dk = q.new_empty(per_value_head, dtype=k.dtype if direct else torch.float32)
    dv = torch.empty_like(v)
    # key channels per program of the gradient kernel; the per-token sums over them come in NK parts
    key_block = min(shape["BK"], GRAD_KEY_BLOCK or shape["BK"])
    parts = triton.cdiv(key_dim, key_block)
    dbeta = beta.new_empty((parts, *beta.shape), dtype=torch.float32) if delta else None
    db = None
    if gate == 1:
        db = b.new_empty((parts, *b.shape))
    elif gate == 2:
        db = b.new_empty(b.shape)
    daqk = dakk = None
    if gate == 2:
        daqk = q.new_empty(aqk.shape, dtype=torch.float32)
        dakk = q.new_empty(aqk.shape, dtype=torch.float32) if delta else None
    wide = key_block >= 64
    _launch(
        chunk_grad_kernel,
        lambda c: (chunks.per_row * parts * batch * num_v_heads,),
        _configs(q.dtype, value_dim, GRAD_CANDIDATES[wide]),
        (_size_class(chunks.total * num_v_heads),),
        (
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
            chunks.cu_seqlens,
            chunks.indices,
            scale,
            seq_len,
            batch * num_v_heads,
        ),
        {"V": value_dim, "GATE": gate, "DELTA": delta, **shape, "BK": key_block},
        (dq, dk, dv, dbeta, db, daqk, dakk),
        device,
    )
    if delta:
        dbeta = dbeta.sum(0) if parts > 1 else dbeta[0]
    if gate == 1:
        db = db.sum(0) if parts > 1 else db[0]
    if gate == 2:
        chunk_pairwise_bwd_kernel[(chunks.per_row * (CHUNK_SIZE // SUB_CHUNK) * batch * num_v_heads,)](
            q,
            k,
            b,
            daqk,
            dakk,
            dq,
            dk,
            db,
            chunks.cu_seqlens,
            chunks.indices,
            seq_len,
            batch * num_v_heads,
            BC=SUB_CHUNK,
            DELTA=delta,
            num_warps=4,
            **shape,
        )
    dg = None if b is None else _chunk_cumsum(db, chunks.cu_seqlens, chunks, True, g_dtype)
    if not direct:
        # value heads of one group share their query/key head: sum their gradients
        dq = dq.view(batch, seq_len, num_heads, groups, key_dim).sum(3).to(q.dtype)
        dk = dk.view(batch, seq_len, num_heads, groups, key_dim).sum(3).to(k.dtype)
    return dq, dk, dv, dg, dbeta, dh0


class ChunkLinearAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, needs_grad):
        chunks = _Chunks(q.shape[0], q.shape[1], cu_seqlens, q.device)
        o, ht, saved = _chunk_fwd(
            q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, chunks, needs_grad
        )
        if needs_grad:
            ctx.save_for_backward(q, k, v, beta, initial_state, *saved)
        ctx.chunks = chunks
        ctx.scale = scale
        ctx.g_dtype = None if g is None else g.dtype
        ctx.beta_dtype = None if beta is None else beta.dtype
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, beta, initial_state, *saved = ctx.saved_tensors
        dq, dk, dv, dg, dbeta, dh0 = _chunk_bwd(
            q,
            k,
            v,
            beta,
            ctx.g_dtype,
            ctx.scale,
            initial_state,
            ctx.chunks,
            saved,
            do.contiguous(),
            None if dht is None else dht.contiguous(),
        )
        if dbeta is not None:
            dbeta = dbeta.to(ctx.beta_dtype)
        if dh0 is not None:
            dh0 = dh0.to(initial_state.dtype)
        return dq, dk, dv, dg, dbeta, None, dh0, None, None, None


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
    tensors = (q, k, v, g, beta, initial_state)
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors)
    return ChunkLinearAttentionFunction.apply(
        q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, needs_grad
    )


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
    gate, delta = rule_of(g, beta)
    fused_recurrent_fwd_kernel[(triton.cdiv(value_dim, bv), num_seqs * num_v_heads)](
        q,
        k,
        v,
        g,
        beta,
        o,
        initial_state,
        ht,
        cu_seqlens,
        scale,
        seq_len,
        H=num_heads,
        HV=num_v_heads,
        K=key_dim,
        V=value_dim,
        BK=_block(key_dim, MAX_HEAD_DIM),
        BV=bv,
        GATE=gate,
        DELTA=delta,
        L2NORM=use_qk_l2norm_in_kernel,
        USE_INITIAL_STATE=initial_state is not None,
        STORE_FINAL_STATE=output_final_state,
        IS_VARLEN=cu_seqlens is not None,
        num_warps=4,
    )
    return o, ht


def chunk_gated_delta_rule(
    q,
    k,
    v,
    g,
    beta,
    scale=None,
    initial_state=None,
    output_final_state=False,
    use_qk_l2norm_in_kernel=False,
    cu_seqlens=None,
    **kwargs,
):
    """Gated DeltaNet (chunked): g `[B, T, HV]` log decay per head, beta `[B, T, HV]`. See `chunk_linear_attention`."""
    _no_extra_options(kwargs)
    return chunk_linear_attention(
        q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm_in_kernel
    )


def fused_recurrent_gated_delta_rule(
    q,
    k,
    v,
    g=None,
    gk=None,
    gv=None,
    beta=None,
    scale=None,
    initial_state=None,
    output_final_state=False,
    use_qk_l2norm_in_kernel=False,
    cu_seqlens=None,
    **kwargs,
):
    """Gated DeltaNet (token by token): g `[B, T, HV]` per head, or gk `[B, T, HV, K]` per key channel."""
    _no_extra_options(kwargs)
    if gv is not None:
        raise NotImplementedError("per-value-channel decays (gv) are not supported")
    if g is not None and gk is not None:
        raise ValueError("pass either g (per head) or gk (per key channel), not both")
    if beta is None:
        beta = torch.ones(v.shape[:3], dtype=q.dtype, device=q.device)
    return fused_recurrent_linear_attention(
        q,
        k,
        v,
        gk if g is None else g,
        beta,
        scale,
        initial_state,
        output_final_state,
        cu_seqlens,
        use_qk_l2norm_in_kernel,
    )


def chunk_delta_rule(
    q,
    k,
    v,
    beta,
    scale=None,
    initial_state=None,
    output_final_state=False,
    use_qk_l2norm_in_kernel=False,
    cu_seqlens=None,
    **kwargs,
):
    """DeltaNet (chunked): delta rule without decay, beta `[B, T, HV]`."""
    _no_extra_options(kwargs)
    return chunk_linear_attention(
        q, k, v, None, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm_in_kernel
    )


def fused_recurrent_delta_rule(
    q,
    k,
    v,
    beta=None,
    scale=None,
    initial_state=None,
    output_final_state=False,
    use_qk_l2norm_in_kernel=False,
    cu_seqlens=None,
):
    """DeltaNet (token by token); beta defaults to ones."""
    if beta is None:
        beta = torch.ones(v.shape[:3], dtype=q.dtype, device=q.device)
    return fused_recurrent_linear_attention(
        q, k, v, None, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm_in_kernel
    )


def chunk_gla(
    q,
    k,
    v,
    g,
    scale=None,
    initial_state=None,
    output_final_state=False,
    state_v_first=False,
    cu_seqlens=None,
    **kwargs,
):
    """GLA (chunked): g `[B, T, HV, K]` log decay per key channel, additive write."""
    _no_extra_options(dict(kwargs, state_v_first=state_v_first))
    return chunk_linear_attention(q, k, v, g, None, scale, initial_state, output_final_state, cu_seqlens)


def fused_recurrent_gla(
    q,
    k,
    v,
    gk=None,
    gv=None,
    scale=None,
    initial_state=None,
    output_final_state=False,
    reverse=False,
    state_v_first=False,
    cu_seqlens=None,
    **kwargs,
):
    """GLA (token by token): gk `[B, T, HV, K]` log decay per key channel."""
    _no_extra_options(dict(kwargs, state_v_first=state_v_first))
    if gv is not None or reverse:
        raise NotImplementedError("per-value-channel decays (gv) and reverse scans are not supported")
    return fused_recurrent_linear_attention(q, k, v, gk, None, scale, initial_state, output_final_state, cu_seqlens)


def chunk_kda(
    q,
    k,
    v,
    g,
    beta,
    scale=None,
    initial_state=None,
    output_final_state=False,
    use_qk_l2norm_in_kernel=False,
    cu_seqlens=None,
    **kwargs,
):
    """Kimi Delta Attention (chunked): delta rule with g `[B, T, HV, K]` log decay per key channel."""
    _no_extra_options(kwargs)
    return chunk_linear_attention(
        q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm_in_kernel
    )


def fused_recurrent_kda(
    q,
    k,
    v,
    g,
    beta,
    A_log=None,
    dt_bias=None,
    scale=None,
    initial_state=None,
    output_final_state=False,
    use_qk_l2norm_in_kernel=False,
    cu_seqlens=None,
    **kwargs,
):
    """Kimi Delta Attention (token by token); the in-kernel gate (A_log, dt_bias) is not supported."""
    _no_extra_options(dict(kwargs, A_log=A_log, dt_bias=dt_bias))
    return fused_recurrent_linear_attention(
        q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm_in_kernel
    )


# fla options that change the maths are refused rather than silently ignored; the rest are accepted
_IGNORED_OPTIONS = {"cu_seqlens_cpu", "chunk_indices", "state_v_first"}


def _no_extra_options(kwargs):
    unknown = {
        key: True
        for key, value in kwargs.items()
        if key not in _IGNORED_OPTIONS and value is not None and value is not False
    }
    if kwargs.get("state_v_first"):
        unknown["state_v_first"] = True
    if unknown:
        raise NotImplementedError(f"options not supported by hf_effattn's kernels: {sorted(unknown)}")
