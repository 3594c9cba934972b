"""Block top-k attention on a GPU: correctness against FlexAttention on the identical selection, prefill speed against
SDPA flash and compiled FlexAttention, and decode time per token.

    python scripts/block_topk_gpu.py OUTPUT_DIR [--seq-lens 8192 32768 131072] [--skip-correctness]

1. Correctness (bf16 inputs): our output and dq/dk/dv against FlexAttention in fp32 on the same inputs and the same
   block selection (a mask_mod that looks the selection up; eager FlexAttention evaluates mask_mod only), as relative
   RMS errors; compiled bf16 FlexAttention on the `BlockMask.from_kv_blocks` mask is shown for scale. Odd lengths,
   GQA and packed sequences (the reference runs each sequence alone; errors are over the packed tensor). Tolerances:
   0.005 (output), 0.01 (gradients).
2. Prefill speed, bf16, 32 query / 8 kv heads, D = 128, B = 1, block 64, top-16 + block 0 + own block: ours (whole
   forward, selection alone, attention alone, forward + backward), SDPA flash causal, SDPA cuDNN causal, compiled
   FlexAttention on the identical selection (own block causal through mask_mod, the others as full blocks); CUDA
   events, median after warm-up; the selection's parts and share; a sweep of the kernels' launch choices at the
   middle length. GPU time alone (CUDA graph replay) of the forward, the selection and its parts and the attention,
   the selection's share of the attention in GPU time, a check of the selection against the torch reference (rows
   that differ other than by ties fail the run), and the selection's launch choices.
3. Decode: one token against a cache of 4k ... 128k tokens: the decode kernel (`block_topk_decode`, eager and as
   GPU time from graph replay, its output against the torch reference's), the torch reference step
   (`block_topk_cached_attention`) and SDPA over the whole cache.

Prints one table and writes block_topk_gpu.json to OUTPUT_DIR; every row runs in its own try/except. The exit status
is 1 when a correctness row fails (or raises), after the JSON is written.
"""

import argparse
import itertools
import json
import math
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from hf_effattn.kernels import block_topk as ops
from hf_effattn.kernels.decoder_fusion import rotary
from hf_effattn.kernels.testing import rel_rms
from hf_effattn.ops_reference import block_topk_cached_attention, block_topk_select

BF16 = torch.bfloat16
BLOCK, TOP_K, KEEP_FIRST = 64, 16, True
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
# (name, lengths of the packed sequences, heads, kv heads, head dim)
CORRECTNESS_CASES = [
    ("T1000-G4", [1000], 8, 2, 128),
    ("T4097-G4", [4097], 8, 2, 128),
    ("T2050-MHA-D64", [2050], 4, 4, 64),
    ("varlen", [1, 63, 64, 700, 1500, 2100], 8, 2, 128),
]
# launch choices tried at the middle length (ops.TUNING overrides): forward, then backward
FWD_SWEEP = [{"fwd_rows": 128, "fwd_warps": 4}, {"fwd_rows": 256, "fwd_warps": 8}]
BWD_SWEEP = [{"dq_rows": 128, "dq_warps": 4}, {"dkv_rows": 64, "dkv_warps": 8}, {"dkv_rows": 128, "dkv_warps": 8}]
# the forward's default tile (128 queries) cannot tile a 64-query block mask
FLEX_OPTIONS = {"BLOCK_M": 64, "BLOCK_N": 64}
compiled_flex = torch.compile(flex_attention)


def allow_flex_backward_on_64_token_blocks():
    """FlexAttention's one sm90 backward config for D = 128 tiles 128 keys, which a 64-token BlockMask filters out
    (no valid choice left); add 64 x 64 tiles."""
    from torch._inductor.template_heuristics import triton as heuristics

    original = heuristics.CUDAConfigHeuristic.get_flex_attn_bwd_configs

    def configs(self, head_dim, dtype):
        return [*original(self, head_dim, dtype), heuristics.FlexBwDConfig(64, 64, 64, 64, 2, 4)]

    heuristics.CUDAConfigHeuristic.get_flex_attn_bwd_configs = configs


