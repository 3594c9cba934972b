"""Prefill latency, decode speed and cache memory against context length: a hybrid beside its all-full model.

    hf-effattn bench --shape 1.5b --contexts 8192,32768,131072,1048576 --prefill-chunk 131072 \\
        --largest-batch 32768,131072 --breakdown 131072 --output OUT_DIR

Both models get random weights of one Llama shape: the all-full model is transformers' `LlamaForCausalLM`, the
hybrid the same backbone with `full_share` of its layers kept as full attention (evenly spaced) and the others
replaced by `mixer`. `--plugin-full` adds an all-full EffAttnForCausalLM of the shape (rows `full (hf_effattn)`):
the hybrid against it is what the layout gains, it against the Llama what hf_effattn's full layers (their decode
kernel) gain. For each context length and batch size:

- prefill: one forward over the context (in chunks of `prefill_chunk` tokens through the cache when longer),
  keeping only the last position's logits; up to 128k tokens the second of two runs is timed (the first, which also
  builds kernel plans and tunes launch configs, is kept as `prefill_first_s`), and longer chunked prefills are
  warmed up with their first chunk;
- eager decode: plain `generate` (greedy) continuing from the prefilled dynamic cache;
- compiled decode: the prefilled cache copied into transformers' `StaticCache` and a `torch.compile`d forward
  (CUDA graphs on GPU, `mode="reduce-overhead"`), the path that removes per-token Python overhead;
- cache bytes (every tensor the cache holds after prefill) and peak memory (CUDA only).

`largest_batch` contexts: the baseline's largest batch is searched (B = 1, 2, 4 ... while its static cache, plus room
for a decode step, can be allocated), then every model decodes at that batch (compiled) from one prefilled
sequence tiled over the batch. A run that does not fit in memory is recorded as `"oom"` and the sweep goes on; a
cache that cannot even be allocated is recorded as `"oom"` before any prefill. `breakdown`: the efficient model's
prefill at that context and one compiled decode step under `torch.profiler`, GPU time by kernel.

Results: `efficiency.json`, `efficiency.md` (tables and the targets), `breakdown.md`, PNG plots.
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
    "1.5b": {
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 32000,
    },
    # small enough for a CPU
    "tiny": {
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 8,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "vocab_size": 4096,
    },
}
# the rows of `build_plugin_full`'s model (`--plugin-full`)
PLUGIN_FULL = "full (hf_effattn)"
# the targets for the efficient model against the baseline
PREFILL_TARGET, DECODE_TARGET, LARGEST_BATCH_TARGET, CACHE_TARGET = 2.5, 2.5, 3.0, 0.3
# compiled decode: the steps run before timing (compilation, CUDA-graph recording)
WARMUP_STEPS = 3
# the largest-batch search stops here
MAX_BATCH = 256
# prefills up to this many tokens (per chunk, for chunked prefills) are timed the second time: the first builds
# kernel plans and tunes the Triton kernels' launch configs for the shape (on an H100 the hybrid's first 128k
# prefill took 9.2 s, the next 2.7 s); a longer chunked prefill is warmed up with its first chunk
WARM_PREFILL_TOKENS = 131072


def _llama_config(shape: str, max_positions: int) -> LlamaConfig:
    if shape not in SHAPES:
        raise ValueError(f"shape = {shape!r}: expected one of {', '.join(SHAPES)}.")
    llama_config = LlamaConfig(**SHAPES[shape], max_position_embeddings=max_positions, tie_word_embeddings=False)
    llama_config._attn_implementation = "sdpa"
    return llama_config


def _effattn_model(llama_config: LlamaConfig, mixer_types: list[str], dtype, device) -> EffAttnForCausalLM:
    from hf_effattn.conversion.weight_map import config_from_teacher

    config = config_from_teacher(llama_config, mixer_types=mixer_types)
    config._attn_implementation = "sdpa"
    # built on the device: initialising 1.5B parameters on the CPU takes longer than the measurements
    with torch.device(device):
        return EffAttnForCausalLM(config).to(dtype=dtype).eval()


def build_pair(
    shape: str,
    full_share: float = 0.25,
    mixer: str = "gdn",
    max_positions: int = 1 << 21,
    dtype=torch.bfloat16,
    device="cpu",
    seed: int = 0,
):
    """(all-full LlamaForCausalLM, hybrid EffAttnForCausalLM) with random weights of the named shape."""
    from hf_effattn.conversion.weight_map import select_full_layers

    llama_config = _llama_config(shape, max_positions)
    torch.manual_seed(seed)
    with torch.device(device):
        full_model = LlamaForCausalLM(llama_config).to(dtype=dtype).eval()
    layers = llama_config.num_hidden_layers
    kept = set(select_full_layers(layers, full_share))
    mixer_types = ["full" if i in kept else mixer for i in range(layers)]
    return full_model, _effattn_model(llama_config, mixer_types, dtype, device)


def build_plugin_full(shape: str, max_positions: int = 1 << 21, dtype=torch.bfloat16, device="cpu", seed: int = 0):
    """An EffAttnForCausalLM of the named shape whose layers are all full attention, with random weights: the
    baseline's layout on hf_effattn's full layers (their decode kernel included)."""
    llama_config = _llama_config(shape, max_positions)
    torch.manual_seed(seed)
    return _effattn_model(llama_config, ["full"] * llama_config.num_hidden_layers, dtype, device)


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


def attention_cache_bytes(model, batch: int, length: int) -> int:
    """Bytes of the keys and values the model's full-attention layers hold for `length` tokens (a lower bound of its
    cache: recurrent and convolution states are left out)."""
    config = model.config
    kinds = getattr(config, "mixer_types", None) or ["full"] * config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = next(model.parameters()).element_size()
    return kinds.count("full") * 2 * batch * config.num_key_value_heads * length * head_dim * element


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _free(device):
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _fits(num_bytes: int, device) -> bool:
    """Whether `num_bytes` can be allocated on `device` now (always True off CUDA)."""
    if torch.device(device).type != "cuda":
        return True
    try:
        probe = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    except torch.OutOfMemoryError:
        return False
    del probe
    torch.cuda.empty_cache()
    return True


def _gib(num_bytes) -> str:
    return f"{num_bytes / 2**30:.1f} GiB"


@torch.no_grad()
def prefill(model, input_ids, chunk: int | None):
    """(last logits, cache): the context in one forward, or in chunks of `chunk` tokens through the cache."""
    cache, logits = None, None
    step = chunk or input_ids.shape[1]
    for start in range(0, input_ids.shape[1], step):
        out = model(input_ids[:, start : start + step], past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache, logits = out.past_key_values, out.logits
    return logits, cache


def to_static(model, cache, max_cache_len: int, consume: bool = False, batch: int | None = None) -> StaticCache:
    """A `StaticCache` holding what the dynamic `cache` holds (prefilling a static cache directly would build a
    context x max_cache_len mask). `consume` frees each dynamic layer once copied, so that the two caches never
    coexist whole: at 1M tokens the keys and values of one cache are tens of GiB. `batch`: a cache of one sequence
    is repeated over that many rows."""
    static = StaticCache(config=model.config, max_cache_len=max_cache_len)

    def tiled(tensor):
        return tensor if batch is None else tensor.expand(batch, *tensor.shape[1:]).contiguous()

    for index, (source, target) in enumerate(zip(cache.layers, static.layers)):
        if getattr(source, "keys", None) is not None and hasattr(target, "keys"):
            if batch is None:
                target.update(source.keys, source.values)
            else:
                # the copy goes into the static buffer directly: no second batch-sized copy of the keys and values
                target.update(
                    source.keys.expand(batch, *source.keys.shape[1:]),
                    source.values.expand(batch, *source.values.shape[1:]),
                )
            if consume:
                source.keys = source.values = None
        conv_states = getattr(source, "conv_states", {}) or {}
        if conv_states.get(0) is not None:
            static.update_conv_state(tiled(conv_states[0]), index)
        recurrent_states = getattr(source, "recurrent_states", {}) or {}
        if recurrent_states.get(0) is not None:
            static.update_recurrent_state(tiled(recurrent_states[0]), index)
    return static


def _cache_length(cache) -> int:
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if isinstance(keys, torch.Tensor) and keys.dim() == 4:
            return keys.shape[2]
    return getattr(cache, "effattn_seen_tokens", 0)


@torch.no_grad()
def decode_eager(model, cache, input_ids, steps: int, device) -> float:
    """Seconds per decode step of plain greedy `generate`, continuing from `cache`, which holds all of `input_ids`
    but the last token. The first call for a model first runs a short untimed `generate` on a fresh cache, so that
    the Triton kernels' first launches for one-token steps (compilation, launch tuning) stay out of the timing (on an
    H100 they put the hybrid's first eager row at 247 ms per step against 33-36 ms for the next ones)."""
    if id(model) not in _EAGER_WARM:
        model.generate(
            input_ids[:, -8:],
            attention_mask=torch.ones_like(input_ids[:, -8:]),
            max_new_tokens=2,
            min_new_tokens=2,
            do_sample=False,
            pad_token_id=0,
        )
        _EAGER_WARM.add(id(model))
    _sync(device)
    start = time.perf_counter()
    model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        past_key_values=cache,
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        pad_token_id=0,
    )
    _sync(device)
    return (time.perf_counter() - start) / steps


