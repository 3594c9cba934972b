"""Timings of the Triton linear-attention kernels on a GPU, against fla (when importable) and SDPA in the same run.

    python scripts/bench_kernels.py OUTPUT_DIR [--seq-lens 2048,131072] [--ops chunk_gla] [--sweep] [--profile]

Prefill: bf16, H = 16 heads, D = 128, B * T = 65,536 tokens at T = 2k, 8k, 32k (B = 32, 8, 2) and B = 1 at T = 128k,
forward and forward + backward, for chunk_gated_delta_rule, chunk_gla and chunk_kda, fla's same ops, and causal SDPA
(flash and cuDNN backends). Decode: one step of fused_recurrent_gated_delta_rule at B = 1, 16, 64 with its fp32 state traffic.
Times are medians of `triton.testing.do_bench`; each (op, shape) row also reports the relative RMS difference
between our output and fla's. Prints a table and writes kernel_bench.json to OUTPUT_DIR. Not a test.
"""

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from hf_effattn import kernels as ours
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
BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION)


def _batch(seq_len: int) -> int:
    return max(1, TOKENS // seq_len)


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


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


def time_op(fn, args, backward: bool):
    """(median ms, output) of fn(**args) (forward) or of forward + backward of its output."""
    if not backward:
        with torch.no_grad():
            out = fn(**args)[0]
            return bench(lambda: fn(**args)), out
    out = fn(**args)[0]
    do = torch.randn_like(out)

    def step():
        fn(**args)[0].backward(do)

    return bench(step), out


def prefill_rows(seq_lens, ops, backends, results):
    for seq_len in seq_lens:
        batch = _batch(seq_len)
        for op in ops:
            for backward in (False, True):
                mode = "fwd+bwd" if backward else "fwd"
                args = make_inputs(op, batch, seq_len, backward)
                ms, out = time_op(getattr(ours, op), args, backward)
                entry = {"kind": "prefill", "op": op, "mode": mode, "B": batch, "T": seq_len, "ours_ms": ms}
                if fla_ops is not None:
                    try:
                        fla_ms, fla_out = time_op(getattr(fla_ops, op), args, backward)
                        entry["fla_ms"] = fla_ms
                        entry["ours_vs_fla_rel_rms"] = rel_rms(out, fla_out)
                    except Exception as error:  # noqa: BLE001 (fla refuses some configurations)
                        entry["fla_error"] = f"{type(error).__name__}: {str(error)[:120]}"
                results.append(entry)
                print_row(entry)
                del args, out
                torch.cuda.empty_cache()
        for backend in backends:
            for backward in (False, True):
                shape = (batch, HEADS, seq_len, DIM)
                q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
                           for _ in range(3))

                def attention(q=q, k=k, v=v, backend=backend):
                    with sdpa_kernel(backend):
                        return (F.scaled_dot_product_attention(q, k, v, is_causal=True),)

                ms, _ = time_op(attention, {}, backward)
                flops = 2 * batch * HEADS * seq_len * seq_len * DIM * (3.5 if backward else 1.0)
                entry = {"kind": "prefill", "op": f"sdpa_{backend.name.lower()}", "mode": "fwd+bwd" if backward else "fwd",
                         "B": batch, "T": seq_len, "ours_ms": ms, "tflops": flops / ms / 1e9}
                results.append(entry)
                print_row(entry)
                del q, k, v
                torch.cuda.empty_cache()


def state_pass_sweep(results):
    """chunk_gated_delta_rule forward at B=1, T=128k and B=8, T=8k over the state passes' V block and warps."""
    module = ours.linear_attn
    default_block, default_options = module._state_block_v, dict(module.STATE_PASS_OPTIONS)
    for seq_len in (131072, 8192):
        args = make_inputs("chunk_gated_delta_rule", _batch(seq_len), seq_len, False)
        for block in (16, 32, 64):
            for num_warps in (2, 4, 8):
                module._state_block_v = lambda value_dim, programs, device, block=block: block
                module.STATE_PASS_OPTIONS.update(num_warps=num_warps)
                ms, _ = time_op(ours.chunk_gated_delta_rule, args, False)
                entry = {"kind": "sweep", "op": f"gdn fwd state BV={block} warps={num_warps}", "mode": "fwd",
                         "B": _batch(seq_len), "T": seq_len, "ours_ms": ms}
                results.append(entry)
                print_row(entry)
        module._state_block_v = default_block
        module.STATE_PASS_OPTIONS.update(default_options)


def profile_kernels():
    """Per-kernel CUDA time of chunk_gated_delta_rule forward + backward at B=1, T=128k and B=8, T=8k."""
    for seq_len in (131072, 8192):
        args = make_inputs("chunk_gated_delta_rule", _batch(seq_len), seq_len, True)
        out = ours.chunk_gated_delta_rule(**args)[0]
        do = torch.randn_like(out)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            ours.chunk_gated_delta_rule(**args)[0].backward(do)
            torch.cuda.synchronize()
        print(f"chunk_gated_delta_rule fwd+bwd, B={_batch(seq_len)}, T={seq_len}, one call:")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=40))


