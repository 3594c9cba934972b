"""Timings of the Triton linear-attention kernels on a GPU, against fla (when importable) and SDPA in the same run.

    python scripts/bench_kernels.py OUTPUT_DIR [--seq-lens 2048,8192,32768,131072] [--ops chunk_gated_delta_rule]
        [--profile] [--budget-s 420] [--no-fla] [--no-sdpa] [--no-decode] [--no-tune]

Prefill: bf16, H = 16 heads, D = 128, B * T = 65,536 tokens at T = 2k, 8k, 32k (B = 32, 8, 2) and B = 1 at T = 128k,
forward and forward + backward of chunk_gated_delta_rule, chunk_gla and chunk_kda, fla's same ops, and causal SDPA
(flash backend). Decode: one step of fused_recurrent_gated_delta_rule at B = 1, 16, 64 with its fp32 state traffic,
timed as CUDA graph replays that step through state copies of 256 MB or more, so that each step reads its state
from device memory rather than L2 (eager calls, host launch included, beside them). Other times are medians of
`triton.testing.do_bench`; the first call of each row (not timed) tunes our launch configs and fla's. Each row also reports the relative RMS difference between our output and fla's. `--profile` prints the CUDA
time of every kernel of the GDN op, ours and fla's, forward and forward + backward, at B=1, T=128k and B=32, T=2k.
Rows run in order (decode, SDPA, GDN, the profile, the other ops' forward rows, then their forward + backward rows)
until `--budget-s` is spent; the rest are recorded as skipped. Prints a table, the tuned launch configs and the
targets, and writes kernel_bench.json to OUTPUT_DIR after every row. Not a test.
"""

import argparse
import collections
import itertools
import json
import math
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from hf_effattn import kernels as ours
from hf_effattn.kernels import linear_attn
from hf_effattn.kernels.testing import rel_rms

try:
    import fla
    from fla import ops as fla_ops
except ImportError:
    fla = fla_ops = None

HEADS, DIM, TOKENS = 16, 128, 65536
SEQ_LENS = (2048, 8192, 32768, 131072)
DECODE_BATCHES = (1, 16, 64)
OPS = ("chunk_gated_delta_rule", "chunk_gla", "chunk_kda")
PROFILE_SHAPES = ((1, 131072), (32, 2048))
# ours / fla (forward) and ours / SDPA flash (forward + backward) to reach
TARGETS = {
    ("chunk_gated_delta_rule", "fwd", 2048): 0.8,
    ("chunk_gated_delta_rule", "fwd", 8192): 0.8,
    ("chunk_gated_delta_rule", "fwd", 32768): 0.8,
    ("chunk_gated_delta_rule", "fwd", 131072): 0.5,
    ("chunk_gla", "fwd", None): 0.8,
    ("chunk_kda", "fwd", None): 0.8,
}
SDPA_TARGET = ("chunk_gated_delta_rule", "fwd+bwd", 32768, 0.1)


