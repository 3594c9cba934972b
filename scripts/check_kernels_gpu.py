"""Correctness of the Triton linear-attention kernels on a GPU: every op against the fp64 naive recurrence.

    python scripts/check_kernels_gpu.py [--variant gdn] [--output-dir DIR] [--cases T1000] [--tune]
    python scripts/check_kernels_gpu.py --candidates [--variant gdn] [--jobs 8]

Checks the chunked ops (output, final state, dq, dk, dv, dg, dbeta, dh0; output and final state again without
gradients, the inference path) and the fused-recurrent ops (output, final state) for gdn, deltanet, gla and kda
over odd lengths, head dims 64/128/100, GVA, packed sequences with length-1 segments, bf16/fp16/fp32 and strong
decays; sequences split into segments (the long-sequence path, fixed-length and
packed, with mild and strong decays); and the other launch-config candidates of the tuned kernels (`-alt` cases). Launch configs are not tuned
(the first candidates run) unless `--tune`. Prints one row per case and the worst error of each column, writes
kernel_check[_VARIANT].json to the output folder when given, and exits with status 1 if any case fails. Run one
process per variant to compile their kernels in parallel.

`--candidates` checks every launch-config candidate of every tuned kernel alone (the other kernels on their
defaults), each in its own process on the split case, so that a candidate which crashes the GPU context (an illegal
memory access cannot be caught inside a process) is named instead of ending the run. The tuner tries every candidate
at a new shape, so one that crashes here would crash the ops.
"""

import argparse
import functools
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import triton

from hf_effattn.kernels import linear_attn, testing

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
# name: (B, T, H, HV, K, V, dtype, strong decay, cu_seqlens); mostly H=2, HV=4, D=128, so that few kernel
# specialisations are compiled
CHUNK_CASES = {
    "T1": (2, 1, 2, 4, 128, 128, BF16, False, None),
    "T63": (2, 63, 2, 4, 128, 128, BF16, False, None),
    "T1000-GVA": (2, 1000, 2, 4, 128, 128, BF16, False, None),
    "T1000-HV=H": (2, 1000, 4, 4, 128, 128, BF16, False, None),
    "T1000-D64": (2, 1000, 2, 4, 64, 64, BF16, False, None),
    "T1000-D100": (1, 1000, 2, 4, 100, 100, BF16, False, None),
    "varlen": (1, 1000, 2, 4, 128, 128, BF16, False, [0, 1, 15, 100, 300, 301, 1000]),
    "T1000-fp16": (1, 1000, 2, 4, 128, 128, FP16, False, None),
    "T1000-fp32": (1, 1000, 2, 4, 128, 128, FP32, False, None),
    "T500-strong-decay": (1, 500, 2, 4, 128, 128, BF16, True, None),
    "T4096": (1, 4096, 2, 4, 128, 128, BF16, False, None),
    "T2048-split": (1, 2048, 2, 4, 128, 128, BF16, False, None),
    "T1000-B2-split": (2, 1000, 2, 4, 128, 128, BF16, False, None),
    "varlen-split": (1, 2048, 2, 4, 128, 128, BF16, False, [0, 1, 15, 700, 701, 1500, 2048]),
    # strong decays in segments: GDN's maps and the backward's segment shares skip decayed-out chunks
    "T4096-strong-split": (1, 4096, 2, 4, 128, 128, BF16, True, None),
    "varlen-strong-split": (1, 2048, 2, 4, 128, 128, BF16, True, [0, 1, 15, 700, 701, 1500, 2048]),
    "T1000-alt1": (2, 1000, 2, 4, 128, 128, BF16, False, None),
    "T1000-split-alt2": (2, 1000, 2, 4, 128, 128, BF16, False, None),
    "T1000-alt3": (2, 1000, 2, 4, 128, 128, BF16, False, None),
    "T1000-split-alt4": (2, 1000, 2, 4, 128, 128, BF16, False, None),
}
# sequences split into segments of this many chunks
SPLIT_CHUNKS = 8
TUNED_KERNELS = (
    "chunk_pairwise_fwd_kernel",
    "chunk_wy_fwd_kernel",
    "chunk_wu_fwd_kernel",
    "chunk_segment_fwd_kernel",
    "chunk_combine_kernel",
    "chunk_state_fwd_kernel",
    "chunk_state_fwd_t_kernel",
    "chunk_state_bwd_kernel",
    "chunk_grad_kernel",
)
# name: (B, T, H, HV, K, V, dtype, cu_seqlens, in-kernel q/k L2 norm)
RECURRENT_CASES = {
    "T1-B16": (16, 1, 2, 4, 128, 128, BF16, None, False),
    "T63-D100-l2norm": (2, 63, 2, 4, 100, 100, BF16, None, True),
    "varlen": (1, 300, 2, 4, 128, 128, BF16, [0, 1, 2, 100, 300], False),
}
COLUMNS = ("o", "state", *testing.GRADIENTS)
# the most launch candidates any tuned kernel has (indices past a kernel's last candidate repeat its last)
MAX_CANDIDATES = 5
# `--candidates` runs this case: two sequences split into segments, so that every tuned kernel runs
CANDIDATE_CASE = "T1000-B2-split"
CHOICES_MARKER = "launch configs: "


