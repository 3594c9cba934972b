"""Checks and times the Triton sliding-window attention on a GPU, against FlexAttention on the identical mask and
SDPA's flash backend on full causal attention.

    python scripts/sliding_window_gpu.py OUTPUT_DIR            # correctness, prefill and decode tables (~2-3 min)
    python scripts/sliding_window_gpu.py OUTPUT_DIR --sweep    # also times candidate tiles of each kernel at T=32k
    python scripts/sliding_window_gpu.py OUTPUT_DIR --profile  # also per-kernel GPU times, ours and Flex's

1. Correctness, bf16 inputs: ours against FlexAttention (eager, fp32 upcast of the same inputs, the same mask):
   outputs and dq/dk/dv as relative RMS error (bounds 0.005 / 0.01); odd lengths, GQA, sinks, packed sequences.
   Sink logits and padding bounds, which Flex cannot express, are checked against the fp32 naive op.
2. Prefill, bf16, B=1, 32 query / 8 kv heads, D=128, window 4096 + 4 sink tokens, T in {8k, 32k, 128k}: forward
   and forward+backward of ours, FlexAttention (torch.compile'd, BlockMask from the window's kv blocks) and SDPA
   flash on full causal attention, timed with CUDA events (triton.testing.do_bench medians) in the same run; ours
   and Flex in 3 alternating rounds, each keeping the median of its rounds.
3. Decode: one token against a cache of window + sinks, per context length 4k ... 128k; SDPA over the full cache
   for contrast.
Every row runs in its own try/except; the table is printed and saved as OUTPUT_DIR/sliding_window_gpu.json. The
exit status is 1 when a correctness row fails (or raises, or does not run), after the JSON is written.
"""

import argparse
import json
import math
import platform
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from hf_effattn.kernels import sliding_window as ops
from hf_effattn.kernels.testing import naive_sliding_window_attention, rel_rms

HEADS, KV_HEADS, HEAD_DIM, WINDOW, SINKS = 32, 8, 128, 4096, 4
SEQ_LENS = (8192, 32768, 131072)
DECODE_CONTEXTS = (4096, 8192, 16384, 32768, 65536, 131072)
OUTPUT_TOL, GRAD_TOL = 0.005, 0.01
# alternating timing rounds of ours and Flex per prefill length (`prefill_rows`)
PREFILL_ROUNDS = 3


def flex_mask_mod(window, num_sinks, cu_seqlens=None):
    """The kernel's mask as a FlexAttention mask_mod (packed sequences by per-token sequence starts)."""
    if cu_seqlens is None:

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & ((q_idx - kv_idx < window) | (kv_idx < num_sinks))

        return mask_mod
    index = torch.arange(int(cu_seqlens[-1]), device=cu_seqlens.device)
    start = cu_seqlens[torch.bucketize(index, cu_seqlens[1:], right=True)]

    def mask_mod(b, h, q_idx, kv_idx):
        same = start[q_idx] == start[kv_idx]
        return same & (kv_idx <= q_idx) & ((q_idx - kv_idx < window) | (kv_idx - start[kv_idx] < num_sinks))

    return mask_mod


def window_block_mask(seq_len, window, num_sinks, device, block=128):
    """BlockMask of the window (+ sinks) built from its kv blocks: full blocks skip the mask_mod."""
    from torch.nn.attention.flex_attention import BlockMask

    blocks = math.ceil(seq_len / block)
    m = torch.arange(blocks, device=device)[:, None]
    n = torch.arange(blocks, device=device)[None, :]
    causal = n <= m
    # smallest and largest query-key distance inside the tile
    any_window = causal & (block * (m - n) - (block - 1) < window)
    any_sink = causal & (block * n < num_sinks)
    visible = any_window | any_sink
    full = (n < m) & ((block * (m - n) + block - 1 < window) | (block * n + block - 1 < num_sinks))
    full = full & ((m + 1) * block <= seq_len)
    partial = visible & ~full

    def ordered(dense):
        counts = dense.sum(-1).to(torch.int32)
        indices = torch.argsort((~dense).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return counts[None, None], indices[None, None]

    kv_num, kv_idx = ordered(partial)
    full_num, full_idx = ordered(full)
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=block,
        mask_mod=flex_mask_mod(window, num_sinks),
        seq_lengths=(seq_len, seq_len),
    )