def decode_rows(results):
    for batch in DECODE_BATCHES:
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(batch, 1, HEADS, DIM, generator=gen, device="cuda").bfloat16() for _ in range(3))
        q, k = F.normalize(q.float(), dim=-1).bfloat16(), F.normalize(k.float(), dim=-1).bfloat16()
        g = F.logsigmoid(torch.randn(batch, 1, HEADS, generator=gen, device="cuda"))
        beta = torch.rand(batch, 1, HEADS, generator=gen, device="cuda").bfloat16()
        state = torch.randn(batch, HEADS, DIM, DIM, generator=gen, device="cuda")
        args = {"q": q, "k": k, "v": v, "g": g, "beta": beta, "initial_state": state, "output_final_state": True}
        state_bytes = 2 * state.numel() * 4
        entry = {"kind": "decode", "op": "fused_recurrent_gated_delta_rule", "mode": "step", "B": batch, "T": 1}
        with torch.no_grad():
            entry["ours_ms"] = bench(lambda args=args: ours.fused_recurrent_gated_delta_rule(**args))
            entry["ours_GBps"] = state_bytes / entry["ours_ms"] / 1e6
            if fla_ops is not None:
                entry["fla_ms"] = bench(lambda args=args: fla_ops.fused_recurrent_gated_delta_rule(**args))
                entry["fla_GBps"] = state_bytes / entry["fla_ms"] / 1e6
        results.append(entry)
        print_row(entry)


def print_row(entry):
    fla_cell = f"{entry['fla_ms']:9.3f}" if "fla_ms" in entry else f"{'refused' if 'fla_error' in entry else '-':>9}"
    ratio = f"{entry['fla_ms'] / entry['ours_ms']:6.2f}x" if "fla_ms" in entry else " " * 7
    extra = ""
    if "ours_vs_fla_rel_rms" in entry:
        extra = f"  diff vs fla {entry['ours_vs_fla_rel_rms']:.1e}"
    if "tflops" in entry:
        extra = f"  {entry['tflops']:.0f} TFLOP/s"
    if "ours_GBps" in entry:
        extra = f"  {entry['ours_GBps']:.0f} GB/s" + (f" (fla {entry['fla_GBps']:.0f})" if "fla_GBps" in entry else "")
    print(f"{entry['op']:<34} {entry['mode']:<8} B={entry['B']:<3} T={entry['T']:<7} {entry['ours_ms']:9.3f}"
          f" {fla_cell} {ratio}{extra}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", help="folder for kernel_bench.json")
    parser.add_argument("--seq-lens", default=",".join(map(str, SEQ_LENS)), help="comma-separated prefill lengths")
    parser.add_argument("--ops", default=",".join(OPS), help="comma-separated chunked ops")
    parser.add_argument("--no-sdpa", action="store_true", help="skip the SDPA rows")
    parser.add_argument("--no-decode", action="store_true", help="skip the decode rows")
    parser.add_argument("--no-fla", action="store_true", help="skip fla (its first call at a shape autotunes)")
    parser.add_argument("--sweep", action="store_true", help="also sweep the state passes' V block and warps")
    parser.add_argument("--profile", action="store_true", help="also print per-kernel times of the GDN op")
    args = parser.parse_args()
    global fla_ops
    if args.no_fla:
        fla_ops = None
    props = torch.cuda.get_device_properties(0)
    environment = {"device": props.name, "torch": torch.__version__, "triton": triton.__version__,
                   "fla": None if fla is None else fla.__version__, "heads": HEADS, "dim": DIM, "tokens": TOKENS}
    print(json.dumps(environment))
    print(f"{'op':<34} {'mode':<8} {'shape':<15} {'ours ms':>9} {'fla ms':>9} {'fla/ours':>7}")
    results = []
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    def save():
        (out / "kernel_bench.json").write_text(json.dumps({"environment": environment, "results": results}, indent=1))

    if not args.no_decode:
        decode_rows(results)
        save()
    seq_lens = [int(x) for x in args.seq_lens.split(",")]
    prefill_rows(seq_lens, args.ops.split(","), () if args.no_sdpa else BACKENDS, results)
    save()
    if args.profile:
        profile_kernels()
    if args.sweep:
        state_pass_sweep(results)
        save()
    ok = [r for r in results if "fla_ms" in r and r["kind"] == "prefill"]
    if ok:
        print(f"geometric mean fla/ours over {len(ok)} prefill rows: "
              f"{math.exp(sum(math.log(r['fla_ms'] / r['ours_ms']) for r in ok) / len(ok)):.2f}x")


if __name__ == "__main__":
    main()
