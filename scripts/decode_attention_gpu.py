"""Checks and times the split-KV decode attention kernel on a GPU against SDPA.

    python scripts/decode_attention_gpu.py OUTPUT_DIR            # checks and timings (a few minutes)
    python scripts/decode_attention_gpu.py OUTPUT_DIR --sweep    # also times candidate launch configs

Shapes: bf16, 16 query / 8 key-value heads, D = 128 (the 1.5b bench shape), B in {1, 16}, L in {8k, 32k, 128k}; a
size whose tensors do not fit in free GPU memory is skipped (said in its row). Two cases per size:

- dynamic: a cache of exactly L keys, all valid (kv_len None), as on transformers' dynamic cache. Baseline: SDPA
  without a mask, GQA through `enable_gqa`, as transformers' sdpa path calls it.
- static: a buffer of L + 256 slots whose first L are valid (kv_len = L, a device tensor), as in `StaticCache`.
  Baseline: SDPA with the static cache's boolean mask `[B, 1, 1, L + 256]` on key/value heads repeated over their
  groups (transformers' `repeat_kv`, done outside the timed call).

SDPA runs with the backend priority of the model's full layers (cuDNN, flash, efficient, math); each fused backend
is also timed alone (JSON `sdpa_backend_ms`), which shows the one the priority picked.

Correctness: relative RMS error of ours against SDPA in fp32 on the same bf16 inputs (bound 5e-3); SDPA in bf16
against the same reference, and ours against SDPA in bf16, are listed for context. Timing: 20 calls captured in one CUDA graph, replayed, averaged
per call; the calls cycle over enough copies of the cache that it is not read from L2 (50 MB on an H100). GB/s: the
valid keys' and values' bytes per call over its time.

Prints a markdown table and writes OUTPUT_DIR/decode_attention_gpu.json (after every row, so that a run cut short
keeps what it measured). Exits 1 when a check fails or raises.
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

from hf_effattn.kernels import decode_attention as da
from hf_effattn.kernels.testing import rel_rms

HEADS, KV_HEADS, HEAD_DIM = 16, 8, 128
BATCHES = (1, 16)
LENGTHS = (8192, 32768, 131072)
STATIC_PAD = 256
TOL = 5e-3
GRAPH_CALLS, REPLAYS = 20, 10
# copies of the cache that the timed calls cycle over: together at least this many bytes (H100 L2: 50 MB)
ROTATE_BYTES = 256 << 20
SWEEP_LAUNCH = [(32, 4, 2), (64, 4, 2), (64, 4, 3), (64, 8, 3), (128, 4, 2), (128, 8, 3)]
SWEEP_PROGRAMS_PER_SM = [2, 4, 8]


def sdpa_backends(name: str | None = None):
    """The model's SDPA backend priority (cuDNN, flash, efficient, math), or the one backend `name`."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }
    if name is not None:
        return sdpa_kernel([backends[name]])
    return sdpa_kernel(list(backends.values()), set_priority=True)