def inputs(batch, seq_len, heads, kv_heads, head_dim, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(batch, seq_len, heads, head_dim, device="cuda", dtype=dtype, generator=gen)
    k = torch.randn(batch, seq_len, kv_heads, head_dim, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn(batch, seq_len, kv_heads, head_dim, device="cuda", dtype=dtype, generator=gen)
    do = torch.randn(batch, seq_len, heads, head_dim, device="cuda", dtype=dtype, generator=gen)
    return q, k, v, do


def ours_with_grads(q, k, v, do, window, num_sinks, sink_logits=None, cu_seqlens=None, key_bounds=None):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    z = None if sink_logits is None else sink_logits.detach().clone().requires_grad_()
    o = ops.sliding_window_attention(*leaves, window, num_sinks, z, cu_seqlens=cu_seqlens, key_bounds=key_bounds)
    grads = torch.autograd.grad(o, leaves + ([z] if z is not None else []), do)
    return o, grads


def check_against_flex(case):
    """Ours (bf16) against eager FlexAttention on the fp32 upcast: {name: relative RMS error}."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    batch, seq_len, heads, kv_heads, head_dim, window, num_sinks, cu = case
    q, k, v, do = inputs(batch, seq_len, heads, kv_heads, head_dim, torch.bfloat16)
    cu_seqlens = None if cu is None else torch.tensor(cu, device="cuda", dtype=torch.int32)
    o, grads = ours_with_grads(q, k, v, do, window, num_sinks, cu_seqlens=cu_seqlens)
    mask = create_block_mask(
        flex_mask_mod(window, num_sinks, cu_seqlens), None, None, seq_len, seq_len, device="cuda", _compile=False
    )
    ref = [x.float().transpose(1, 2).requires_grad_() for x in (q, k, v)]
    o_ref = flex_attention(*ref, block_mask=mask, enable_gqa=True).transpose(1, 2)
    ref_grads = torch.autograd.grad(o_ref, ref, do.float())
    errors = {"o": rel_rms(o, o_ref)}
    for name, grad, ref_grad in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        errors[name] = rel_rms(grad, ref_grad.transpose(1, 2))
    return errors


def check_against_naive(case):
    """Sink logits and padding bounds: ours (bf16) against the fp32 naive op."""
    batch, seq_len, heads, kv_heads, head_dim, window, num_sinks, bounds = case
    q, k, v, do = inputs(batch, seq_len, heads, kv_heads, head_dim, torch.bfloat16)
    sink_logits = torch.randn(heads, device="cuda")
    key_bounds = None if bounds is None else torch.tensor(bounds, device="cuda")
    o, grads = ours_with_grads(q, k, v, do, window, num_sinks, sink_logits, key_bounds=key_bounds)
    ref = [x.float().requires_grad_() for x in (q, k, v)] + [sink_logits.clone().requires_grad_()]
    o_ref = naive_sliding_window_attention(*ref[:3], window, num_sinks, ref[3], key_bounds=key_bounds)
    ref_grads = torch.autograd.grad(o_ref, ref, do.float())
    errors = {"o": rel_rms(o, o_ref)}
    for name, grad, ref_grad in zip(("dq", "dk", "dv", "dsink"), grads, ref_grads, strict=True):
        errors[name] = rel_rms(grad, ref_grad)
    return errors


def check_decode(case):
    """One decode step against a cache of window - 1 keys + the current one, against the fp32 naive op on the
    whole sequence (the cache holds exactly what the window needs)."""
    seq_len, window, num_sinks = case
    q, k, v, _ = inputs(1, seq_len, HEADS, KV_HEADS, HEAD_DIM, torch.bfloat16)
    sink_logits = torch.randn(HEADS, device="cuda")
    keep = min(window, seq_len)
    cache_k, cache_v = k[:, -keep:].transpose(1, 2).contiguous(), v[:, -keep:].transpose(1, 2).contiguous()
    sink_index = torch.arange(num_sinks, device="cuda")[None]
    with torch.no_grad():
        o = ops.sliding_window_decode(
            q[:, -1:],
            cache_k.transpose(1, 2),
            cache_v.transpose(1, 2),
            window,
            seq_len - 1,
            k[:, :num_sinks],
            v[:, :num_sinks],
            sink_index,
            sink_logits,
        )
        o_ref = naive_sliding_window_attention(q.float(), k.float(), v.float(), window, num_sinks, sink_logits)
    return {"o": rel_rms(o, o_ref[:, -1:])}


CORRECTNESS = [
    ("flex", "T1000-GQA4", (2, 1000, 8, 2, 128, 256, 0, None)),
    ("flex", "T1023-sinks4", (1, 1023, 8, 2, 128, 300, 4, None)),
    ("flex", "T4097-D64-MQA", (1, 4097, 4, 1, 64, 1024, 4, None)),
    ("flex", "T63-window>T", (2, 63, 4, 4, 128, 100, 2, None)),
    ("flex", "varlen", (1, 2500, 8, 2, 128, 200, 4, [0, 1, 15, 100, 300, 301, 1000, 2500])),
    ("naive", "sink-logits-T777", (2, 777, 8, 2, 128, 129, 4, None)),
    ("naive", "padding-D100", (2, 600, 4, 2, 100, 64, 3, [[17, 600], [0, 431]])),
    ("decode", "decode-T5000", (5000, 1024, 4)),
]


def run_correctness(results):
    checks = {"flex": check_against_flex, "naive": check_against_naive, "decode": check_decode}
    for kind, name, case in CORRECTNESS:
        row = {"case": name, "against": kind}
        errors = attempt(checks[kind], case)
        if isinstance(errors, dict):
            row["errors"] = errors
            row["ok"] = all(
                math.isfinite(e) and e <= (OUTPUT_TOL if key == "o" else GRAD_TOL) for key, e in errors.items()
            )
        else:
            row["error"] = errors
        results.append(row)
        text = " ".join(f"{key} {value:.1e}" for key, value in row.get("errors", {}).items())
        print(f"{name:<20} vs {kind:<6} {'ok' if row.get('ok') else 'FAIL'}  {text or row.get('error')}", flush=True)


def window_flops(seq_len, window, num_sinks):
    """Forward FLOPs per (batch, head, head-dim): 4 * visible (query, key) pairs."""
    visible = sum(min(t + 1, window) + max(0, min(num_sinks, t - window + 1)) for t in range(seq_len))
    return 4 * visible


def bench(fn):
    """Median ms of fn() over at least 5 calls: do_bench sizes its repeats from `rep`, so 100 ms would time a 90 ms
    call once, and one call at 128k tokens moves with the GPU's clock (it runs at its power cap there)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=500, return_mode="median")


def attempt(fn, *args):
    """fn(*args), or the error's text: one failing row must not end the run."""
    try:
        return fn(*args)
    except Exception as error:  # noqa: BLE001 (a failure is reported in its row; the other rows still run)
        traceback.print_exc()
        return f"{type(error).__name__}: {str(error)[:200]}"
    finally:
        torch.cuda.empty_cache()


def bench_forward(forward):
    with torch.no_grad():
        return bench(forward)


def with_backward(forward, leaves, do):
    """A call of `forward()` (output of `do`'s shape) and of its backward to `leaves`."""
    return lambda: torch.autograd.grad(forward(), leaves, do)


def fwd_and_bwd(forward, leaves, do):
    """(forward ms, forward+backward ms) of `forward()` whose output has `do`'s shape."""
    return bench_forward(forward), bench(with_backward(forward, leaves, do))


def flex_forward(flex_compiled, q, k, v, seq_len):
    """Compiled FlexAttention on the window's BlockMask, as a call taking and returning `[B, T, H, D]`."""
    block_mask = window_block_mask(seq_len, WINDOW, SINKS, "cuda")
    # [B, H, T, D] views of the same leaves
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    return lambda: flex_compiled(qt, kt, vt, block_mask=block_mask, enable_gqa=True).transpose(1, 2)


def time_sdpa_full(q, k, v, do):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    groups = HEADS // KV_HEADS
    # full causal attention; the kv heads are repeated for the flash backend (outside the timing)
    qf = q.detach().transpose(1, 2).requires_grad_()
    kf = k.detach().repeat_interleave(groups, 2).transpose(1, 2).requires_grad_()
    vf = v.detach().repeat_interleave(groups, 2).transpose(1, 2).requires_grad_()

    def sdpa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(qf, kf, vf, is_causal=True)

    return fwd_and_bwd(sdpa, [qf, kf, vf], do.transpose(1, 2))


def median_of_rounds(rounds):
    """(median fwd ms, median fwd+bwd ms) over rounds of (fwd, fwd+bwd), or the first round's error text."""
    for times in rounds:
        if not isinstance(times, tuple):
            return times
    return tuple(sorted(column)[len(column) // 2] for column in zip(*rounds, strict=True))


def prefill_rows(seq_len, flex_compiled, rounds=PREFILL_ROUNDS):
    """({provider: (fwd ms, fwd+bwd ms) or an error text}, {provider: every round}) at one length. Ours and Flex
    are timed in alternating rounds after a warm-up call of each (Flex compiles there), and each keeps the median
    of its rounds: timed once each in a fixed order, one of them always ran right after a pause (Flex's
    compilation) and the other on a GPU heated by the previous row, and at the H100's power cap that moved a single
    row by up to 10%."""
    q, k, v, do = inputs(1, seq_len, HEADS, KV_HEADS, HEAD_DIM, torch.bfloat16)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    leaves = [q, k, v]
    calls = {
        "ours": lambda: ops.sliding_window_attention(q, k, v, WINDOW, SINKS),
        "flex": attempt(flex_forward, flex_compiled, q, k, v, seq_len),
    }
    every = {name: [forward] if isinstance(forward, str) else [] for name, forward in calls.items()}

    def warm_up(forward):
        # Flex compiles a graph with and one without gradients (grad mode is one of its guards)
        with torch.no_grad():
            forward()
        torch.autograd.grad(forward(), leaves, do)
        torch.cuda.synchronize()

    for name, forward in calls.items():
        if not every[name]:
            warm = attempt(warm_up, forward)
            if isinstance(warm, str):
                every[name].append(warm)
    for _ in range(rounds):
        for name, forward in calls.items():
            if not every[name] or isinstance(every[name][-1], tuple):
                every[name].append(attempt(fwd_and_bwd, forward, leaves, do))
    rows = {name: median_of_rounds(times) for name, times in every.items()}
    rows["sdpa flash (full causal)"] = attempt(time_sdpa_full, q, k, v, do)
    return rows, every


def run_prefill(results):
    from torch.nn.attention.flex_attention import flex_attention

    flex_compiled = torch.compile(flex_attention, dynamic=False)
    for seq_len in SEQ_LENS:
        flops = window_flops(seq_len, WINDOW, SINKS) * HEADS * HEAD_DIM
        start = time.time()
        rows, every = prefill_rows(seq_len, flex_compiled)
        for provider, times in rows.items():
            fwd, both = times if isinstance(times, tuple) else (times, times)
            row = {"T": seq_len, "provider": provider, "fwd_ms": fwd, "fwd_bwd_ms": both}
            if provider in every:
                row["rounds"] = every[provider]
            if isinstance(fwd, float) and provider != "sdpa flash (full causal)":
                row["fwd_tflops"] = flops / fwd / 1e9
                row["fwd_bwd_tflops"] = 3.5 * flops / both / 1e9
            results.append(row)
        ours, flex = rows.get("ours"), rows.get("flex")
        if isinstance(ours, tuple) and isinstance(flex, tuple):
            results.append(
                {
                    "T": seq_len,
                    "provider": "speedup vs flex",
                    "fwd": flex[0] / ours[0],
                    "fwd_bwd": flex[1] / ours[1],
                    "bwd": (flex[1] - flex[0]) / (ours[1] - ours[0]),
                }
            )
        print(f"prefill T={seq_len} done in {time.time() - start:.0f} s", flush=True)


def time_decode(step):
    """(ms per call, ms per replay of the call captured in a CUDA graph: kernel time without launch overhead)."""
    with torch.no_grad():
        eager = bench(step)
        step()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
    return eager, bench(graph.replay)


def time_sdpa_decode(q1, context):
    cache = torch.randn(1, HEADS, context, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    qt = q1.transpose(1, 2)
    with torch.no_grad():
        return bench(lambda: F.scaled_dot_product_attention(qt, cache, cache))


def run_decode(results):
    """ms per decode step at each context length: the cache holds window - 1 keys + the current one, + sinks."""
    q, k, v, _ = inputs(1, WINDOW, HEADS, KV_HEADS, HEAD_DIM, torch.bfloat16)
    # the transformers cache layout [B, HKV, T, D], read through a transposed view
    cache_k, cache_v = k.transpose(1, 2).contiguous().transpose(1, 2), v.transpose(1, 2).contiguous().transpose(1, 2)
    sink_k, sink_v = k[:, :SINKS].contiguous(), v[:, :SINKS].contiguous()
    sink_index = torch.arange(SINKS, device="cuda")[None]
    q1 = q[:, -1:].contiguous()
    for context in DECODE_CONTEXTS:

        def step(context=context):
            return ops.sliding_window_decode(q1, cache_k, cache_v, WINDOW, context - 1, sink_k, sink_v, sink_index)

        times = attempt(time_decode, step)
        row = (
            {"context": context, "ours_ms": times[0], "ours_graph_ms": times[1]}
            if isinstance(times, tuple)
            else {"context": context, "ours_ms": times}
        )
        row["sdpa_full_cache_ms"] = attempt(time_sdpa_decode, q1, context)
        results.append(row)


def kernel_times(fn, steps=3):
    """{kernel: GPU ms per call of fn()} from the profiler (one warm-up call first)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    times = {}
    for event in prof.key_averages():
        total = getattr(event, "device_time_total", 0) or getattr(event, "cuda_time_total", 0)
        if total > 0 and event.device_type == torch.autograd.DeviceType.CUDA:
            times[event.key[:60]] = total / steps / 1000
    return dict(sorted(times.items(), key=lambda item: -item[1]))


def run_profile(results):
    """Per-kernel GPU times of the forward and backward, ours and Flex's, at 32k and 128k; plus the medians of whole
    calls."""
    from torch.nn.attention.flex_attention import flex_attention

    flex_compiled = torch.compile(flex_attention, dynamic=False)
    for seq_len in (32768, 131072):
        q, k, v, do = inputs(1, seq_len, HEADS, KV_HEADS, HEAD_DIM, torch.bfloat16)
        leaves = [x.requires_grad_() for x in (q, k, v)]

        def ours(leaves=leaves):
            return ops.sliding_window_attention(*leaves, WINDOW, SINKS)

        row = {"T": seq_len, "provider": "ours"}
        times = attempt(fwd_and_bwd, ours, leaves, do)
        row["fwd_ms"], row["fwd_bwd_ms"] = times if isinstance(times, tuple) else (times, times)
        row["kernels"] = attempt(kernel_times, with_backward(ours, leaves, do))
        results.append(row)
        flex = with_backward(flex_forward(flex_compiled, *leaves, seq_len), leaves, do)
        results.append({"T": seq_len, "provider": "flex", "kernels": attempt(kernel_times, flex)})
        torch.cuda.empty_cache()


# candidate tiles per kernel: (BM, BN, warps, stages[, register cap]), the default first
SWEEP = {
    "fwd": [(128, 64, 8, 2, 128), (128, 64, 8, 3), (128, 64, 8, 2, 168), (64, 64, 4, 3), (256, 64, 16, 2)],
    "dq": [(128, 128, 8, 2), (128, 128, 8, 2, 240), (128, 64, 8, 3), (64, 128, 4, 2)],
    "dkdv": [(64, 64, 4, 2), (32, 64, 4, 3), (64, 128, 8, 2)],
}
# the option each candidate runs with off and on: GQA heads packed per tile (forward, dq), tensor descriptors (dk/dv)
SWEEP_OPTION = {"fwd": "PACK_GQA_HEADS", "dq": "PACK_GQA_HEADS", "dkdv": "TENSOR_DESCRIPTOR_KERNELS"}
KERNEL_NAMES = {"fwd": "sliding_fwd_kernel", "dq": "sliding_bwd_dq_kernel", "dkdv": "sliding_bwd_dkdv_kernel"}


def _set_option(kind, on):
    if SWEEP_OPTION[kind] == "TENSOR_DESCRIPTOR_KERNELS":
        ops.TENSOR_DESCRIPTOR_KERNELS[kind] = on
    else:
        setattr(ops, SWEEP_OPTION[kind], on)


def run_sweep(results, seq_len, kernels, rounds=3):
    """Per-kernel GPU times (profiler) of candidate tiles (SWEEP), each with its kernel's option (SWEEP_OPTION)
    off and on, at one length (D = 128, bf16). Rounds interleave the candidates, so that the GPU's clock changes (long
    runs of heavy tensor-core work hit the power cap and lower them) spread over all of them; the rows give every
    round and the median."""
    q, k, v, do = inputs(1, seq_len, HEADS, KV_HEADS, HEAD_DIM, torch.bfloat16)
    leaves = [x.requires_grad_() for x in (q, k, v)]
    tiles = {kind: dict(x) for kind, x in ops.GPU_TILES.items()}
    options = (dict(ops.TENSOR_DESCRIPTOR_KERNELS), ops.PACK_GQA_HEADS)

    def restore():
        for kind, x in tiles.items():
            ops.GPU_TILES[kind] = dict(x)
        ops.TENSOR_DESCRIPTOR_KERNELS.update(options[0])
        ops.PACK_GQA_HEADS = options[1]

    def forward():
        with torch.no_grad():
            return ops.sliding_window_attention(*leaves, WINDOW, SINKS)

    forward_backward = with_backward(lambda: ops.sliding_window_attention(*leaves, WINDOW, SINKS), leaves, do)

    measured = {}
    try:
        for _ in range(rounds):
            for kind in kernels:
                for config in SWEEP[kind]:
                    for on in (False, True):
                        ops.GPU_TILES[kind][HEAD_DIM] = config
                        _set_option(kind, on)
                        times = attempt(kernel_times, forward if kind == "fwd" else forward_backward, 2)
                        ms = times.get(KERNEL_NAMES[kind], "not run") if isinstance(times, dict) else times
                        measured.setdefault((kind, config, on), []).append(ms)
                        restore()
    finally:
        restore()
    for (kind, config, on), times in measured.items():
        numbers = sorted(x for x in times if isinstance(x, float))
        median = numbers[len(numbers) // 2] if len(numbers) == len(times) else None
        row = {"T": seq_len, "kernel": kind, "tiles": config, "option": f"{SWEEP_OPTION[kind]} {'on' if on else 'off'}"}
        results.append({**row, "ms": median, "rounds": times})
        print(f"sweep {row}: median {median} of {times}", flush=True)


def fmt(x, digits=2):
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)[:40]


def print_tables(report):
    print("\n== correctness (relative RMS error; bounds: o 0.005, gradients 0.01) ==")
    for row in report["correctness"]:
        errors = " ".join(f"{k}={v:.1e}" for k, v in row.get("errors", {}).items())
        print(
            f"{row['case']:<20} {row['against']:<7} {'ok  ' if row.get('ok') else 'FAIL'} {errors or row.get('error')}"
        )
    print(f"\n== prefill: bf16, B=1, {HEADS}/{KV_HEADS} heads, D={HEAD_DIM}, window {WINDOW} + {SINKS} sinks ==")
    print(f"{'T':>7} {'provider':<26} {'fwd ms':>9} {'fwd+bwd ms':>11} {'fwd TF/s':>9} {'f+b TF/s':>9}")
    for row in report["prefill"]:
        if row["provider"] == "speedup vs flex":
            print(
                f"{row['T']:>7} {'speedup vs flex':<26} {fmt(row['fwd']):>9} {fmt(row['fwd_bwd']):>11}  "
                f"(bwd alone {fmt(row['bwd'])})"
            )
            continue
        print(
            f"{row['T']:>7} {row['provider']:<26} {fmt(row['fwd_ms']):>9} {fmt(row['fwd_bwd_ms']):>11} "
            f"{fmt(row.get('fwd_tflops', ''), 0):>9} {fmt(row.get('fwd_bwd_tflops', ''), 0):>9}"
        )
    print("\n== decode: one token, cache = window + sinks (ours) or the whole context (SDPA) ==")
    print(f"{'context':>8} {'ours ms':>9} {'ours graph ms':>14} {'sdpa full ms':>13}")
    for row in report["decode"]:
        print(
            f"{row['context']:>8} {fmt(row.get('ours_ms', row.get('ours_error')), 4):>9} "
            f"{fmt(row.get('ours_graph_ms', ''), 4):>14} {fmt(row.get('sdpa_full_cache_ms', ''), 4):>13}"
        )
    decode = [row["ours_graph_ms"] for row in report["decode"] if isinstance(row.get("ours_graph_ms"), float)]
    if decode:
        print(f"decode spread (graph, max/min - 1): {max(decode) / min(decode) - 1:.1%}")
    if report.get("profile"):
        print("\n== per-kernel GPU ms (profiler, mean of 3 forward+backward calls) ==")
        for row in report["profile"]:
            calls = f" fwd {fmt(row['fwd_ms'])} fwd+bwd {fmt(row['fwd_bwd_ms'])} (medians)" if "fwd_ms" in row else ""
            print(f"T={row['T']} {row['provider']}:{calls}")
            kernels = row["kernels"] if isinstance(row["kernels"], dict) else {"error": row["kernels"]}
            for name, ms in list(kernels.items())[:8]:
                print(f"    {fmt(ms, 3):>8}  {name}")
    if report.get("sweep"):
        print("\n== sweep: kernel GPU ms (profiler), median of the rounds ==")
        for row in report["sweep"]:
            rounds = " ".join(fmt(x, 2) for x in row["rounds"])
            print(
                f"T={row['T']} {row['kernel']:<5} {str(row['tiles']):<18} {row['option']:<30} {fmt(row['ms'], 3):>8}"
                f"   ({rounds})"
            )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--sweep", action="store_true", help="also time candidate tiles of each kernel")
    parser.add_argument(
        "--sweep-seq-lens", type=int, nargs="+", default=[32768], help="the lengths --sweep times (default 32768)"
    )
    parser.add_argument(
        "--sweep-kernels", nargs="+", choices=sorted(SWEEP), default=sorted(SWEEP), help="the kernels --sweep times"
    )
    parser.add_argument(
        "--profile", action="store_true", help="also list per-kernel GPU times, ours and Flex's, at 32k and 128k"
    )
    parser.add_argument(
        "--only-extras",
        action="store_true",
        help="skip the correctness, prefill and decode tables (with --sweep or --profile)",
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    import triton

    args.output_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "tiles": {kind: {str(k): v for k, v in tiles.items()} for kind, tiles in ops.GPU_TILES.items()},
        "pack_gqa_heads": ops.PACK_GQA_HEADS,
        "tensor_descriptors": {
            kind: ops._use_descriptors(kind, torch.empty(1, 1, 1, HEAD_DIM, device="cuda"), HEAD_DIM)
            for kind in ops.GPU_TILES
        },
        "correctness": [],
        "prefill": [],
        "decode": [],
    }
    print(f"{report['device']}, torch {report['torch']}, triton {report['triton']}", flush=True)
    start = time.time()
    if not args.only_extras:
        for name, run in (("correctness", run_correctness), ("prefill", run_prefill), ("decode", run_decode)):
            attempt(run, report[name])
            print(f"{name} done at {time.time() - start:.0f} s", flush=True)
    if args.profile:
        report["profile"] = []
        attempt(run_profile, report["profile"])
    if args.sweep:
        report["sweep"] = []
        for seq_len in args.sweep_seq_lens:
            attempt(run_sweep, report["sweep"], seq_len, args.sweep_kernels)
    print_tables(report)
    path = args.output_dir / "sliding_window_gpu.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {path} ({time.time() - start:.0f} s)")
    # a check that failed, raised or never ran fails the run (the report is written first)
    failed = [row["case"] for row in report["correctness"] if not row.get("ok")]
    missing = 0 if args.only_extras else len(CORRECTNESS) - len(report["correctness"])
    if failed or missing:
        sys.exit(f"correctness: {len(failed)} failed {failed}, {missing} did not run")


if __name__ == "__main__":
    main()
