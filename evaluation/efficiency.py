"""Prefill latency, decode speed and cache memory against context length: a hybrid beside its all-full model.

    python -m hf_effattn.evaluation.efficiency --shape 1.5b --contexts 8192,32768,131072 --batches 1,4 OUT_DIR

Both models get random weights of one Llama shape: the all-full model is transformers' `LlamaForCausalLM`, the
hybrid the same backbone with `full_share` of its layers kept as full attention (evenly spaced) and the others
replaced by `mixer`. For each context length and batch size:

- prefill: one forward over the context (in chunks of `prefill_chunk` tokens through the cache when set), keeping
  only the last position's logits;
- eager decode: one forward per new token on the dynamic cache, as `generate` runs it by default;
- compiled decode: the prefilled cache copied into transformers' `StaticCache` and a `torch.compile`d forward
  (CUDA graphs on GPU, `mode="reduce-overhead"`), the path that removes per-token Python overhead;
- cache bytes (every tensor the cache holds after prefill) and peak memory (CUDA only).

A run that does not fit in memory is recorded as `"oom"` and the sweep goes on. Results: `efficiency.json`, a
markdown table and PNG plots in the output folder.
"""

import argparse
import gc
import json
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

from hf_effattn import EffAttnForCausalLM

from .report import write_json_atomic

SHAPES = {
    # the 1.54B Llama shape of the project's H100 anchors
    "1.5b": {"hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28, "num_attention_heads": 16,
                 "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 32000},
    # small enough for a CPU
    "tiny": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 8, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 4096},
}


def build_pair(shape: str, full_share: float = 0.25, mixer: str = "gdn", max_positions: int = 1 << 21,
               dtype=torch.bfloat16, device="cpu", seed: int = 0):
    """(all-full LlamaForCausalLM, hybrid EffAttnForCausalLM) with random weights of the named shape."""
    from hf_effattn.conversion.weight_map import config_from_teacher, select_full_layers

    if shape not in SHAPES:
        raise ValueError(f"shape = {shape!r}: expected one of {', '.join(SHAPES)}.")
    llama_config = LlamaConfig(**SHAPES[shape], max_position_embeddings=max_positions, tie_word_embeddings=False)
    llama_config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    full_model = LlamaForCausalLM(llama_config).to(device=device, dtype=dtype).eval()
    layers = llama_config.num_hidden_layers
    kept = set(select_full_layers(layers, full_share))
    mixer_types = ["full" if i in kept else mixer for i in range(layers)]
    hybrid_config = config_from_teacher(llama_config, mixer_types=mixer_types)
    hybrid_config._attn_implementation = "sdpa"
    hybrid = EffAttnForCausalLM(hybrid_config).to(device=device, dtype=dtype).eval()
    return full_model, hybrid