def row(kind, variant, name, errors, bad, seconds):
    cells = [f"{errors[c]:.1e}" if c in errors else "-" for c in COLUMNS]
    status = "ok" if not bad else "FAIL"
    return f"{kind:<9} {variant:<9} {name:<18} " + " ".join(f"{c:>8}" for c in cells) + f" {seconds:6.1f}s {status}"


def main(
    variants=testing.VARIANTS,
    output_dir: str | None = None,
    case_filter: str = "",
    tune: bool = False,
    overrides: dict[str, int] | None = None,
) -> int:
    device = torch.device("cuda")
    linear_attn.TUNE = tune
    props = torch.cuda.get_device_properties(device)
    print(f"{props.name}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"{'op':<9} {'variant':<9} {'case':<18} " + " ".join(f"{c:>8}" for c in COLUMNS) + "   time")
    results, failed = [], []
    info = {"device": props.name, "torch": torch.__version__, "triton": triton.__version__, "tune": tune}
    path = None
    if output_dir:
        suffix = "" if len(variants) > 1 else f"_{variants[0]}"
        path = Path(output_dir) / f"kernel_check{suffix}.json"
        path.parent.mkdir(parents=True, exist_ok=True)

    def record(kind, variant, name, dtype, check, *args):
        start = time.time()
        # "-split": segments of SPLIT_CHUNKS chunks; "-altN": candidate N of every tuned kernel's launch configs
        linear_attn.SEGMENT_CHUNKS = SPLIT_CHUNKS if "-split" in name else None
        alt = name.rpartition("-alt")[2] if "-alt" in name else None
        linear_attn.CONFIG_OVERRIDE = dict.fromkeys(TUNED_KERNELS, int(alt)) if alt else dict(overrides or {})
        try:
            errors = check(variant, *args)
            bad = testing.failures(errors, dtype)
        except Exception as error:  # noqa: BLE001 (a crash fails its case; the other cases still run)
            errors, bad = {}, [f"{type(error).__name__}: {error}"]
        finally:
            linear_attn.SEGMENT_CHUNKS, linear_attn.CONFIG_OVERRIDE = None, {}
        torch.cuda.synchronize()
        seconds = time.time() - start
        print(row(kind, variant, name, errors, bad, seconds), flush=True)
        for line in bad:
            print(f"    {line}", flush=True)
        entry = {"op": kind, "variant": variant, "case": name, "dtype": str(dtype), "errors": errors}
        results.append({**entry, "failures": bad, "seconds": seconds})
        if bad:
            failed.append((kind, variant, name))
        # after every case, so that a run cut short keeps what it checked
        if path:
            path.write_text(json.dumps({"environment": info, "results": results}, indent=1))

    def selected(name):
        # a full case name selects that case alone ("T1" is not "T1000-GVA"), other text every case containing it
        exact = case_filter in CHUNK_CASES or case_filter in RECURRENT_CASES
        return name == case_filter if exact else case_filter in name

    inference = functools.partial(testing.check_chunk, backward=False)
    for variant in variants:
        for name, (*shape, dtype, strong, cu) in CHUNK_CASES.items():
            if (strong and variant == "deltanet") or not selected(name):
                continue
            record("chunk", variant, name, dtype, testing.check_chunk, *shape, dtype, device, strong, cu)
            # the forward without gradients takes another path (the delta rule's pseudo-values from Ai)
            if "-alt" not in name:
                record("inference", variant, name, dtype, inference, *shape, dtype, device, strong, cu)
        for name, (*shape, dtype, cu, l2) in RECURRENT_CASES.items():
            if not selected(name):
                continue
            record("recurrent", variant, name, dtype, testing.check_fused_recurrent, *shape, dtype, device, cu, l2)

    worst = {
        c: max((r["errors"].get(c, 0.0) for r in results if r["dtype"] == str(BF16)), default=0.0) for c in COLUMNS
    }
    print("worst bf16 error per column: " + ", ".join(f"{c} {v:.1e}" for c, v in worst.items()))
    print(f"{len(results) - len(failed)}/{len(results)} cases passed")
    # launch configs (dicts) only: the segment-length choices are numbers
    choices = {
        entry["kernel"]: linear_attn._label(entry["choice"])
        for entry in linear_attn.tuned_configs()
        if isinstance(entry["choice"], dict)
    }
    print(CHOICES_MARKER + json.dumps(choices), flush=True)
    return 1 if failed else 0


def check_candidates(variants, jobs: int, output_dir: str | None, case: str = CANDIDATE_CASE) -> int:
    """Every candidate (past the first) of every tuned kernel, alone, in its own process; prints one row each."""
    runs = [(v, kernel, i) for v in variants for kernel in TUNED_KERNELS for i in range(1, MAX_CANDIDATES)]

    def child(run):
        variant, kernel, index = run
        command = [sys.executable, __file__, "--variant", variant, "--cases", case]
        command += ["--override", f"{kernel}={index}"]
        start = time.time()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
            output, code = done.stdout + done.stderr, done.returncode
        except subprocess.TimeoutExpired:
            output, code = "timed out after 600 s", -1
        config = ""
        for line in output.splitlines():
            if line.startswith(CHOICES_MARKER):
                config = json.loads(line[len(CHOICES_MARKER) :]).get(kernel, "")
        errors = [line.strip() for line in output.splitlines() if "Error" in line or "FAIL" in line]
        return {
            "variant": variant,
            "kernel": kernel,
            "candidate": index,
            "config": config,
            "status": "ok" if code == 0 else "FAIL",
            "error": errors[-1][:160] if errors else ("" if code == 0 else output[-160:]),
            "seconds": time.time() - start,
        }

    print(f"{'variant':<9} {'kernel':<25} {'#':>2} {'config':<32} status")
    results, seen = [], set()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for result in pool.map(child, runs):
            # an index past a kernel's last candidate repeats the last one
            key = (result["variant"], result["kernel"], result["config"])
            if result["config"] and key in seen:
                continue
            seen.add(key)
            results.append(result)
            print(
                f"{result['variant']:<9} {result['kernel']:<25} {result['candidate']:>2} {result['config']:<32} "
                f"{result['status']} {result['error']}",
                flush=True,
            )
    failed = [r for r in results if r["status"] != "ok"]
    print(f"{len(results) - len(failed)}/{len(results)} candidates passed")
    if output_dir:
        path = Path(output_dir) / "kernel_candidates.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=testing.VARIANTS, help="check one variant (default: all)")
    parser.add_argument("--output-dir", help="folder for the JSON results")
    parser.add_argument("--cases", default="", help="only this case, or the cases whose name contains this text")
    parser.add_argument("--tune", action="store_true", help="tune launch configs as the ops do by default")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KERNEL=INDEX",
        help="run candidate INDEX of a tuned kernel's launch configs (repeatable)",
    )
    parser.add_argument("--candidates", action="store_true", help="check every candidate alone, one process each")
    parser.add_argument("--jobs", type=int, default=8, help="processes at a time for --candidates")
    parser.add_argument("--candidate-case", default=CANDIDATE_CASE, help="the case --candidates runs")
    args = parser.parse_args()
    chosen = (args.variant,) if args.variant else testing.VARIANTS
    if args.candidates:
        sys.exit(check_candidates(chosen, args.jobs, args.output_dir, args.candidate_case))
    overrides = {}
    for item in args.override:
        kernel, _, index = item.partition("=")
        if kernel not in TUNED_KERNELS or not index.isdigit():
            parser.error(f"--override {item!r}: expected KERNEL=INDEX with KERNEL one of {', '.join(TUNED_KERNELS)}")
        overrides[kernel] = int(index)
    sys.exit(main(chosen, args.output_dir, args.cases, args.tune, overrides))
