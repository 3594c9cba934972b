"""Checks and times the decoder layer's fused inference kernels (RMSNorm with the residual add, SwiGLU, rotary) on a
GPU, and what they do to a whole model's eager decode step.

    python scripts/decoder_fusion_gpu.py OUTPUT_DIR

1. Ops, bf16, the 1.5b bench shape (hidden 2048, MLP 6144, 16 heads of 128): each kernel against the torch code it
   replaces, at prefill size (131,072 tokens) and at decode size (1 token). Correctness: the largest difference
   (the rotary kernel must give the same bits). Timing: `triton.testing.do_bench` medians; GB/s: the kernel's bytes
   read and written over its time.
2. Eager decode: one token forward after a 1,024-token prefill, on the random 1.5b hybrid and the all-full EffAttn
   model, with the decoder kernels on and off (the torch code). This is the host-bound path of plain `generate`:
   each step's wall time (synchronised), median of 30 steps.

Prints markdown tables and writes OUTPUT_DIR/decoder_fusion_gpu.json. Exits 1 when a check fails.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
from triton.testing import do_bench

from hf_effattn import mixer_common
from hf_effattn.evaluation import efficiency
from hf_effattn.kernels.decoder_fusion import rms_norm, rms_norm_reference, rotary, silu_mul, silu_mul_reference

HIDDEN, INTERMEDIATE, HEADS, HEAD_DIM = 2048, 6144, 16, 128
TOKENS = (131072, 1)
# bf16: summation order and the SiLU's exp may flip one rounding (relative 2^-8 of the value)
TOL = 1.6e-2


def _ops(tokens: int, device):
    x = torch.randn(1, tokens, HIDDEN, device=device, dtype=torch.bfloat16)
    residual = torch.randn_like(x)
    weight = torch.randn(HIDDEN, device=device, dtype=torch.bfloat16)
    gate = torch.randn(1, tokens, INTERMEDIATE, device=device, dtype=torch.bfloat16)
    up = torch.randn_like(gate)
    q = torch.randn(1, tokens, HEADS * HEAD_DIM + 2 * 8 * HEAD_DIM, device=device, dtype=torch.bfloat16)
    q = q[..., : HEADS * HEAD_DIM].view(1, tokens, HEADS, HEAD_DIM)
    angles = torch.rand(1, tokens, HEAD_DIM // 2, device=device).repeat(1, 1, 2) * tokens
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
    element = 2
    return [
        # name, fused, torch, bytes moved by the fused kernel, exact
        (
            "rms_norm",
            lambda: rms_norm(x, weight),
            lambda: rms_norm_reference(x, weight),
            2 * x.numel() * element,
            False,
        ),
        (
            "rms_norm + residual",
            lambda: rms_norm(x, weight, residual=residual)[0],
            lambda: rms_norm_reference(x, weight, residual=residual)[0],
            4 * x.numel() * element,
            False,
        ),
        (
            "silu_mul",
            lambda: silu_mul(gate, up),
            lambda: silu_mul_reference(gate, up),
            3 * gate.numel() * element,
            False,
        ),
        (
            "rotary (q)",
            lambda: rotary(q, cos, sin),
            lambda: apply_rotary_pos_emb(q, q, cos, sin, unsqueeze_dim=2)[0],
            2 * q.numel() * element + 2 * cos.numel() * element,
            True,
        ),
    ]


def check_ops(device) -> tuple[list[dict], bool]:
    rows, ok = [], True
    for tokens in TOKENS:
        for name, fused, reference, nbytes, exact in _ops(tokens, device):
            out, ref = fused(), reference()
            diff = (out.float() - ref.float()).abs()
            bound = 0.0 if exact else TOL * ref.float().abs().max().item()
            passed = diff.max().item() <= bound
            ok &= passed
            fused_ms, torch_ms = do_bench(fused), do_bench(reference)
            rows.append(
                {
                    "op": name,
                    "tokens": tokens,
                    "max_diff": diff.max().item(),
                    "mismatches": int((diff > 0).sum().item()),
                    "passed": passed,
                    "fused_ms": fused_ms,
                    "torch_ms": torch_ms,
                    "fused_GBps": nbytes / fused_ms / 1e6,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows, ok


def _step_times(model, cache, token, steps: int = 30) -> list[float]:
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        model(token, past_key_values=cache, use_cache=True)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def eager_decode(device, profile: bool) -> list[dict]:
    rows = []
    _, hybrid = efficiency.build_pair("1.5b", device=device)
    models = {"hybrid": hybrid, "full (hf_effattn)": efficiency.build_plugin_full("1.5b", device=device)}
    ids = torch.randint(0, 1000, (1, 1024), device=device)
    for name, model in models.items():
        with torch.no_grad():
            cache = DynamicCache(config=model.config)
            model(ids, past_key_values=cache, use_cache=True)
            token = ids[:, -1:]
            # each setting twice, interleaved, so that a drift of the host shows
            for setting in (None, "reference", None, "reference"):
                mixer_common.DECODER_OPS_OVERRIDE = setting
                times = _step_times(model, cache, token)
                rows.append(
                    {
                        "model": name,
                        "decoder_kernels": "off (torch)" if setting else "on",
                        "ms_per_step": statistics.median(times[5:]),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
            if profile:
                for setting in (None, "reference"):
                    mixer_common.DECODER_OPS_OVERRIDE = setting
                    _step_times(model, cache, token, 3)
                    with torch.profiler.profile(
                        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
                    ) as prof:
                        _step_times(model, cache, token, 3)
                    print(f"### {name}, decoder kernels {setting or 'on'}: 3 steps")
                    print(
                        prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60)
                    )
        mixer_common.DECODER_OPS_OVERRIDE = None
        model.cpu()
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--profile", action="store_true", help="also print a host profile of the decode steps")
    parser.add_argument("--decode-only", action="store_true", help="skip the op checks")
    args = parser.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    op_rows, ok = ([], True) if args.decode_only else check_ops(device)
    decode_rows = eager_decode(device, args.profile)
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "ops": op_rows,
        "eager_decode": decode_rows,
        "passed": ok,
    }
    (args.output / "decoder_fusion_gpu.json").write_text(json.dumps(result, indent=1))
    print("| op | tokens | fused (ms) | torch (ms) | speed-up | fused GB/s | max diff | check |")
    print("|---|---|---|---|---|---|---|---|")
    for r in op_rows:
        print(
            f"| {r['op']} | {r['tokens']:,} | {r['fused_ms']:.4f} | {r['torch_ms']:.4f} | "
            f"{r['torch_ms'] / r['fused_ms']:.2f}x | {r['fused_GBps']:.0f} | {r['max_diff']:.3g} | "
            f"{'ok' if r['passed'] else 'FAILED'} |"
        )
    print("\n| model | decoder kernels | eager decode step (ms) |\n|---|---|---|")
    for r in decode_rows:
        print(f"| {r['model']} | {r['decoder_kernels']} | {r['ms_per_step']:.2f} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