def graph_ms(calls) -> float:
    """ms per call of `calls` (a list of functions, run in turn), GRAPH_CALLS of them captured in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        # warm-up outside the graph: Triton compiles, cuDNN builds its plans
        for i in range(max(3, len(calls))):
            calls[i % len(calls)]()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(GRAPH_CALLS):
            calls[i % len(calls)]()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPLAYS):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (REPLAYS * GRAPH_CALLS)


def fits(num_bytes: int) -> bool:
    torch.cuda.empty_cache()
    return num_bytes < 0.85 * torch.cuda.mem_get_info()[0]


def copies_for(num_bytes: int) -> int:
    return max(1, min(GRAPH_CALLS, math.ceil(ROTATE_BYTES / num_bytes)))


def reference(q, k, v, mask):
    """fp32 SDPA of the bf16 inputs, one row at a time (fp32 copies of a 128k cache at B = 16 would be 17 GB)."""
    groups = q.shape[1] // k.shape[1]
    rows = []
    for b in range(q.shape[0]):
        kb, vb = (x[b : b + 1].float().repeat_interleave(groups, dim=1) for x in (k, v))
        row_mask = None if mask is None else mask[b : b + 1]
        rows.append(F.scaled_dot_product_attention(q[b : b + 1].float(), kb, vb, attn_mask=row_mask))
    return torch.cat(rows)


def case_row(kind: str, batch: int, length: int) -> dict:
    """Checks and times one (case, B, L)."""
    slots = length + (STATIC_PAD if kind == "static" else 0)
    row = {"case": kind, "batch": batch, "length": length, "slots": slots}
    cache_bytes = 2 * batch * KV_HEADS * slots * HEAD_DIM * 2
    valid_bytes = 2 * batch * KV_HEADS * length * HEAD_DIM * 2
    groups = HEADS // KV_HEADS
    copies = copies_for(cache_bytes)
    # ours reads the copies; the static baseline reads repeated copies of them
    needed = cache_bytes * copies * (1 + (groups if kind == "static" else 0)) + cache_bytes // (batch * KV_HEADS) * 8
    if not fits(needed):
        row["skipped"] = f"needs about {needed / 2**30:.1f} GiB, {torch.cuda.mem_get_info()[0] / 2**30:.1f} GiB free"
        return row
    torch.manual_seed(0)
    q = torch.randn(batch, HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    caches = []
    for _ in range(copies):
        k, v = (torch.randn(batch, KV_HEADS, slots, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        if kind == "static":
            # a static cache's slots past its tokens hold zeros
            k[:, :, length:] = 0
            v[:, :, length:] = 0
        caches.append((k, v))
    kv_len = torch.tensor(length, device="cuda") if kind == "static" else None
    mask = None
    if kind == "static":
        mask = (torch.arange(slots, device="cuda") < length).repeat(batch, 1, 1, 1)
    k, v = caches[0]
    row["splits"] = da.num_splits_for(slots, batch, KV_HEADS, q.device)

    with torch.no_grad(), sdpa_backends():
        expected = reference(q, k, v, mask)
        ours = da.decode_attention(q, k, v, kv_len)
        torch.cuda.synchronize()
        row["ours_error"] = rel_rms(ours, expected)
        row["ours_finite"] = bool(torch.isfinite(ours).all())
        row["ok"] = row["ours_finite"] and row["ours_error"] <= TOL
        ours_calls = [lambda k=k, v=v: da.decode_attention(q, k, v, kv_len) for k, v in caches]
        row["ours_ms"] = graph_ms(ours_calls)
        if kind == "dynamic":
            baseline = [lambda k=k, v=v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True) for k, v in caches]
        else:
            repeated = [tuple(x.repeat_interleave(groups, dim=1) for x in kv) for kv in caches]
            baseline = [lambda k=k, v=v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask) for k, v in repeated]
        sdpa_out = baseline[0]()
        row["sdpa_error"] = rel_rms(sdpa_out, expected)
        row["ours_vs_sdpa_bf16"] = rel_rms(ours, sdpa_out)
        del expected, ours, sdpa_out
        row["sdpa_ms"] = graph_ms(baseline)
    # which backend the priority picked: each fused one alone ("unsupported" where it refuses these inputs)
    row["sdpa_backend_ms"] = {}
    for name in ("cudnn", "flash", "efficient"):
        try:
            with torch.no_grad(), sdpa_backends(name):
                row["sdpa_backend_ms"][name] = graph_ms(baseline)
        except RuntimeError as error:
            row["sdpa_backend_ms"][name] = f"unsupported: {str(error).splitlines()[0][:120]}"
        torch.cuda.synchronize()
    row["speedup"] = row["sdpa_ms"] / row["ours_ms"]
    row["ours_gbps"] = valid_bytes / row["ours_ms"] / 1e6
    row["sdpa_gbps"] = valid_bytes / row["sdpa_ms"] / 1e6
    return row


def sweep_rows(batch: int, length: int) -> list[dict]:
    """ms per call of ours (dynamic case) for each candidate launch config and programs-per-SM target."""
    rows = []
    cache_bytes = 2 * batch * KV_HEADS * length * HEAD_DIM * 2
    copies = copies_for(cache_bytes)
    if not fits(cache_bytes * copies):
        return [{"batch": batch, "length": length, "skipped": "does not fit"}]
    q = torch.randn(batch, HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    caches = [
        tuple(torch.randn(batch, KV_HEADS, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        for _ in range(copies)
    ]
    launch, programs = da.GPU_LAUNCH[2], da.PROGRAMS_PER_SM
    try:
        for candidate in SWEEP_LAUNCH:
            for per_sm in SWEEP_PROGRAMS_PER_SM:
                da.GPU_LAUNCH[2], da.PROGRAMS_PER_SM = candidate, per_sm
                row = {"batch": batch, "length": length, "launch": candidate, "programs_per_sm": per_sm}
                try:
                    with torch.no_grad():
                        row["ms"] = graph_ms([lambda k=k, v=v: da.decode_attention(q, k, v) for k, v in caches])
                    row["gbps"] = cache_bytes / row["ms"] / 1e6
                except Exception as error:  # noqa: BLE001 (one failing candidate must not end the sweep)
                    row["error"] = f"{type(error).__name__}: {str(error)[:200]}"
                print(json.dumps(row), flush=True)
                rows.append(row)
    finally:
        da.GPU_LAUNCH[2], da.PROGRAMS_PER_SM = launch, programs
    return rows


def fmt(value, digits=3):
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 1e-2 or value == 0 else f"{value:.1e}"
    return "" if value is None else str(value)


# the table's columns: (header, row -> cell)
COLUMNS = [
    ("case", lambda row: row["case"]),
    ("B", lambda row: row["batch"]),
    ("L", lambda row: f"{row['length']:,}"),
    ("splits", lambda row: row.get("splits")),
    ("ours err", lambda row: fmt(row.get("ours_error")) + ("" if row.get("ok") else " **FAIL**")),
    ("SDPA bf16 err", lambda row: fmt(row.get("sdpa_error"))),
    ("ours (ms)", lambda row: fmt(row.get("ours_ms"), 4)),
    ("SDPA (ms)", lambda row: fmt(row.get("sdpa_ms"), 4)),
    ("speed-up", lambda row: fmt(row.get("speedup"), 2)),
    ("ours GB/s", lambda row: fmt(row.get("ours_gbps"), 0)),
    ("SDPA GB/s", lambda row: fmt(row.get("sdpa_gbps"), 0)),
]


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(name for name, _ in COLUMNS) + " |", "|---" * len(COLUMNS) + "|"]
    for row in rows:
        if "skipped" in row or "error" in row:
            # the first three columns, then why the row has no numbers
            note = row.get("skipped") or f"**error**: {row['error']}"
            cells = [str(cell(row)) for _, cell in COLUMNS[:3]] + [note] + [""] * (len(COLUMNS) - 4)
        else:
            cells = ["" if cell(row) is None else str(cell(row)) for _, cell in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--sweep", action="store_true", help="also time candidate launch configs (B = 1 and 16, 32k)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("decode_attention_gpu.py needs a CUDA GPU", file=sys.stderr)
        return 1
    import triton

    args.output_dir.mkdir(parents=True, exist_ok=True)
    path = args.output_dir / "decode_attention_gpu.json"
    device = torch.cuda.current_device()
    report = {
        "device": torch.cuda.get_device_name(),
        "sms": torch.cuda.get_device_properties(device).multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "heads": HEADS,
        "kv_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "launch": {str(size): list(config) for size, config in da.GPU_LAUNCH.items()},
        "programs_per_sm": da.PROGRAMS_PER_SM,
        "min_split_keys": da.MIN_SPLIT_KEYS,
        "graph_calls": GRAPH_CALLS,
        "rows": [],
    }
    print(f"{report['device']} ({report['sms']} SMs), torch {report['torch']}, triton {report['triton']}", flush=True)
    start = time.time()
    for batch in BATCHES:
        for length in LENGTHS:
            for kind in ("dynamic", "static"):
                try:
                    row = case_row(kind, batch, length)
                except Exception as error:  # noqa: BLE001 (a failing row is reported; the others still run)
                    traceback.print_exc()
                    row = {"case": kind, "batch": batch, "length": length, "error": f"{type(error).__name__}: {error}"}
                finally:
                    torch.cuda.empty_cache()
                print(json.dumps(row), flush=True)
                report["rows"].append(row)
                path.write_text(json.dumps(report, indent=2) + "\n")
    if args.sweep:
        report["sweep"] = []
        for batch in BATCHES:
            report["sweep"] += sweep_rows(batch, 32768)
            torch.cuda.empty_cache()
    path.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(table(report["rows"]))
    print(f"\nwrote {path} ({time.time() - start:.0f} s)")
    failed = [row for row in report["rows"] if "error" in row or ("ok" in row and not row["ok"])]
    if failed:
        cases = [(row["case"], row["batch"], row["length"]) for row in failed]
        print(f"{len(failed)} check(s) failed or raised: {cases}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