def _batch(seq_len: int) -> int:
    return max(1, TOKENS // seq_len)


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def bench_graph(fn) -> float:
    """Median ms of one call of `fn` replayed from a CUDA graph: the kernels alone, without the host's launch cost,
    as a decode step runs inside a captured model step."""
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")


def make_inputs(op, batch, seq_len, requires_grad):
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (batch, seq_len, HEADS, DIM)

    def randn(*size, dtype=torch.bfloat16):
        return torch.randn(*size, generator=gen, device="cuda", dtype=torch.float32).to(dtype)

    q, k, v = randn(*shape), randn(*shape), randn(*shape)
    if op != "chunk_gla":
        q, k = F.normalize(q.float(), dim=-1).bfloat16(), F.normalize(k.float(), dim=-1).bfloat16()
    args = {"q": q, "k": k, "v": v}
    if op == "chunk_gated_delta_rule":
        args["g"] = F.logsigmoid(randn(batch, seq_len, HEADS, dtype=torch.float32) + 2.0)
    else:
        args["g"] = F.logsigmoid(randn(*shape, dtype=torch.float32) + 2.0)
    if op != "chunk_gla":
        args["beta"] = torch.rand(batch, seq_len, HEADS, generator=gen, device="cuda").bfloat16()
    for x in args.values():
        x.requires_grad_(requires_grad)
    return args


def run_op(fn, args, backward: bool, do=None):
    """One call: the output (forward) or the output and the input gradients (forward + backward)."""
    if not backward:
        with torch.no_grad():
            return fn(**args)[0], None
    for x in args.values():
        x.grad = None
    out = fn(**args)[0]
    out.backward(do)
    # copies: later calls accumulate into .grad
    return out, {name: None if x.grad is None else x.grad.clone() for name, x in args.items()}


def time_op(fn, args, backward: bool):
    """(median ms, output, gradients) of fn(**args) (forward) or of forward + backward of its output."""
    do = None
    if backward:
        with torch.no_grad():
            out = fn(**args)[0]
            # the same upstream gradient for every provider, so that their gradients can be compared
            gen = torch.Generator(device=out.device).manual_seed(1)
            do = torch.randn(out.shape, generator=gen, device=out.device, dtype=torch.float32).to(out.dtype)
    out, grads = run_op(fn, args, backward, do)
    if not backward:
        with torch.no_grad():
            return bench(lambda: fn(**args)), out, None

    def step():
        # the gradients replace the last call's rather than add to them: a running sum would time one elementwise
        # add per input on top of the op (about 0.8 ms for q, k and v at B * T = 65,536, H = 16, D = 128)
        for x in args.values():
            x.grad = None
        fn(**args)[0].backward(do)

    return bench(step), out, grads


class Run:
    """The rows, saved to OUTPUT_DIR/kernel_bench.json after each, within a time budget."""

    def __init__(self, output_dir: str, budget_s: float, environment: dict):
        self.out = Path(output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.start = time.time()
        self.budget_s = budget_s
        self.environment = environment
        self.results, self.profiles = [], []

    def over_budget(self) -> bool:
        return time.time() - self.start > self.budget_s

    def add(self, entry: dict):
        entry["elapsed_s"] = round(time.time() - self.start, 1)
        self.results.append(entry)
        print_row(entry)
        self.save()

    def save(self):
        payload = {
            "environment": self.environment,
            "results": self.results,
            "profiles": self.profiles,
            "tuned": _jsonable(linear_attn.tuned_configs()),
        }
        (self.out / "kernel_bench.json").write_text(json.dumps(payload, indent=1))


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, int | float | str | bool) or x is None:
        return x
    return str(x)


def guarded(run: Run, entry: dict, fn):
    """fn(entry) with a budget check and any error recorded in the row instead of ending the run."""
    if run.over_budget():
        entry["skipped"] = "time budget"
    else:
        try:
            fn(entry)
        except Exception as error:  # noqa: BLE001 (one failing row must not end the run)
            entry["error"] = f"{type(error).__name__}: {str(error)[:300]}"
            traceback.print_exc()
        torch.cuda.empty_cache()
    run.add(entry)


def warm_up_gpu(seconds: float = 2.0) -> None:
    """Matrix products for a couple of seconds, so that the first rows do not run at idle clocks (an idle H100 sits
    at a few hundred MHz, and the first decode row measured 0.3 ms instead of 0.02 ms)."""
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()


def prefill_rows(run: Run, op: str, seq_lens, with_fla: bool, modes=(False, True)):
    for backward in modes:
        for seq_len in seq_lens:
            batch = _batch(seq_len)
            entry = {"kind": "prefill", "op": op, "mode": "fwd+bwd" if backward else "fwd", "B": batch, "T": seq_len}

            def measure(entry, backward=backward, batch=batch, seq_len=seq_len):
                args = make_inputs(op, batch, seq_len, backward)
                entry["ours_ms"], out, grads = time_op(getattr(ours, op), args, backward)
                if not with_fla:
                    return
                try:
                    entry["fla_ms"], fla_out, fla_grads = time_op(getattr(fla_ops, op), args, backward)
                except Exception as error:  # noqa: BLE001 (fla refuses some configurations)
                    entry["fla_error"] = f"{type(error).__name__}: {str(error)[:160]}"
                    return
                entry["ours_vs_fla_rel_rms"] = rel_rms(out, fla_out)
                if grads is not None:
                    entry["grads_vs_fla_rel_rms"] = {
                        name: rel_rms(grads[name], fla_grads[name])
                        for name in grads
                        if grads[name] is not None and fla_grads[name] is not None
                    }

            guarded(run, entry, measure)


def sdpa_rows(run: Run, seq_lens):
    for seq_len in seq_lens:
        batch = _batch(seq_len)
        for backward in (False, True):
            entry = {
                "kind": "prefill",
                "op": "sdpa_flash",
                "mode": "fwd+bwd" if backward else "fwd",
                "B": batch,
                "T": seq_len,
            }

            def measure(entry, backward=backward, batch=batch, seq_len=seq_len):
                shape = (batch, HEADS, seq_len, DIM)
                args = {
                    name: torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
                    for name in ("q", "k", "v")
                }

                def attention(q, k, v):
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        return (F.scaled_dot_product_attention(q, k, v, is_causal=True),)

                entry["ours_ms"], _, _ = time_op(attention, args, backward)
                flops = 2 * batch * HEADS * seq_len * seq_len * DIM * (3.5 if backward else 1.0)
                entry["tflops"] = flops / entry["ours_ms"] / 1e9

            guarded(run, entry, measure)


def decode_inputs(batch):
    """(arguments of one GDN decode step at `batch`, copies of its state): the graph steps through enough state
    copies (>= 256 MB) that every step reads its state from device memory, not from the 50 MB L2 that one small
    state would stay in between replays."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(batch, 1, HEADS, DIM, generator=gen, device="cuda").bfloat16() for _ in range(3))
    q, k = F.normalize(q.float(), dim=-1).bfloat16(), F.normalize(k.float(), dim=-1).bfloat16()
    g = F.logsigmoid(torch.randn(batch, 1, HEADS, generator=gen, device="cuda"))
    beta = torch.rand(batch, 1, HEADS, generator=gen, device="cuda").bfloat16()
    state = torch.randn(batch, HEADS, DIM, DIM, generator=gen, device="cuda")
    args = {"q": q, "k": k, "v": v, "g": g, "beta": beta, "initial_state": state, "output_final_state": True}
    copies = max(1, math.ceil(256e6 / (2 * state.numel() * 4)))
    return args, [state.clone() for _ in range(copies)]


def time_decode(entry, prefix, op, args, states):
    """`{prefix}_ms` per step (CUDA graph replay over the state copies), `{prefix}_GBps` of fp32 state read and
    written, and `{prefix}_eager_ms` of one eager call (host launch included)."""
    state_bytes = 2 * states[0].numel() * 4
    with torch.no_grad():
        replay = bench_graph(lambda: [op(**{**args, "initial_state": s}) for s in states])
        entry[f"{prefix}_ms"] = replay / len(states)
        entry[f"{prefix}_GBps"] = state_bytes / entry[f"{prefix}_ms"] / 1e6
        entry[f"{prefix}_eager_ms"] = bench(lambda: op(**args))


def decode_rows(run: Run, with_fla: bool):
    for batch in DECODE_BATCHES:
        entry = {"kind": "decode", "op": "fused_recurrent_gated_delta_rule", "mode": "step", "B": batch, "T": 1}

        def measure(entry, batch=batch):
            args, states = decode_inputs(batch)
            # the target's timing: CUDA graph replay; eager calls for contrast
            time_decode(entry, "ours", ours.fused_recurrent_gated_delta_rule, args, states)
            if with_fla:
                time_decode(entry, "fla", fla_ops.fused_recurrent_gated_delta_rule, args, states)

        guarded(run, entry, measure)
    # the fused recurrent kernel's V blocks, chosen for 1, 2 or 4 programs per SM (graph replay)
    for batch, factor in itertools.product(DECODE_BATCHES, (2, 4)):
        entry = {"kind": "decode", "op": f"  V blocks for {factor} programs/SM", "mode": "step", "B": batch, "T": 1}

        def measure_blocks(entry, batch=batch, factor=factor):
            args, states = decode_inputs(batch)
            saved = linear_attn.STATE_PROGRAMS_PER_SM
            linear_attn.STATE_PROGRAMS_PER_SM = factor
            try:
                time_decode(entry, "ours", ours.fused_recurrent_gated_delta_rule, args, states)
            finally:
                linear_attn.STATE_PROGRAMS_PER_SM = saved

        guarded(run, entry, measure_blocks)


def kernel_times(prof, calls: int) -> list[tuple[str, float, int]]:
    """(kernel name, CUDA ms per call, launches per call) of a profile of `calls` calls, slowest first."""
    totals, counts = collections.defaultdict(float), collections.Counter()
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        micros = getattr(event, "self_device_time_total", None)
        if micros is None:
            micros = event.self_cuda_time_total
        totals[event.name] += micros
        counts[event.name] += 1
    rows = [(name, us / 1000 / calls, counts[name] // calls) for name, us in totals.items()]
    return sorted(rows, key=lambda row: -row[1])


def profile_rows(run: Run, with_fla: bool, calls: int = 3):
    """Per-kernel CUDA time of chunk_gated_delta_rule, ours and fla's, forward and forward + backward."""
    impls = [("ours", ours)] + ([("fla", fla_ops)] if with_fla else [])
    for batch, seq_len in PROFILE_SHAPES:
        for backward in (False, True):
            for name, module in impls:
                if run.over_budget():
                    return
                label = f"{name} chunk_gated_delta_rule {'fwd+bwd' if backward else 'fwd'} B={batch} T={seq_len}"
                try:
                    args = make_inputs("chunk_gated_delta_rule", batch, seq_len, backward)
                    fn = module.chunk_gated_delta_rule
                    with torch.no_grad():
                        do = torch.randn_like(fn(**args)[0]) if backward else None
                    run_op(fn, args, backward, do)
                    torch.cuda.synchronize()
                    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                        for _ in range(calls):
                            run_op(fn, args, backward, do)
                        torch.cuda.synchronize()
                    rows = kernel_times(prof, calls)
                except Exception as error:  # noqa: BLE001 (fla refuses its gated backward on some Triton versions)
                    print(f"{label}: {type(error).__name__}: {str(error)[:160]}")
                    continue
                total = sum(ms for _, ms, _ in rows)
                print(f"\n{label}: {total:.3f} ms of kernels per call")
                for kernel, ms, launches in rows[:14]:
                    print(f"  {ms:8.3f} ms {100 * ms / max(total, 1e-9):5.1f}%  x{launches:<3} {kernel[:90]}")
                run.profiles.append(
                    {
                        "label": label,
                        "total_ms": total,
                        "kernels": [{"name": k, "ms": ms, "launches": n} for k, ms, n in rows],
                    }
                )
                run.save()
                del args
                torch.cuda.empty_cache()


def print_row(entry):
    if "skipped" in entry or "error" in entry:
        reason = entry.get("skipped") or entry["error"]
        print(f"{entry['op']:<34} {entry['mode']:<8} B={entry['B']:<3} T={entry['T']:<7} {reason}", flush=True)
        return
    fla_cell = f"{entry['fla_ms']:9.3f}" if "fla_ms" in entry else f"{'refused' if 'fla_error' in entry else '-':>9}"
    ratio = f"{entry['ours_ms'] / entry['fla_ms']:8.2f}" if "fla_ms" in entry else " " * 8
    extra = ""
    if "ours_vs_fla_rel_rms" in entry:
        extra = f"  diff vs fla {entry['ours_vs_fla_rel_rms']:.1e}"
    if "grads_vs_fla_rel_rms" in entry:
        extra += " grads " + " ".join(f"{k} {v:.1e}" for k, v in entry["grads_vs_fla_rel_rms"].items())
    if "tflops" in entry:
        extra = f"  {entry['tflops']:.0f} TFLOP/s"
    if "ours_GBps" in entry:
        extra = f"  {entry['ours_GBps']:.0f} GB/s" + (f" (fla {entry['fla_GBps']:.0f})" if "fla_GBps" in entry else "")
        extra += f"; eager {entry['ours_eager_ms']:.3f} ms" + (
            f" (fla {entry['fla_eager_ms']:.3f})" if "fla_eager_ms" in entry else ""
        )
    print(
        f"{entry['op']:<34} {entry['mode']:<8} B={entry['B']:<3} T={entry['T']:<7} {entry['ours_ms']:9.3f}"
        f" {fla_cell} {ratio}{extra}",
        flush=True,
    )


def print_tuning():
    entries = linear_attn.tuned_configs()
    total = sum(entry["seconds"] for entry in entries if entry["kernel"].endswith("_kernel"))
    print(f"\ntuned launch configs ({len(entries)} tunings, {total:.0f} s; kernel or pass, sizes, choice; ms per")
    print("candidate or why it was ruled out):")
    for entry in entries:
        key = entry["key"]
        # the sizes lead the key; constexpr arguments and dtypes follow
        sizes = [x for x in key if not isinstance(x, tuple)]
        choice = entry["choice"]
        if isinstance(choice, dict):
            choice = linear_attn._label(choice)
        else:
            choice = f"segments of {choice} chunks" if choice else "whole sequences"
        timings = ", ".join(
            f"[{label}] {value:.3f}" if isinstance(value, float) else f"[{label}] {value}"
            for label, value in entry["timings"].items()
        )
        flags = {}
        for part in key:
            if isinstance(part, tuple) and part and isinstance(part[0], tuple):
                flags = {
                    k: v
                    for k, v in part
                    if k in ("GATE", "DELTA", "INIT", "FINAL", "STORE_STATES", "STORE_AI", "REVERSE")
                }
        print(f"  {entry['kernel']:<28} sizes {sizes} {flags} ({entry['seconds']:.1f} s)\n    -> {choice}: {timings}")


def print_targets(results):
    by_key = {(r["op"], r["mode"], r["T"]): r for r in results if "ours_ms" in r}
    print("\ntargets:")
    for (op, mode, seq_len), target in TARGETS.items():
        for length in [seq_len] if seq_len else SEQ_LENS:
            row = by_key.get((op, mode, length))
            if row is None or "fla_ms" not in row:
                continue
            ratio = row["ours_ms"] / row["fla_ms"]
            print(
                f"  {op} {mode} T={length}: ours/fla {ratio:.2f} (target <= {target}) "
                f"{'met' if ratio <= target else 'NOT met'}"
            )
    op, mode, seq_len, target = SDPA_TARGET
    row, sdpa = by_key.get((op, mode, seq_len)), by_key.get(("sdpa_flash", mode, seq_len))
    if row and sdpa:
        ratio = row["ours_ms"] / sdpa["ours_ms"]
        print(
            f"  {op} {mode} T={seq_len}: ours/SDPA flash {ratio:.3f} (target <= {target}) "
            f"{'met' if ratio <= target else 'NOT met'}"
        )
    ok = [r for r in results if "fla_ms" in r and r["kind"] == "prefill"]
    if ok:
        mean = math.exp(sum(math.log(r["ours_ms"] / r["fla_ms"]) for r in ok) / len(ok))
        print(f"  geometric mean ours/fla over {len(ok)} prefill rows: {mean:.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", help="folder for kernel_bench.json")
    parser.add_argument("--seq-lens", default=",".join(map(str, SEQ_LENS)), help="comma-separated prefill lengths")
    parser.add_argument("--ops", default=",".join(OPS), help="comma-separated chunked ops, in order")
    parser.add_argument("--budget-s", type=float, default=420.0, help="no new row starts after this many seconds")
    parser.add_argument("--profile", action="store_true", help="per-kernel times of the GDN op, after its rows")
    parser.add_argument("--no-sdpa", action="store_true", help="skip the SDPA rows")
    parser.add_argument("--no-decode", action="store_true", help="skip the decode rows")
    parser.add_argument("--no-fla", action="store_true", help="skip fla (its first call at a shape autotunes)")
    parser.add_argument("--no-tune", action="store_true", help="our untuned launch configs (the first candidates)")
    args = parser.parse_args()
    with_fla = fla_ops is not None and not args.no_fla
    linear_attn.TUNE = not args.no_tune
    props = torch.cuda.get_device_properties(0)
    environment = {
        "device": props.name,
        "sms": props.multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "fla": None if fla is None else fla.__version__,
        "heads": HEADS,
        "dim": DIM,
        "tokens": TOKENS,
        "tune": linear_attn.TUNE,
    }
    print(json.dumps(environment))
    warm_up_gpu()
    print(f"{'op':<34} {'mode':<8} {'shape':<15} {'ours ms':>9} {'fla ms':>9} {'ours/fla':>8}")
    run = Run(args.output_dir, args.budget_s, environment)
    seq_lens = [int(x) for x in args.seq_lens.split(",")]
    ops = [op for op in args.ops.split(",") if op]  # --ops "": decode (and SDPA) rows only
    if not args.no_decode:
        decode_rows(run, with_fla)
    if not args.no_sdpa:
        sdpa_rows(run, seq_lens)
    # GDN first, then its profile, then the other ops' forward rows (their targets) before their backward rows
    gdn = "chunk_gated_delta_rule"
    if gdn in ops:
        prefill_rows(run, gdn, seq_lens, with_fla)
    if args.profile:
        profile_rows(run, with_fla)
    others = [op for op in ops if op != gdn]
    for backward in (False, True):
        for op in others:
            prefill_rows(run, op, seq_lens, with_fla, modes=(backward,))
    print_tuning()
    print_targets(run.results)
    run.save()
    print(f"\n{time.time() - run.start:.0f} s; results in {run.out / 'kernel_bench.json'}")


if __name__ == "__main__":
    main()