def timed(fn, warmup: int = 2, reps: int = 5) -> float:
    """Median milliseconds of `fn()` with CUDA events, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return sorted(times)[len(times) // 2]


def graph_ms(fn, replays: int = 20, reps: int = 5) -> float:
    """Median GPU milliseconds of `fn()` replayed from a CUDA graph: kernel time without the host's launch cost."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop) / replays)
    del graph
    return sorted(times)[len(times) // 2]


def selection_check(rows, seq_len, q, k, selected, name="selection vs reference"):
    """Our selection against the torch reference at full length: rows that differ, and how many of them are not
    ties (the two sets' fp64 score sums differ by more than 1e-6 relative)."""
    try:
        expected = block_topk_select(q, k, BLOCK, TOP_K, KEEP_FIRST)
        differ = (selected != expected).any(-1)
        not_ties = 0
        if differ.any():
            complete = seq_len // BLOCK
            groups = HEADS // KV_HEADS
            q_mean = q[0, : complete * BLOCK].double().view(complete, BLOCK, KV_HEADS, groups, HEAD_DIM).mean((1, 3))
            k_mean = k[0, : complete * BLOCK].double().view(complete, BLOCK, KV_HEADS, HEAD_DIM).mean(1)
            for i, h in differ[0].nonzero().tolist():
                sums = []
                for chosen in (selected[0, i, h], expected[0, i, h]):
                    chosen = chosen[chosen >= 0].long()
                    sums.append((k_mean[chosen, h] @ q_mean[i - 1, h]).sum().item())
                not_ties += abs(sums[0] - sums[1]) > 1e-6 * max(1.0, abs(sums[1]))
        count = int(differ.sum())
        rows.append(
            {
                "section": "selection",
                "T": seq_len,
                "name": name,
                "rows": differ.numel(),
                "differ": count,
                "not_ties": int(not_ties),
                "ok": not_ties == 0,
            }
        )
        print(f"  {seq_len // 1024}k {name}: {count} of {differ.numel()} rows differ, {not_ties} not ties")
    except Exception as error:  # noqa: BLE001
        rows.append({"section": "selection", "T": seq_len, "name": name, "error": repr(error)[:300]})
        traceback.print_exc()


# selection launch choices timed at every length: (query blocks per program, candidates per step) and the
# block-mean pass's (q elements per load, warps)
SELECT_SWEEP = [(16, 64), (32, 64), (8, 64), (16, 128)]
POOL_SWEEP = [(8192, 4), (16384, 8), (4096, 4), (8192, 8), (16384, 4)]


def selection_sweep(rows, seq_len, q, k):
    saved = (ops.SELECT_BQ, ops.SELECT_BN, dict(ops.TUNING))
    try:
        for bq, bn in SELECT_SWEEP:
            ops.SELECT_BQ, ops.SELECT_BN = bq, bn
            ops._dense_layout.cache_clear()
            layout = ops._layout(1, seq_len, BLOCK, None, q.device)
            means = ops._pool(q, k, layout, BLOCK)
            ms = graph_ms(lambda: ops._top_k(*means, layout, BLOCK, TOP_K, KEEP_FIRST))  # noqa: B023
            rows.append(
                {"section": "prefill", "T": seq_len, "name": f"  scores and top-k, BQ {bq} BN {bn}, GPU", "ms": ms}
            )
            print(f"  {seq_len // 1024}k scores and top-k BQ {bq} BN {bn}: {ms:.4f} ms GPU", flush=True)
        ops.SELECT_BQ, ops.SELECT_BN = saved[0], saved[1]
        ops._dense_layout.cache_clear()
        layout = ops._layout(1, seq_len, BLOCK, None, q.device)
        for elems, warps in POOL_SWEEP:
            ops.TUNING.update(pool_elems=elems, pool_warps=warps)
            ms = graph_ms(lambda: ops._pool(q, k, layout, BLOCK))
            rows.append(
                {
                    "section": "prefill",
                    "T": seq_len,
                    "name": f"  block means, {elems} per load, {warps} warps, GPU",
                    "ms": ms,
                }
            )
            print(f"  {seq_len // 1024}k block means {elems} per load, {warps} warps: {ms:.4f} ms GPU", flush=True)
    except Exception as error:  # noqa: BLE001
        rows.append({"section": "prefill", "T": seq_len, "name": "selection sweep", "error": repr(error)[:300]})
        traceback.print_exc()
    finally:
        ops.SELECT_BQ, ops.SELECT_BN = saved[0], saved[1]
        ops.TUNING.clear()
        ops.TUNING.update(saved[2])
        ops._dense_layout.cache_clear()


def rotary_tables(seq_len: int):
    """cos, sin `[1, T, D]` bf16 of the rotate-half rotary embedding at positions 0 .. T - 1 (base 10000)."""
    freqs = 10000.0 ** (-torch.arange(0, HEAD_DIM, 2, device="cuda") / HEAD_DIM)
    angles = torch.arange(seq_len, device="cuda")[:, None].float() * freqs
    angles = torch.cat([angles, angles], dim=-1)[None]
    return angles.cos().to(BF16), angles.sin().to(BF16)


def mixer_selection(rows, seq_len, q, k, gpu):
    """The selection as the block_topk mixer runs it at inference: the rotary embedding it applies anyway writes the
    block means (`block_topk_rotary`), so the selection adds that kernel's time over the two plain rotary kernels
    (counted as zero where it is faster), plus the scores and top-k. GPU time (graph replay), its share of the attention, and the selection from the fused
    means checked against the torch reference."""
    cos, sin = rotary_tables(seq_len)
    layout = ops._layout(1, seq_len, BLOCK, None, q.device)
    parts = {
        "rotary of q and k (two rotary kernels), GPU": lambda: (rotary(q, cos, sin), rotary(k, cos, sin)),
        "rotary of q and k with block means (one kernel), GPU": lambda: ops.block_topk_rotary(q, k, cos, sin, BLOCK),
    }
    try:
        q_rot, k_rot, means = ops.block_topk_rotary(q, k, cos, sin, BLOCK)
        flat = ops._given_means(means, layout, KV_HEADS, HEAD_DIM)
        parts["scores and top-k from the fused means, GPU"] = lambda: ops._top_k(
            *flat, layout, BLOCK, TOP_K, KEEP_FIRST
        )
        for name, fn in parts.items():
            gpu[name] = graph_ms(fn)
            rows.append({"section": "prefill", "T": seq_len, "name": name, "ms": gpu[name]})
            print(f"  {seq_len // 1024}k {name}: {gpu[name]:.4f} ms", flush=True)
        fused = ops.block_topk_select(q_rot, k_rot, BLOCK, TOP_K, KEEP_FIRST, block_means=means)
        selection_check(rows, seq_len, q_rot, k_rot, fused, "selection from fused means vs reference")
        extra = (
            gpu["rotary of q and k with block means (one kernel), GPU"]
            - gpu["rotary of q and k (two rotary kernels), GPU"]
        )
        # the fused kernel can beat the two it replaces (one launch, cos/sin read once): no negative cost is credited
        selection = max(extra, 0.0) + gpu["scores and top-k from the fused means, GPU"]
        attention = gpu.get("ours attention (given selection), GPU")
        rows.append({"section": "prefill", "T": seq_len, "name": "mixer selection (fused means), GPU", "ms": selection})
        if attention:
            rows.append(
                {
                    "section": "prefill",
                    "T": seq_len,
                    "name": "mixer selection / attention, GPU time",
                    "share": selection / attention,
                }
            )
    except Exception as error:  # noqa: BLE001
        rows.append({"section": "prefill", "T": seq_len, "name": "mixer selection", "error": repr(error)[:300]})
        traceback.print_exc()


def reps_for(ms_estimate: float) -> dict:
    return {"warmup": 1, "reps": 3} if ms_estimate > 200 else {"warmup": 3, "reps": 10}


def selection_lookup(block_indices, num_heads, num_blocks):
    """[H, NQ, NQ] bool: query block i reads key block j (first block, top-k blocks and its own block)."""
    sel = block_indices[0].long().permute(1, 0, 2).repeat_interleave(num_heads // block_indices.shape[2], dim=0)
    dense = torch.zeros(num_heads, num_blocks, num_blocks + 1, dtype=torch.bool, device=sel.device)
    dense.scatter_(2, torch.where(sel >= 0, sel, num_blocks), True)
    i = torch.arange(num_blocks, device=sel.device)
    dense[:, i, i] = True
    if KEEP_FIRST:
        dense[:, 1:, 0] = True
    return dense[..., :num_blocks]


def flex_block_mask(block_indices, num_heads, seq_len):
    """BlockMask.from_kv_blocks of our selection: own block partial (causal mask_mod), block 0 and the top-k full."""
    num_blocks = block_indices.shape[1]
    device = block_indices.device
    sel = block_indices[0].long().permute(1, 0, 2).repeat_interleave(num_heads // block_indices.shape[2], dim=0)
    i = torch.arange(num_blocks, device=device)
    first = torch.where((i > 0) & KEEP_FIRST, 0, -1)[None, :, None].expand(num_heads, -1, 1)
    full = torch.cat([first, sel], dim=-1)
    big = num_blocks + 1
    full = torch.sort(torch.where(full < 0, big, full), dim=-1).values
    full_count = (full < big).sum(-1).int()
    full_idx = torch.zeros(num_heads, num_blocks, num_blocks, dtype=torch.int32, device=device)
    # at most i entries are valid for query block i, so a short sequence keeps its first num_blocks columns
    width = min(full.shape[-1], num_blocks)
    full_idx[..., :width] = torch.where(full < big, full, 0)[..., :width].int()
    partial_idx = torch.zeros_like(full_idx)
    partial_idx[..., 0] = i.int()
    partial_count = torch.ones(num_heads, num_blocks, dtype=torch.int32, device=device)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    return BlockMask.from_kv_blocks(
        partial_count[None],
        partial_idx[None],
        full_count[None],
        full_idx[None],
        BLOCK_SIZE=BLOCK,
        mask_mod=causal,
        seq_lengths=(seq_len, seq_len),
    )


def flex_fp32_reference(q, k, v, block_indices, scale):
    """Eager fp32 FlexAttention of one sequence `[1, T, H, D]` with the selection as a mask_mod lookup."""
    seq_len, num_heads = q.shape[1], q.shape[2]
    num_blocks = block_indices.shape[1]
    lookup = selection_lookup(block_indices, num_heads, num_blocks)

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & lookup[h, q_idx // BLOCK, kv_idx // BLOCK]

    mask = BlockMask.from_kv_blocks(
        torch.full((1, 1, num_blocks), num_blocks, dtype=torch.int32, device=q.device),
        torch.arange(num_blocks, device=q.device, dtype=torch.int32).expand(1, 1, num_blocks, num_blocks).contiguous(),
        BLOCK_SIZE=BLOCK,
        mask_mod=mask_mod,
        seq_lengths=(seq_len, seq_len),
    )
    args = [x.transpose(1, 2) for x in (q, k, v)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return flex_attention(*args, block_mask=mask, scale=scale, enable_gqa=True).transpose(1, 2)


def correctness(rows):
    for name, lengths, heads, kv_heads, head_dim in CORRECTNESS_CASES:
        try:
            torch.manual_seed(0)
            total = sum(lengths)
            cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), device="cuda") if len(lengths) > 1 else None
            q = torch.randn(1, total, heads, head_dim, device="cuda", dtype=BF16)
            k = torch.randn(1, total, kv_heads, head_dim, device="cuda", dtype=BF16)
            v = torch.randn(1, total, kv_heads, head_dim, device="cuda", dtype=BF16)
            do = torch.randn(1, total, heads, head_dim, device="cuda", dtype=BF16)
            scale = head_dim**-0.5
            ours = [x.clone().requires_grad_() for x in (q, k, v)]
            o = ops.block_topk_attention(*ours, BLOCK, TOP_K, KEEP_FIRST, scale, cu_seqlens=cu)
            o.backward(do)
            selected = ops.block_topk_select(q, k, BLOCK, TOP_K, KEEP_FIRST, cu_seqlens=cu)
            errors = {"flex_bf16_o": []}
            reference = {"o": [], "dq": [], "dk": [], "dv": []}
            bounds = [0] + list(torch.tensor(lengths).cumsum(0).tolist())
            first_block = 0
            for lo, hi in itertools.pairwise(bounds):
                nb = math.ceil((hi - lo) / BLOCK)
                sel = selected[:, first_block : first_block + nb]
                first_block += nb
                ref = [x[:, lo:hi].detach().float().requires_grad_() for x in (q, k, v)]
                o_ref = flex_fp32_reference(*ref, sel, scale)
                o_ref.backward(do[:, lo:hi].float())
                reference["o"].append(o_ref.detach())
                for key, theirs in zip(("dq", "dk", "dv"), ref):
                    reference[key].append(theirs.grad)
                if hi - lo >= BLOCK and cu is None and heads == 8:
                    mask = flex_block_mask(sel, heads, hi - lo)
                    args = [x[:, lo:hi].transpose(1, 2) for x in (q, k, v)]
                    o_flex = compiled_flex(
                        *args, block_mask=mask, scale=scale, enable_gqa=True, kernel_options=FLEX_OPTIONS
                    ).transpose(1, 2)
                    errors["flex_bf16_o"].append(rel_rms(o_flex, o_ref))
            # over the whole packed tensor: a 1-token sequence has exactly zero dq and dk, so no relative error
            worst = {"o": rel_rms(o, torch.cat(reference["o"], dim=1))}
            for key, mine in zip(("dq", "dk", "dv"), ours):
                worst[key] = rel_rms(mine.grad, torch.cat(reference[key], dim=1))
            worst["flex_bf16_o"] = max(errors["flex_bf16_o"]) if errors["flex_bf16_o"] else None
            ok = worst["o"] <= 0.005 and max(worst["dq"], worst["dk"], worst["dv"]) <= 0.01
            rows.append({"section": "correctness", "name": name, **worst, "ok": ok})
        except Exception as error:  # noqa: BLE001 - every row runs on its own
            rows.append({"section": "correctness", "name": name, "error": repr(error)[:300]})
            traceback.print_exc()


def sdpa(q, k, v, backend):
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def benchmark(rows, seq_len, sweep):
    torch.manual_seed(0)
    q = torch.randn(1, seq_len, HEADS, HEAD_DIM, device="cuda", dtype=BF16)
    k = torch.randn(1, seq_len, KV_HEADS, HEAD_DIM, device="cuda", dtype=BF16)
    v = torch.randn(1, seq_len, KV_HEADS, HEAD_DIM, device="cuda", dtype=BF16)
    do = torch.randn_like(q)
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    dense_flops = 2 * HEADS * seq_len * seq_len * HEAD_DIM  # causal forward: 4 B H T^2 D / 2
    kib = seq_len // 1024
    selected = ops.block_topk_select(q, k, BLOCK, TOP_K, KEEP_FIRST)
    # keys each query reads: top-k + block 0 + its own block (half on average)
    sparse_flops = 4 * HEADS * seq_len * HEAD_DIM * BLOCK * ((selected[0] >= 0).sum(-1).float().mean().item() + 1 + 0.5)

    def add(name, fn, flops=None, estimate=10.0):
        try:
            ms = timed(fn, **reps_for(estimate))
            row = {"section": "prefill", "T": seq_len, "name": name, "ms": ms}
            if flops:
                row["tflops"] = flops / ms / 1e9
            rows.append(row)
            print(f"  {kib}k {name}: {ms:.3f} ms", flush=True)
            return ms
        except Exception as error:  # noqa: BLE001
            rows.append({"section": "prefill", "T": seq_len, "name": name, "error": repr(error)[:300]})
            traceback.print_exc()
            return None

    def ours_fwd():
        return ops.block_topk_attention(q, k, v, BLOCK, TOP_K, KEEP_FIRST)

    def ours_select():
        return ops.block_topk_select(q, k, BLOCK, TOP_K, KEEP_FIRST)

    def ours_attention():
        return ops.block_topk_attention(q, k, v, BLOCK, TOP_K, KEEP_FIRST, block_indices=selected)

    def ours_fwd_bwd():
        qg.grad = kg.grad = vg.grad = None
        ops.block_topk_attention(qg, kg, vg, BLOCK, TOP_K, KEEP_FIRST).backward(do)

    layout = ops._layout(1, seq_len, BLOCK, None, q.device)
    means = ops._pool(q, k, layout, BLOCK)
    fwd = add("ours fwd (selection + attention)", ours_fwd, sparse_flops)
    sel = add("ours selection", ours_select)
    add("  of which block means (reads q and k once)", lambda: ops._pool(q, k, layout, BLOCK))
    add("  of which scores and top-k", lambda: ops._top_k(*means, layout, BLOCK, TOP_K, KEEP_FIRST))
    attention = add("ours attention (given selection)", ours_attention, sparse_flops)
    add("ours fwd+bwd", ours_fwd_bwd, 3.5 * sparse_flops)
    if fwd and sel:
        rows.append({"section": "prefill", "T": seq_len, "name": "selection share of ours fwd", "share": sel / fwd})
    if attention and sel:
        rows.append(
            {"section": "prefill", "T": seq_len, "name": "selection / attention time", "share": sel / attention}
        )
    # GPU time alone (CUDA graph replay): what the kernels cost once launches overlap earlier work, as in a model
    gpu = {}
    for name, fn in (
        ("ours fwd (selection + attention), GPU", ours_fwd),
        ("ours selection, GPU", ours_select),
        ("  of which block means, GPU", lambda: ops._pool(q, k, layout, BLOCK)),
        ("  of which scores and top-k, GPU", lambda: ops._top_k(*means, layout, BLOCK, TOP_K, KEEP_FIRST)),
        ("ours attention (given selection), GPU", ours_attention),
    ):
        try:
            gpu[name] = graph_ms(fn)
            rows.append({"section": "prefill", "T": seq_len, "name": name, "ms": gpu[name]})
            print(f"  {kib}k {name}: {gpu[name]:.4f} ms", flush=True)
        except Exception as error:  # noqa: BLE001
            rows.append({"section": "prefill", "T": seq_len, "name": name, "error": repr(error)[:300]})
            traceback.print_exc()
    selection_gpu, attention_gpu = gpu.get("ours selection, GPU"), gpu.get("ours attention (given selection), GPU")
    if selection_gpu and attention_gpu:
        rows.append(
            {
                "section": "prefill",
                "T": seq_len,
                "name": "selection / attention, GPU time",
                "share": selection_gpu / attention_gpu,
            }
        )
    mixer_selection(rows, seq_len, q, k, gpu)
    selection_check(rows, seq_len, q, k, selected)
    selection_sweep(rows, seq_len, q, k)
    if sweep:
        saved = dict(ops.TUNING)
        for choice in FWD_SWEEP:
            ops.TUNING.update(choice)
            add(f"ours attention {choice}", ours_attention, sparse_flops)
            ops.TUNING.update(saved)
        for choice in BWD_SWEEP:
            ops.TUNING.update(choice)
            add(f"ours fwd+bwd {choice}", ours_fwd_bwd, 3.5 * sparse_flops)
            ops.TUNING.update(saved)

    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    qtg, ktg, vtg = (x.detach().clone().requires_grad_() for x in (qt, kt, vt))
    dot = do.transpose(1, 2)
    estimate = 500.0 if seq_len > 64 * 1024 else 50.0
    add("SDPA flash causal fwd", lambda: sdpa(qt, kt, vt, SDPBackend.FLASH_ATTENTION), dense_flops, estimate)

    def sdpa_fwd_bwd():
        qtg.grad = ktg.grad = vtg.grad = None
        sdpa(qtg, ktg, vtg, SDPBackend.FLASH_ATTENTION).backward(dot)

    def flex_fwd_bwd():
        qtg.grad = ktg.grad = vtg.grad = None
        compiled_flex(qtg, ktg, vtg, **flex_args).backward(dot)

    add("SDPA flash causal fwd+bwd", sdpa_fwd_bwd, 3.5 * dense_flops, 3 * estimate)
    add("SDPA cuDNN causal fwd", lambda: sdpa(qt, kt, vt, SDPBackend.CUDNN_ATTENTION), dense_flops, estimate)
    try:
        mask = flex_block_mask(selected, HEADS, seq_len)
        flex_args = {"block_mask": mask, "scale": HEAD_DIM**-0.5, "enable_gqa": True, "kernel_options": FLEX_OPTIONS}
        add(
            "FlexAttention (compiled) fwd, same selection", lambda: compiled_flex(qt, kt, vt, **flex_args), sparse_flops
        )
        add("FlexAttention (compiled) fwd+bwd, same selection", flex_fwd_bwd, 3.5 * sparse_flops)
        # GPU time alone, as ours above: at 8k both forwards are short enough for launch costs to show in event times
        flex_gpu = graph_ms(lambda: compiled_flex(qt, kt, vt, **flex_args))
        rows.append({"section": "prefill", "T": seq_len, "name": "FlexAttention (compiled) fwd, GPU", "ms": flex_gpu})
        print(f"  {kib}k FlexAttention (compiled) fwd, GPU: {flex_gpu:.4f} ms", flush=True)
    except Exception as error:  # noqa: BLE001
        rows.append({"section": "prefill", "T": seq_len, "name": "FlexAttention", "error": repr(error)[:300]})
        traceback.print_exc()


def decode(rows, context):
    """One decode step after `context` cached tokens: the kernel (`block_topk_decode`: eager with CUDA events, and
    GPU time from graph replay), its output against the torch reference's, the reference step itself, and SDPA over
    the whole cache."""
    try:
        torch.manual_seed(0)
        q_all = torch.randn(1, context + 1, HEADS, HEAD_DIM, device="cuda", dtype=BF16)
        k_all = torch.randn(1, context + 1, KV_HEADS, HEAD_DIM, device="cuda", dtype=BF16)
        v_all = torch.randn_like(k_all)
        first_real = torch.zeros(1, dtype=torch.long, device="cuda")
        options = {"block_size": BLOCK, "top_k": TOP_K, "keep_first_block": KEEP_FIRST}
        _, state = block_topk_cached_attention(
            q_all[:, :context], k_all[:, :context], v_all[:, :context], None, first_real, attend=False, **options
        )
        q_new = q_all[:, context:]

        def reference():
            return block_topk_cached_attention(q_new, k_all, v_all, state, first_real, **options)

        def kernel():
            # the step completes no block (the context is whole blocks), so repeated calls leave the state as it was
            return ops.block_topk_decode(q_new, k_all, v_all, state, first_real, **options)

        error = rel_rms(kernel()[0], reference()[0])
        kernel_ms = timed(kernel, warmup=5, reps=50)
        kernel_gpu = graph_ms(kernel)
        ms = timed(reference, warmup=5, reps=50)
        qt, kt, vt = q_new.transpose(1, 2), k_all.transpose(1, 2), v_all.transpose(1, 2)
        dense = timed(lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True), warmup=5, reps=50)
        rows.append({"section": "decode", "T": context, "name": "block_topk decode step (kernel)", "ms": kernel_ms})
        rows.append(
            {"section": "decode", "T": context, "name": "block_topk decode step (kernel), GPU", "ms": kernel_gpu}
        )
        rows.append({"section": "decode", "T": context, "name": "block_topk decode kernel vs reference", "rel": error})
        rows.append({"section": "decode", "T": context, "name": "block_topk decode step (torch)", "ms": ms})
        rows.append({"section": "decode", "T": context, "name": "SDPA decode over the whole cache", "ms": dense})
        print(
            f"  decode {context // 1024}k: kernel {kernel_ms:.3f} ms ({kernel_gpu:.4f} ms GPU, rel err {error:.1e}), "
            f"torch {ms:.3f} ms, SDPA {dense:.3f} ms",
            flush=True,
        )
    except Exception as error:  # noqa: BLE001
        rows.append({"section": "decode", "T": context, "name": "decode", "error": repr(error)[:300]})
        traceback.print_exc()


def print_table(rows):
    print(f"\n{'section':<12} {'T':>7} {'case':<52} {'result':>40}")
    for row in rows:
        if "error" in row:
            result = "ERROR " + row["error"][:60]
        elif row["section"] == "correctness":
            flex = "-" if row["flex_bf16_o"] is None else f"{row['flex_bf16_o']:.1e}"
            result = (
                f"o {row['o']:.1e} dq {row['dq']:.1e} dk {row['dk']:.1e} dv {row['dv']:.1e} "
                f"{'ok' if row['ok'] else 'FAIL'} (flex bf16 o {flex})"
            )
        elif row["section"] == "selection":
            result = f"{row['differ']} of {row['rows']} rows differ, {row['not_ties']} not ties"
        elif "share" in row:
            result = f"{100 * row['share']:.1f} %"
        elif "rel" in row:
            result = f"rel RMS {row['rel']:.1e}" + ("" if row["rel"] <= 0.005 else " FAIL")
        else:
            result = f"{row['ms']:.3f} ms" + (f" ({row['tflops']:.0f} TFLOP/s)" if "tflops" in row else "")
        print(f"{row['section']:<12} {row.get('T', ''):>7} {row['name']:<52} {result:>40}")
    by_name = {(r.get("T"), r["name"]): r.get("ms") for r in rows if r["section"] == "prefill"}
    for seq_len in sorted({r["T"] for r in rows if r["section"] == "prefill"}):
        ours = by_name.get((seq_len, "ours fwd (selection + attention)"))
        flash = by_name.get((seq_len, "SDPA flash causal fwd"))
        flex = by_name.get((seq_len, "FlexAttention (compiled) fwd, same selection"))
        ours_gpu = by_name.get((seq_len, "ours fwd (selection + attention), GPU"))
        flex_gpu = by_name.get((seq_len, "FlexAttention (compiled) fwd, GPU"))
        if ours:
            print(
                f"T={seq_len}: ours fwd is {flash / ours if flash else float('nan'):.1f}x SDPA flash, "
                f"{flex / ours if flex else float('nan'):.2f}x compiled Flex on the same selection "
                f"({flex_gpu / ours_gpu if flex_gpu and ours_gpu else float('nan'):.2f}x in GPU time)"
            )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--decode-contexts", type=int, nargs="+", default=[4096, 16384, 32768, 65536, 131072])
    parser.add_argument("--skip-correctness", action="store_true")
    args = parser.parse_args()
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    props = torch.cuda.get_device_properties(0)
    print(
        f"{props.name}, torch {torch.__version__}, triton {triton.__version__}; config {vars(args)}; "
        f"tuning {ops.TUNING}",
        flush=True,
    )
    started = time.time()
    try:
        allow_flex_backward_on_64_token_blocks()
    except (ImportError, AttributeError) as error:
        print(f"FlexAttention's backward configs left as they are: {error!r}")
    rows = []
    if not args.skip_correctness:
        correctness(rows)
        print(f"correctness done ({time.time() - started:.0f} s)", flush=True)
    sweep_len = sorted(args.seq_lens)[len(args.seq_lens) // 2]
    for seq_len in args.seq_lens:
        benchmark(rows, seq_len, sweep=seq_len == sweep_len)
        torch.cuda.empty_cache()
    print(f"prefill done ({time.time() - started:.0f} s)", flush=True)
    for context in args.decode_contexts:
        decode(rows, context)
        torch.cuda.empty_cache()
    print_table(rows)
    result = {
        "device": props.name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "tuning": ops.TUNING,
        "seconds": time.time() - started,
        "rows": rows,
    }
    (output / "block_topk_gpu.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"total {time.time() - started:.0f} s; wrote {output / 'block_topk_gpu.json'}")
    if not args.skip_correctness:
        # a check that failed, raised or never ran fails the run (the report is written first)
        checked = [row for row in rows if row["section"] == "correctness"]
        failed = [row["name"] for row in checked if not row.get("ok")]
        failed += [f"selection T={row['T']}" for row in rows if row["section"] == "selection" and not row.get("ok")]
        failed += [f"decode T={row['T']}" for row in rows if row.get("rel", 0.0) > 0.005 or row["name"] == "decode"]
        missing = len(CORRECTNESS_CASES) - len(checked)
        if failed or missing:
            sys.exit(f"correctness: {len(failed)} failed {failed}, {missing} did not run")


if __name__ == "__main__":
    main()