def cache_bytes(cache) -> int:
    """Bytes of every tensor a cache holds (keys, values, convolution and recurrent states, sink buffers)."""
    seen, total = set(), 0

    def add(tensor):
        nonlocal total
        if isinstance(tensor, torch.Tensor) and tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()

    for layer in cache.layers:
        for value in vars(layer).values():
            if isinstance(value, dict):
                for item in value.values():
                    add(item)
            elif isinstance(value, (tuple, list)):
                for item in value:
                    add(item)
            else:
                add(value)
    return total


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def prefill(model, input_ids, chunk: int | None):
    """(last logits, cache): the context in one forward, or in chunks of `chunk` tokens through the cache."""
    cache, logits = None, None
    step = chunk or input_ids.shape[1]
    for start in range(0, input_ids.shape[1], step):
        out = model(input_ids[:, start : start + step], past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache, logits = out.past_key_values, out.logits
    return logits, cache


def to_static(model, cache, max_cache_len: int, consume: bool = False) -> StaticCache:
    """A `StaticCache` holding what the dynamic `cache` holds (prefilling a static cache directly would build a
    context x max_cache_len mask). `consume` frees each dynamic layer once copied, so that the two caches never
    coexist whole: at 1M tokens the keys and values of one cache are tens of GiB."""
    static = StaticCache(config=model.config, max_cache_len=max_cache_len)
    for index, (source, target) in enumerate(zip(cache.layers, static.layers)):
        if getattr(source, "keys", None) is not None and hasattr(target, "keys"):
            target.update(source.keys, source.values)
            if consume:
                source.keys = source.values = None
        conv_states = getattr(source, "conv_states", {}) or {}
        if conv_states.get(0) is not None:
            static.update_conv_state(conv_states[0], index)
        recurrent_states = getattr(source, "recurrent_states", {}) or {}
        if recurrent_states.get(0) is not None:
            static.update_recurrent_state(recurrent_states[0], index)
    return static


@torch.no_grad()
def decode_eager(model, cache, token, steps: int, device) -> float:
    """Seconds per decode step, one eager forward per token on the dynamic cache."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    _sync(device)
    return (time.perf_counter() - start) / steps


@torch.no_grad()
def decode_compiled(model, cache, token, context: int, steps: int, device, warmup: int = 3) -> float:
    """Seconds per decode step of a compiled forward on a static copy of `cache`, which holds `context` tokens."""
    static = to_static(model, cache, context + warmup + steps + 1, consume=True)
    mode = "reduce-overhead" if torch.device(device).type == "cuda" else None
    forward = torch.compile(model.forward, mode=mode, dynamic=False)
    batch = token.shape[0]

    def step(token, position):
        positions = torch.full((batch, 1), position, device=token.device, dtype=torch.long)
        logits = forward(input_ids=token, position_ids=positions, past_key_values=static, use_cache=True).logits
        return logits[:, -1:].argmax(-1).clone()

    position = context
    for _ in range(warmup):
        token, position = step(token, position), position + 1
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        token, position = step(token, position), position + 1
    _sync(device)
    return (time.perf_counter() - start) / steps


def measure(model, context: int, batch: int, *, decode_steps: int = 16, compiled: bool = True,
            prefill_chunk: int | None = None, device="cpu") -> dict:
    """One row: prefill seconds, eager and compiled decode tokens/s (per sequence x batch), cache and peak bytes."""
    row = {"context": context, "batch": batch}
    cuda = torch.device(device).type == "cuda"
    try:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        input_ids = torch.randint(0, model.config.vocab_size, (batch, context), device=device)
        _sync(device)
        start = time.perf_counter()
        logits, cache = prefill(model, input_ids, prefill_chunk)
        _sync(device)
        row["prefill_s"] = time.perf_counter() - start
        row["cache_bytes"] = cache_bytes(cache)
        if cuda:
            row["peak_bytes"] = torch.cuda.max_memory_allocated()
        token = logits[:, -1:].argmax(-1)
        # eager first: the compiled run consumes the dynamic cache as it copies it into a static one
        seconds = decode_eager(model, cache, token, decode_steps, device)
        row["eager_ms_per_step"] = 1e3 * seconds
        row["eager_tokens_per_s"] = batch / seconds
        if compiled:
            try:
                # the eager steps above left context + decode_steps tokens in the cache
                seconds = decode_compiled(model, cache, token, context + decode_steps, decode_steps, device)
                row["compiled_ms_per_step"] = 1e3 * seconds
                row["compiled_tokens_per_s"] = batch / seconds
            except torch.OutOfMemoryError:
                row["compiled_ms_per_step"] = "oom"
            except Exception as error:  # noqa: BLE001 (any compile failure is reported in the table; the sweep goes on)
                row["compiled_ms_per_step"] = f"failed: {type(error).__name__}: {str(error)[:200]}"
        del cache, logits
    except torch.OutOfMemoryError:
        row["prefill_s"] = "oom"
    finally:
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return row


def sweep(models: dict, contexts, batches, **options) -> list[dict]:
    rows = []
    for name, model in models.items():
        # compile the kernels (Triton JIT, autotuning) before anything is timed
        device = options.get("device", "cpu")
        prefill(model, torch.randint(0, model.config.vocab_size, (1, 256), device=device), None)
        for context in contexts:
            for batch in batches:
                row = {"model": name, **measure(model, context, batch, **options)}
                print(json.dumps(row), flush=True)
                rows.append(row)
                if row.get("prefill_s") == "oom":
                    break  # larger batches at this context will not fit either
    return rows


def _fmt(value, scale=1.0, digits=2):
    if isinstance(value, (int, float)):
        return f"{value * scale:.{digits}f}"
    return "" if value is None else str(value)[:40]


def render_table(rows: list[dict]) -> str:
    lines = [("| model | context | batch | prefill (s) | eager decode (ms/step) | compiled decode (ms/step) | "
             "compiled tokens/s | cache (GiB) | peak (GiB) |"), "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['context']:,} | {row['batch']} | {_fmt(row.get('prefill_s'), digits=3)} | "
            f"{_fmt(row.get('eager_ms_per_step'), digits=1)} | {_fmt(row.get('compiled_ms_per_step'), digits=1)} | "
            f"{_fmt(row.get('compiled_tokens_per_s'), digits=1)} | {_fmt(row.get('cache_bytes'), 2**-30)} | "
            f"{_fmt(row.get('peak_bytes'), 2**-30)} |"
        )
    return "\n".join(lines)


def ratios(rows: list[dict], hybrid: str = "hybrid", full: str = "full") -> list[dict]:
    """Per (context, batch) measured by both: full / hybrid for times (speed-ups), hybrid / full for cache bytes."""
    by_key = {(r["model"], r["context"], r["batch"]): r for r in rows}
    out = []
    for (name, context, batch), row in by_key.items():
        other = by_key.get((full, context, batch))
        if name != hybrid or other is None:
            continue
        entry = {"context": context, "batch": batch}
        for key in ("prefill_s", "eager_ms_per_step", "compiled_ms_per_step"):
            a, b = other.get(key), row.get(key)
            entry[f"{key}_speedup"] = b and a / b if isinstance(a, float) and isinstance(b, float) else None
        a, b = row.get("cache_bytes"), other.get("cache_bytes")
        entry["cache_ratio"] = a / b if isinstance(a, int) and isinstance(b, int) and b else None
        out.append(entry)
    return out


def plot(rows: list[dict], folder: Path) -> list[Path]:
    """Prefill time, decode tokens/s and cache size against context, one line per model and batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, label, scale in (("prefill_s", "prefill (s)", 1.0), ("compiled_tokens_per_s", "compiled decode tokens/s", 1.0),
                              ("eager_tokens_per_s", "eager decode tokens/s", 1.0), ("cache_bytes", "cache (GiB)", 2**-30)):
        figure, axis = plt.subplots(figsize=(6, 4))
        series = {}
        for row in rows:
            if isinstance(row.get(key), (int, float)):
                series.setdefault(f"{row['model']} B={row['batch']}", []).append((row["context"], row[key] * scale))
        if not series:
            plt.close(figure)
            continue
        for name, points in sorted(series.items()):
            xs, ys = zip(*sorted(points))
            axis.plot(xs, ys, marker="o", label=name)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("context (tokens)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
        figure.tight_layout()
        path = folder / f"{key}.png"
        figure.savefig(path, dpi=120)
        plt.close(figure)
        paths.append(path)
    return paths


def run(output: Path, models: dict, contexts, batches, *, environment: dict | None = None, decode_steps=16,
        compiled=True, prefill_chunk=None, device="cpu", compare: tuple[str, str] | None = None) -> dict:
    """Measures every model at every (context, batch); writes efficiency.json, efficiency.md and the plots.

    `compare` = (efficient model, baseline) names for the ratios; by default the first two models given.
    """
    import transformers

    environment = {
        "device": torch.cuda.get_device_name() if torch.device(device).type == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "decode_steps": decode_steps,
        "prefill_chunk": prefill_chunk,
        "parameters": {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()},
        **(environment or {}),
    }
    rows = sweep(models, contexts, batches, decode_steps=decode_steps, compiled=compiled,
                 prefill_chunk=prefill_chunk, device=device)
    output.mkdir(parents=True, exist_ok=True)
    compare = compare or tuple(models)[:2]
    result = {"environment": environment, "rows": rows,
              "ratios": ratios(rows, *compare) if len(compare) == 2 else [], "compare": list(compare)}
    write_json_atomic(output / "efficiency.json", result)
    table = render_table(rows)
    (output / "efficiency.md").write_text(table + "\n")
    plot(rows, output)
    return result


def run_random_pair(output: Path, shape: str, contexts, batches, *, full_share=0.25, mixer="gdn", device=None,
                    dtype="bfloat16", only: str | None = None, **options) -> dict:
    """`run` on a random all-full model and its hybrid of the named shape (`only` = "full" or "hybrid": just one)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[dtype]
    full_model, hybrid = build_pair(shape, full_share, mixer, dtype=torch_dtype, device=device)
    from hf_effattn.mixer_linear import triton_linear_ops

    uses_triton = torch.device(device).type == "cuda" and triton_linear_ops() is not None
    environment = {"dtype": dtype, "shape": shape, "full_share": full_share, "mixer": mixer,
                   "layout": hybrid.config.mixer_types,
                   "linear_ops": "triton" if uses_triton else "torch reference"}
    models = {"full": full_model, "hybrid": hybrid}
    if only is not None:
        models = {only: models[only]}
    return run(output, models, contexts, batches, environment=environment, device=device,
               compare=("hybrid", "full"), **options)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path, help="folder for efficiency.json, efficiency.md and the plots")
    parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--contexts", default="512,1024,2048")
    parser.add_argument("--batches", default="1")
    parser.add_argument("--full-share", type=float, default=0.25)
    parser.add_argument("--mixer", default="gdn")
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--prefill-chunk", type=int, default=None, help="prefill in chunks of this many tokens")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled static-cache decode")
    parser.add_argument("--only", choices=["full", "hybrid"], default=None, help="measure one of the two models")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    args = parser.parse_args(argv)
    result = run_random_pair(
        args.output, args.shape, [int(x) for x in args.contexts.split(",")], [int(x) for x in args.batches.split(",")],
        full_share=args.full_share, mixer=args.mixer, decode_steps=args.decode_steps, compiled=not args.no_compile,
        prefill_chunk=args.prefill_chunk, device=args.device, dtype=args.dtype, only=args.only,
    )
    print(render_table(result["rows"]))
    print(json.dumps(result["ratios"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