# models whose eager decode has been warmed up (`decode_eager`)
_EAGER_WARM: set[int] = set()
# compiled forwards by (model, dynamic), kept across measurements: each new context or batch is a new shape
_COMPILED: dict[tuple[int, object], tuple] = {}
# models whose dynamic-shape compilation failed: they are compiled with static shapes from then on
_STATIC_ONLY: set[int] = set()


def _compiled_forward(model, device, dynamic=None):
    """`torch.compile(model.forward)`, CUDA graphs on GPU. `dynamic=None` (automatic): the first shape compiles
    static, the first recompile makes the dimensions that changed (cache length, batch) symbolic, so that a sweep
    compiles about three graphs per model instead of one per context and batch (~30 s each for the 1.5b shape)."""
    key = (id(model), dynamic)
    entry = _COMPILED.get(key)
    if entry is None or entry[0] is not model:
        import torch._dynamo.config as dynamo_config

        # without room for every shape of a sweep, dynamo would fall back to eager silently, which the decode
        # timings must never measure
        for name in (
            "recompile_limit",
            "cache_size_limit",
            "accumulated_recompile_limit",
            "accumulated_cache_size_limit",
        ):
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))
        if hasattr(dynamo_config, "fail_on_recompile_limit_hit"):
            dynamo_config.fail_on_recompile_limit_hit = True
        mode = "reduce-overhead" if torch.device(device).type == "cuda" else None
        entry = (model, torch.compile(model.forward, mode=mode, dynamic=dynamic))
        _COMPILED[key] = entry
    return entry[1]


def _static_length(length: int, steps: int) -> int:
    """Static cache slots for two rounds of warmup and `steps` timed steps (a failed compilation is retried) after
    `length` cached tokens, rounded up to 256, so that measurements at one context (with or without eager steps
    before) share one compiled graph."""
    needed = length + 2 * (WARMUP_STEPS + steps) + 2
    return -(-needed // 256) * 256


class CompiledDecoder:
    """Greedy decode steps of a compiled forward on a static copy of a prefilled dynamic cache."""

    def __init__(self, model, cache, token, steps: int, device, batch: int | None = None, consume: bool = True):
        self.length = _cache_length(cache)
        self.static = to_static(model, cache, _static_length(self.length, steps), consume=consume, batch=batch)
        self.model = model
        self.dynamic = False if id(model) in _STATIC_ONLY else None
        self.forward = _compiled_forward(model, device, self.dynamic)
        self.token = token if batch is None else token.expand(batch, 1).contiguous()
        self.device = device

    @torch.no_grad()
    def step(self):
        batch = self.token.shape[0]
        positions = torch.full((batch, 1), self.length, device=self.token.device, dtype=torch.long)
        out = self.forward(input_ids=self.token, position_ids=positions, past_key_values=self.static, use_cache=True)
        # the outputs of a CUDA-graph replay are overwritten by the next one
        self.token = out.logits[:, -1:].argmax(-1).clone()
        self.length += 1

    def _time(self, steps: int) -> tuple[float, float]:
        _sync(self.device)
        start = time.perf_counter()
        for _ in range(WARMUP_STEPS):
            self.step()
        _sync(self.device)
        warmup = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        _sync(self.device)
        return warmup, (time.perf_counter() - start) / steps

    def time(self, steps: int) -> tuple[float, float]:
        """(seconds of the warmup steps, which compile and record; seconds per timed step). A failed dynamic-shape
        compilation is retried with static shapes (for this model from then on)."""
        try:
            return self._time(steps)
        except torch.OutOfMemoryError:
            raise
        except Exception:
            # any failure of the dynamic-shape path: retried with static shapes
            if self.dynamic is not None:
                raise
            _STATIC_ONLY.add(id(self.model))
            self.dynamic = False
            self.forward = _compiled_forward(self.model, self.device, False)
            return self._time(steps)


def _compiled_row(row: dict, model, cache, token, steps: int, device, batch: int | None = None):
    """Adds the compiled decode of `cache` (tiled to `batch` rows when given) to `row`; consumes `cache`."""
    try:
        decoder = CompiledDecoder(model, cache, token, steps, device, batch=batch)
        row["static_cache_bytes"] = cache_bytes(decoder.static)
        warmup, seconds = decoder.time(steps)
        row["compile_s"] = warmup
        row["compiled_ms_per_step"] = 1e3 * seconds
        row["compiled_tokens_per_s"] = decoder.token.shape[0] / seconds
        if decoder.dynamic is None:
            row["compiled_shapes"] = "automatic dynamic"
        else:
            row["compiled_shapes"] = "static"
    except torch.OutOfMemoryError:
        row["compiled_ms_per_step"] = "oom"
    except Exception as error:  # noqa: BLE001 (any compile failure is reported in the table; the sweep goes on)
        row["compiled_ms_per_step"] = f"failed: {type(error).__name__}: {str(error)[:200]}"


def _cache_fits(model, row: dict, batch: int, length: int, device) -> bool:
    """Whether the attention cache for `length` tokens can be allocated at all; if not, `row` records the oom."""
    needed = attention_cache_bytes(model, batch, length)
    if _fits(needed, device):
        return True
    row["prefill_s"] = "oom"
    free = torch.cuda.mem_get_info(device)[0]
    row["oom"] = f"its keys and values alone ({_gib(needed)}) cannot be allocated ({_gib(free)} free)"
    return False


def measure(
    model,
    context: int,
    batch: int,
    *,
    decode_steps: int = 16,
    compiled: bool = True,
    eager: bool = True,
    prefill_chunk: int | None = None,
    device="cpu",
) -> dict:
    """One row: prefill seconds, eager and compiled decode tokens/s (per sequence x batch), cache and peak bytes."""
    row = {"context": context, "batch": batch}
    cuda = torch.device(device).type == "cuda"
    try:
        _free(device)
        if not _cache_fits(model, row, batch, context + decode_steps, device):
            return row
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        input_ids = torch.randint(0, model.config.vocab_size, (batch, context), device=device)
        warm = min(context, prefill_chunk or context)
        if batch * warm <= WARM_PREFILL_TOKENS:
            # a first prefill of each shape also builds kernel plans (cuDNN attention, Triton launch variants)
            _sync(device)
            start = time.perf_counter()
            prefill(model, input_ids[:, :warm], prefill_chunk)
            _sync(device)
            if warm == context:
                row["prefill_first_s"] = time.perf_counter() - start
            _free(device)
        _sync(device)
        start = time.perf_counter()
        logits, cache = prefill(model, input_ids, prefill_chunk)
        _sync(device)
        row["prefill_s"] = time.perf_counter() - start
        row["cache_bytes"] = cache_bytes(cache)
        if cuda:
            row["peak_bytes"] = torch.cuda.max_memory_allocated()
        token = logits[:, -1:].argmax(-1)
        del logits
        if eager:
            try:
                seconds = decode_eager(model, cache, torch.cat([input_ids, token], dim=1), decode_steps, device)
                row["eager_ms_per_step"] = 1e3 * seconds
                row["eager_tokens_per_s"] = batch / seconds
            except torch.OutOfMemoryError:
                row["eager_ms_per_step"] = "oom"
        else:
            row["eager_ms_per_step"] = "skipped"
        del input_ids
        if compiled:
            # eager decoding left more tokens in the cache: the compiled steps continue from its end
            _compiled_row(row, model, cache, token, decode_steps, device)
        del cache
    except torch.OutOfMemoryError:
        row["prefill_s"] = "oom"
    finally:
        _free(device)
    return row


def _full_layers(model) -> int:
    kinds = getattr(model.config, "mixer_types", None)
    return kinds.count("full") if kinds else model.config.num_hidden_layers


def largest_batch(model, context: int, *, decode_steps: int = 16, device="cpu", limit: int = MAX_BATCH) -> int:
    """The largest of B = 1, 2, 4 ... whose static cache for `context` tokens can be allocated with room left for
    a decode step (one layer's keys and values twice more, as `repeat_kv` copies them, and 1 GiB). The B=1 row's
    measurements have been freed: nothing else is held but the models."""
    _free(device)
    per_sequence = attention_cache_bytes(model, 1, _static_length(context, decode_steps))
    per_layer = per_sequence // max(1, _full_layers(model))
    best, batch = 0, 1
    while batch <= limit and _fits(batch * (per_sequence + 2 * per_layer) + 2**30, device):
        best, batch = batch, 2 * batch
    return best


def measure_tiled(
    model, context: int, batch: int, *, decode_steps: int = 16, prefill_chunk: int | None = None, device="cpu"
) -> dict:
    """A row at `batch` from one prefilled sequence repeated over the batch: compiled decode and cache bytes (the
    decode cost does not depend on what the cache holds; prefilling `batch` sequences at once would need more
    memory than decoding them)."""
    row = {"context": context, "batch": batch, "prefill_s": "one sequence, tiled", "eager_ms_per_step": "skipped"}
    try:
        _free(device)
        input_ids = torch.randint(0, model.config.vocab_size, (1, context), device=device)
        logits, cache = prefill(model, input_ids, prefill_chunk)
        row["cache_bytes"] = batch * cache_bytes(cache)
        token = logits[:, -1:].argmax(-1)
        del logits, input_ids
        _compiled_row(row, model, cache, token, decode_steps, device, batch=batch)
        del cache
    except torch.OutOfMemoryError:
        row["compiled_ms_per_step"] = "oom"
    finally:
        _free(device)
    return row


def sweep(
    models: dict,
    contexts,
    batches,
    *,
    largest_batch_contexts=(),
    baseline: str | None = None,
    eager_max_context: int | None = None,
    max_batch: int = MAX_BATCH,
    decode_steps: int = 16,
    compiled: bool = True,
    prefill_chunk: int | None = None,
    device="cpu",
    progress=None,
) -> list[dict]:
    """Every model at every (context, batch); at `largest_batch_contexts` also at the baseline's largest batch (the
    baseline is measured first, so that the others run at the batch it found). `progress(rows)` after each row."""
    options = {"decode_steps": decode_steps, "prefill_chunk": prefill_chunk, "device": device}
    names = sorted(models, key=lambda name: name != baseline)
    largest = {}
    rows = []

    def record(row):
        print(json.dumps(row), flush=True)
        rows.append(row)
        if progress is not None:
            progress(rows)

    for name in names:
        model = models[name]
        # compile the kernels (Triton JIT, autotuning) before anything is timed
        prefill(model, torch.randint(0, model.config.vocab_size, (1, 256), device=device), None)
        for context in contexts:
            for batch in batches:
                eager = eager_max_context is None or context <= eager_max_context
                row = {"model": name, **measure(model, context, batch, compiled=compiled, eager=eager, **options)}
                if not eager:
                    row["eager_ms_per_step"] = f"skipped (context > {eager_max_context:,})"
                record(row)
                if row.get("prefill_s") == "oom":
                    break  # larger batches at this context will not fit either
            if context not in largest_batch_contexts or not compiled:
                continue
            if name == baseline or baseline is None:
                batch = largest_batch(model, context, decode_steps=decode_steps, device=device, limit=max_batch)
                print(json.dumps({"model": name, "context": context, "largest_batch": batch}), flush=True)
                while batch > 1:
                    row = {"model": name, "largest_batch": True, **measure_tiled(model, context, batch, **options)}
                    if row.get("compiled_ms_per_step") != "oom":
                        break
                    # the search left too little room for the decode step itself: halve and measure again
                    record(row)
                    batch //= 2
                largest[context] = batch
            elif largest.get(context, 1) > 1:
                row = {
                    "model": name,
                    "largest_batch": True,
                    **measure_tiled(model, context, largest[context], **options),
                }
            if largest.get(context, 1) > 1:
                record(row)
    return rows


def _fmt(value, scale=1.0, digits=2):
    if isinstance(value, (int, float)):
        return f"{value * scale:.{digits}f}"
    return "" if value is None else str(value)[:40]


def render_table(rows: list[dict]) -> str:
    lines = [
        (
            "| model | context | batch | prefill (s) | eager decode (ms/step) | compiled decode (ms/step) | "
            "compiled tokens/s | cache (GiB) | peak (GiB) |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        batch = f"{row['batch']} (largest)" if row.get("largest_batch") else row["batch"]
        lines.append(
            f"| {row['model']} | {row['context']:,} | {batch} | {_fmt(row.get('prefill_s'), digits=3)} | "
            f"{_fmt(row.get('eager_ms_per_step'), digits=1)} | {_fmt(row.get('compiled_ms_per_step'), digits=1)} | "
            f"{_fmt(row.get('compiled_tokens_per_s'), digits=1)} | {_fmt(row.get('cache_bytes'), 2**-30)} | "
            f"{_fmt(row.get('peak_bytes'), 2**-30)} |"
        )
    notes = [f"- {row['model']} at {row['context']:,} x {row['batch']}: {row['oom']}" for row in rows if "oom" in row]
    return "\n".join(lines + ([""] + notes if notes else []))


def ratios(rows: list[dict], hybrid: str = "hybrid", full: str = "full") -> list[dict]:
    """Per (context, batch) measured by both: full / hybrid for times (speed-ups), hybrid / full for cache bytes."""
    by_key = {(r["model"], r["context"], r["batch"]): r for r in rows}
    out = []
    for (name, context, batch), row in by_key.items():
        other = by_key.get((full, context, batch))
        if name != hybrid or other is None:
            continue
        entry = {"context": context, "batch": batch}
        if row.get("largest_batch"):
            entry["largest_batch"] = True
        for key in ("prefill_s", "eager_ms_per_step", "compiled_ms_per_step"):
            a, b = other.get(key), row.get(key)
            entry[f"{key}_speedup"] = b and a / b if isinstance(a, float) and isinstance(b, float) else None
        a, b = row.get("cache_bytes"), other.get("cache_bytes")
        entry["cache_ratio"] = a / b if isinstance(a, int) and isinstance(b, int) and b else None
        out.append(entry)
    return out


def check_targets(rows: list[dict], ratio_rows: list[dict], hybrid: str = "hybrid", full: str = "full") -> list[dict]:
    """The issue's targets, each with the measured value and whether it is met (None: not measured)."""
    targets = []

    def add(name, value, threshold, higher=True):
        met = None if value is None else (value >= threshold if higher else value <= threshold)
        targets.append({"target": name, "value": value, "threshold": threshold, "met": met})

    def ratio(context, batch, key, largest=False):
        for entry in ratio_rows:
            if entry["context"] == context and entry["batch"] == batch and bool(entry.get("largest_batch")) == largest:
                return entry.get(key)
        return None

    contexts = sorted({r["context"] for r in ratio_rows})
    for context in contexts:
        if context >= 131072:
            add(f"prefill speed-up at {context:,}, batch 1", ratio(context, 1, "prefill_s_speedup"), PREFILL_TARGET)
    for context in contexts:
        if context >= 32768:
            add(
                f"compiled decode speed-up at {context:,}, batch 1",
                ratio(context, 1, "compiled_ms_per_step_speedup"),
                DECODE_TARGET,
            )
    for entry in ratio_rows:
        if entry.get("largest_batch"):
            add(
                f"compiled decode speed-up at {entry['context']:,}, batch {entry['batch']} (the baseline's largest)",
                entry.get("compiled_ms_per_step_speedup"),
                LARGEST_BATCH_TARGET,
            )
    for context in contexts:
        add(
            f"cache bytes {hybrid} / {full} at {context:,}",
            ratio(context, 1, "cache_ratio"),
            CACHE_TARGET,
            higher=False,
        )
    longest = max((r["context"] for r in rows), default=0)
    if longest >= 1 << 20:
        ran = [r for r in rows if r["model"] == hybrid and r["context"] == longest and r["batch"] == 1]
        decoded = (
            bool(ran)
            and isinstance(ran[0].get("prefill_s"), float)
            and any(isinstance(ran[0].get(key), float) for key in ("compiled_ms_per_step", "eager_ms_per_step"))
        )
        baseline = [r for r in rows if r["model"] == full and r["context"] == longest and r["batch"] == 1]
        targets.append(
            {
                "target": f"{hybrid} prefills and decodes {longest:,} tokens",
                "value": decoded,
                "threshold": True,
                "met": decoded,
            }
        )
        oom = bool(baseline) and baseline[0].get("prefill_s") == "oom"
        targets.append(
            {
                "target": f"{full} runs out of memory at {longest:,} tokens",
                "value": oom,
                "threshold": True,
                "met": oom if baseline else None,
            }
        )
    return targets


def render_ratios(pairs: dict) -> str:
    """Speed-ups (the second model's time over the first's) of each named pair `{"a vs b": ratios(rows, a, b)}`."""
    lines = ["| pair | context | batch | prefill | eager decode | compiled decode |", "|---|---|---|---|---|---|"]
    for pair, entries in pairs.items():
        for entry in entries:
            batch = f"{entry['batch']} (largest)" if entry.get("largest_batch") else entry["batch"]
            keys = ("prefill_s", "eager_ms_per_step", "compiled_ms_per_step")
            cells = [_fmt(entry.get(f"{key}_speedup")) for key in keys]
            lines.append(f"| {pair} | {entry['context']:,} | {batch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_targets(targets: list[dict]) -> str:
    lines = ["| target | measured | needed | met |", "|---|---|---|---|"]
    for item in targets:
        value, threshold = item["value"], item["threshold"]
        if isinstance(value, float):
            shown = f"{value:.3f}" if "cache" in item["target"] else f"{value:.2f}x"
            needed = f"<= {threshold}" if "cache" in item["target"] else f">= {threshold}x"
        else:
            shown, needed = ("not measured" if value is None else str(value)), str(threshold)
        met = {True: "yes", False: "**no**", None: "n/a"}[item["met"]]
        lines.append(f"| {item['target']} | {shown} | {needed} | {met} |")
    return "\n".join(lines)


# GPU kernels by what they compute, matched on their names (first match wins)
KERNEL_GROUPS = (
    ("softmax attention", ("flash", "fmha", "cudnn", "attention", "sdpa", "flex")),
    ("linear attention (Triton)", ("chunk_", "fused_recurrent")),
    ("matmul", ("gemm", "gemv", "xmma", "cutlass", "nvjet", "matmul", "splitk")),
    ("fused elementwise (inductor)", ("triton_",)),
    ("copies", ("memcpy", "memset", "copy", "cat")),
    ("convolution", ("conv",)),
)


def _kernel_group(name: str) -> str:
    lower = name.lower()
    for group, needles in KERNEL_GROUPS:
        if any(needle in lower for needle in needles):
            return group
    return "other elementwise and reductions"


def _profile(fn, device) -> dict:
    """GPU time of one call of `fn` under torch.profiler: top 15 kernels and the time per kernel group (ms)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
    _sync(device)
    start = time.perf_counter()
    with profile(activities=activities) as profiler:
        fn()
        _sync(device)
    wall = time.perf_counter() - start
    kernels = {}
    for event in profiler.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        total, count = kernels.get(event.name, (0.0, 0))
        kernels[event.name] = (total + event.time_range.elapsed_us() / 1e3, count + 1)
    groups = {}
    for name, (ms, _) in kernels.items():
        groups[_kernel_group(name)] = groups.get(_kernel_group(name), 0.0) + ms
    top = sorted(kernels.items(), key=lambda item: -item[1][0])[:15]
    return {
        "wall_ms": 1e3 * wall,
        "gpu_ms": sum(ms for ms, _ in kernels.values()),
        "top": [{"kernel": name, "ms": ms, "calls": count} for name, (ms, count) in top],
        "groups": dict(sorted(groups.items(), key=lambda item: -item[1])),
    }


def breakdown(model, context: int, *, prefill_chunk: int | None = None, decode_steps: int = 16, device="cpu") -> dict:
    """Where one prefill of `context` tokens and one compiled decode step after it spend their GPU time."""
    _free(device)
    input_ids = torch.randint(0, model.config.vocab_size, (1, context), device=device)
    result = {"context": context}
    holder = {}

    def run_prefill():
        holder["logits"], holder["cache"] = prefill(model, input_ids, prefill_chunk)

    result["prefill"] = _profile(run_prefill, device)
    decoder = CompiledDecoder(model, holder.pop("cache"), holder.pop("logits")[:, -1:].argmax(-1), decode_steps, device)
    decoder.time(2)
    result["decode_step"] = _profile(decoder.step, device)
    del decoder
    _free(device)
    return result


def render_breakdown(result: dict) -> str:
    parts = []
    for key, title in (
        ("prefill", f"prefill of {result['context']:,} tokens"),
        ("decode_step", f"one compiled decode step at {result['context']:,} tokens"),
    ):
        data = result[key]
        lines = [
            f"### {title}: {data['wall_ms']:.2f} ms wall, {data['gpu_ms']:.2f} ms of GPU kernels",
            "",
        ]
        if not data["top"]:
            lines += ["(the profiler recorded no GPU kernel)", ""]
        lines += [
            "| group | GPU ms | share |",
            "|---|---|---|",
        ]
        total = data["gpu_ms"] or 1.0
        lines += [f"| {group} | {ms:.3f} | {ms / total:.0%} |" for group, ms in data["groups"].items()]
        lines += ["", "| kernel | GPU ms | calls | share |", "|---|---|---|---|"]
        lines += [
            f"| `{item['kernel'][:90]}` | {item['ms']:.3f} | {item['calls']} | {item['ms'] / total:.0%} |"
            for item in data["top"]
        ]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def plot(rows: list[dict], folder: Path) -> list[Path]:
    """Prefill time, decode tokens/s and cache size against context, one line per model and batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, label, scale in (
        ("prefill_s", "prefill (s)", 1.0),
        ("compiled_tokens_per_s", "compiled decode tokens/s", 1.0),
        ("eager_tokens_per_s", "eager decode tokens/s", 1.0),
        ("cache_bytes", "cache (GiB)", 2**-30),
    ):
        figure, axis = plt.subplots(figsize=(6, 4))
        series = {}
        for row in rows:
            if isinstance(row.get(key), (int, float)):
                batch = "largest" if row.get("largest_batch") else row["batch"]
                series.setdefault(f"{row['model']} B={batch}", []).append((row["context"], row[key] * scale))
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


def run(
    output: Path,
    models: dict,
    contexts,
    batches,
    *,
    environment: dict | None = None,
    decode_steps=16,
    compiled=True,
    prefill_chunk=None,
    device="cpu",
    compare: tuple[str, str] | None = None,
    also_compare=(),
    largest_batch_contexts=(),
    eager_max_context: int | None = None,
    max_batch: int = MAX_BATCH,
    breakdown_context: int | None = None,
) -> dict:
    """Measures every model at every (context, batch); writes efficiency.json, efficiency.md and the plots.

    `compare` = (efficient model, baseline) names for the ratios and the targets; by default the first two models
    given. `also_compare`: more (model, baseline) pairs whose speed-ups are reported too (no targets). The
    baseline's largest batch is searched at `largest_batch_contexts`; `breakdown_context` profiles the efficient
    model there (breakdown.md).
    """
    import transformers

    cuda = torch.device(device).type == "cuda"
    compare = compare or tuple(models)[:2]
    environment = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "decode_steps": decode_steps,
        "prefill_chunk": prefill_chunk,
        "parameters": {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()},
        "eager_decode": "generate (greedy) on the dynamic cache",
        "compiled_decode": "StaticCache + torch.compile(mode='reduce-overhead')" if cuda else "StaticCache + compile",
        **(environment or {}),
    }
    if cuda:
        environment["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    output.mkdir(parents=True, exist_ok=True)

    def progress(rows):
        # a run cut short still leaves every finished row behind
        write_json_atomic(output / "efficiency.json", {"environment": environment, "rows": rows, "partial": True})

    rows = sweep(
        models,
        contexts,
        batches,
        largest_batch_contexts=largest_batch_contexts,
        baseline=compare[1] if len(compare) == 2 and compare[1] in models else None,
        eager_max_context=eager_max_context,
        max_batch=max_batch,
        decode_steps=decode_steps,
        compiled=compiled,
        prefill_chunk=prefill_chunk,
        device=device,
        progress=progress,
    )
    result = summarise(environment, rows, compare, [(a, b) for a, b in also_compare if a in models and b in models])
    if breakdown_context is not None and compiled:
        try:
            result["breakdown"] = breakdown(
                models[compare[0]],
                breakdown_context,
                prefill_chunk=prefill_chunk,
                decode_steps=decode_steps,
                device=device,
            )
        except Exception as error:  # noqa: BLE001 (the measurements above are written whatever happens here)
            result["breakdown"] = {"failed": f"{type(error).__name__}: {str(error)[:300]}"}
    write_report(output, result)
    return result


def summarise(environment: dict, rows: list[dict], compare, also_compare=()) -> dict:
    """The report of measured rows: ratios and targets of the `compare` pair, speed-ups of the `also_compare` pairs."""
    compare = tuple(compare)
    ratio_rows = ratios(rows, *compare) if len(compare) == 2 else []
    result = {
        "environment": environment,
        "rows": rows,
        "ratios": ratio_rows,
        "compare": list(compare),
        "targets": check_targets(rows, ratio_rows, *compare) if len(compare) == 2 else [],
    }
    pairs = {f"{a} vs {b}": ratios(rows, a, b) for a, b in also_compare}
    if pairs:
        result["other_ratios"] = pairs
    return result


def write_report(output: Path, result: dict) -> None:
    """efficiency.json, efficiency.md, breakdown.md (when profiled) and the plots of `result` in `output`."""
    output.mkdir(parents=True, exist_ok=True)
    environment, rows = result["environment"], result["rows"]
    if "breakdown" in result and "failed" not in result["breakdown"]:
        (output / "breakdown.md").write_text(render_breakdown(result["breakdown"]) + "\n")
    write_json_atomic(output / "efficiency.json", result)
    setting = ", ".join(
        f"{key} {environment[key]}"
        for key in ("device", "dtype", "torch", "transformers", "triton")
        if key in environment
    )
    text = f"{setting}; {environment.get('decode_steps')} decode steps per measurement.\n\n" + render_table(rows)
    if environment.get("runs", 1) > 1:
        text += (
            f"\n\nMerged from {environment['runs']} runs on the same machine, each context measured in one run: every "
            "ratio compares rows of one run."
        )
    if result["targets"]:
        text += "\n\n## Targets\n\n" + render_targets(result["targets"])
    if result.get("other_ratios"):
        text += "\n\n## Speed-ups of the other pairs\n\n" + render_ratios(result["other_ratios"])
    (output / "efficiency.md").write_text(text + "\n")
    plot(rows, output)


# environment entries that must agree for runs to be merged into one report
MERGE_KEYS = ("device", "torch", "transformers", "triton", "dtype", "shape", "full_share", "mixer", "decode_steps",
              "prefill_chunk", "parameters")


def merge_reports(paths, output: Path) -> dict:
    """One report from several `efficiency.json` of the same models and setting, each measuring other contexts (a
    sweep split into runs that each fit a time limit). Rows are concatenated; ratios and targets are recomputed, each
    from rows of one run; a profile is kept from the one run that has it."""
    reports = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            path = path / "efficiency.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no efficiency.json there; pass the files (or folders) bench wrote.")
        report = json.loads(path.read_text())
        if report.get("partial"):
            raise ValueError(f"{path} is a partial run (cut short): rerun it before merging.")
        reports.append((path, report))
    if len(reports) < 2:
        raise ValueError("merge needs at least two reports.")
    first_path, first = reports[0]
    seen = {}
    for path, report in reports:
        for key in MERGE_KEYS:
            if report["environment"].get(key) != first["environment"].get(key):
                raise ValueError(
                    f"{path} was measured with {key} = {report['environment'].get(key)!r}, {first_path} with "
                    f"{first['environment'].get(key)!r}: only runs of one setting merge into one report."
                )
        if report.get("compare") != first.get("compare"):
            raise ValueError(f"{path} compares {report.get('compare')}, {first_path} {first.get('compare')}.")
        for context in {row["context"] for row in report["rows"]}:
            if context in seen:
                raise ValueError(
                    f"context {context} was measured by both {seen[context]} and {path}: merged runs must measure "
                    "different contexts, so that each ratio compares rows of one run."
                )
            seen[context] = path
    profiles = [report["breakdown"] for _, report in reports if "breakdown" in report]
    if len(profiles) > 1:
        raise ValueError("more than one of these runs holds a profile (breakdown); keep it in one run only.")
    rows = [row for _, report in reports for row in report["rows"]]
    rows.sort(key=lambda row: (list(first["environment"]["parameters"]).index(row["model"])
                               if row["model"] in first["environment"]["parameters"] else 0, row["context"]))
    environment = dict(first["environment"])
    environment["runs"] = len(reports)
    pairs = [tuple(name.split(" vs ")) for name in first.get("other_ratios", {})]
    result = summarise(environment, rows, first.get("compare", []), pairs)
    if profiles:
        result["breakdown"] = profiles[0]
    write_report(Path(output), result)
    return result


def run_random_pair(
    output: Path,
    shape: str,
    contexts,
    batches,
    *,
    full_share=0.25,
    mixer="gdn",
    device=None,
    dtype="bfloat16",
    only: str | None = None,
    plugin_full: bool = False,
    **options,
) -> dict:
    """`run` on a random all-full model and its hybrid of the named shape (`only` = "full" or "hybrid": just one).

    `plugin_full`: also an all-full EffAttnForCausalLM of the shape (`PLUGIN_FULL` rows), so that the report
    separates what the hybrid layout gains (hybrid vs it) from what hf_effattn's full layers gain (it vs full).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[dtype]
    full_model, hybrid = build_pair(shape, full_share, mixer, dtype=torch_dtype, device=device)
    from hf_effattn.mixer_full import DECODE_OPS
    from hf_effattn.mixer_linear import triton_linear_ops

    cuda = torch.device(device).type == "cuda"
    uses_triton = cuda and triton_linear_ops() is not None
    environment = {
        "dtype": dtype,
        "shape": shape,
        "full_share": full_share,
        "mixer": mixer,
        "layout": hybrid.config.mixer_types,
        "linear_ops": (
            "triton (prefill: chunked kernels; decode: fused recurrent kernel, a custom op inside the compiled graph)"
        )
        if uses_triton
        else "torch reference",
        "full_attention_decode": "triton split-KV kernel (a custom op inside the compiled graph)"
        if cuda and DECODE_OPS.get() is not None
        else "SDPA",
    }
    if uses_triton:
        import triton

        environment["triton"] = triton.__version__
    models = {"full": full_model, "hybrid": hybrid}
    if only is not None:
        models = {only: models[only]}
    if plugin_full:
        models[PLUGIN_FULL] = build_plugin_full(shape, dtype=torch_dtype, device=device)
        environment[PLUGIN_FULL] = "EffAttnForCausalLM, every layer full attention, random weights"
    return run(
        output,
        models,
        contexts,
        batches,
        environment=environment,
        device=device,
        compare=("hybrid", "full"),
        also_compare=((PLUGIN_FULL, "full"), ("hybrid", PLUGIN_FULL)),
        **options,
    )


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
    parser.add_argument("--largest-batch", default="", help="contexts at which to search the baseline's largest batch")
    parser.add_argument("--eager-max-context", type=int, default=None, help="skip eager decode above this context")
    parser.add_argument("--max-batch", type=int, default=MAX_BATCH, help="the largest-batch search stops here")
    parser.add_argument("--breakdown", type=int, default=None, help="profile the hybrid at this context")
    parser.add_argument("--only", choices=["full", "hybrid"], default=None, help="measure one of the two models")
    parser.add_argument("--plugin-full", action="store_true", help=f"also an all-full EffAttn model ({PLUGIN_FULL})")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    args = parser.parse_args(argv)
    result = run_random_pair(
        args.output,
        args.shape,
        [int(x) for x in args.contexts.split(",")],
        [int(x) for x in args.batches.split(",")],
        full_share=args.full_share,
        mixer=args.mixer,
        decode_steps=args.decode_steps,
        compiled=not args.no_compile,
        prefill_chunk=args.prefill_chunk,
        device=args.device,
        dtype=args.dtype,
        only=args.only,
        plugin_full=args.plugin_full,
        largest_batch_contexts=[int(x) for x in args.largest_batch.split(",") if x],
        eager_max_context=args.eager_max_context,
        max_batch=args.max_batch,
        breakdown_context=args.breakdown,
    )
    print(render_table(result["rows"]))
    print(json.dumps(result["ratios"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
