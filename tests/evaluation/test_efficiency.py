"""The efficiency report: cache accounting, the static-cache decode path, and a small sweep on the CPU."""

import json

import pytest
import torch
from transformers import StaticCache

from hf_effattn import EffAttnForCausalLM
from hf_effattn.cli import main
from hf_effattn.evaluation import efficiency


@pytest.fixture(scope="module")
def pair(torch_single_thread):
    return efficiency.build_pair("tiny", full_share=0.25, dtype=torch.float32)


def test_cache_bytes_count_keys_values_and_states(pair):
    full_model, hybrid = pair
    context, batch = 48, 2
    ids = torch.randint(0, 4096, (batch, context))
    _, full_cache = efficiency.prefill(full_model, ids, None)
    config = full_model.config
    kv = 2 * batch * config.num_key_value_heads * context * config.head_dim * 4
    assert efficiency.cache_bytes(full_cache) == config.num_hidden_layers * kv
    _, hybrid_cache = efficiency.prefill(hybrid, ids, None)
    full_layers = hybrid.config.mixer_types.count("full")
    linear = [i for i, kind in enumerate(hybrid.config.mixer_types) if kind == "gdn"]
    state = sum(hybrid_cache.layers[i].recurrent_states[0].numel() * 4 for i in linear)
    conv = sum(hybrid_cache.layers[i].conv_states[0].numel() * 4 for i in linear)
    # [B, H, K, V] fp32 states for each linear layer
    assert state == len(linear) * batch * config.num_attention_heads * config.head_dim**2 * 4
    assert efficiency.cache_bytes(hybrid_cache) == full_layers * kv + state + conv


def test_chunked_prefill_matches_one_forward(pair):
    _, hybrid = pair
    ids = torch.randint(0, 4096, (1, 80))
    whole, _ = efficiency.prefill(hybrid, ids, None)
    chunked, _ = efficiency.prefill(hybrid, ids, 32)
    assert (whole - chunked).abs().max().item() < 1e-4


@pytest.mark.parametrize("which", [0, 1])
def test_static_copy_decodes_like_the_dynamic_cache(pair, which):
    model = pair[which]
    ids = torch.randint(0, 4096, (2, 40))
    logits, cache = efficiency.prefill(model, ids, None)
    reference = []
    with torch.no_grad():
        token = logits[:, -1:].argmax(-1)
        static = efficiency.to_static(model, cache, 64)
        for step in range(5):
            dynamic_logits = model(token, past_key_values=cache, use_cache=True).logits
            positions = torch.full((2, 1), 40 + step)
            static_logits = model(token, position_ids=positions, past_key_values=static, use_cache=True).logits
            reference.append((dynamic_logits - static_logits).abs().max().item())
            token = dynamic_logits[:, -1:].argmax(-1)
    assert max(reference) < 1e-4


def test_static_cache_refuses_windowed_layers(tiny_config, torch_single_thread):
    model = EffAttnForCausalLM(tiny_config(["full", "sliding"])).eval()
    static = StaticCache(config=model.config, max_cache_len=32)
    with torch.no_grad(), pytest.raises(ValueError, match="static cache serves layouts"):
        model(torch.randint(1, 97, (1, 8)), past_key_values=static, use_cache=True)


def test_bench_sweep_writes_report(tmp_path, torch_single_thread):
    code = main(
        [
            "bench",
            "--shape",
            "tiny",
            "--contexts",
            "64,128",
            "--batches",
            "1,2",
            "--decode-steps",
            "2",
            "--no-compile",
            "--device",
            "cpu",
            "--output",
            str(tmp_path),
        ]
    )
    assert code == 0
    result = json.loads((tmp_path / "efficiency.json").read_text())
    assert len(result["rows"]) == 8 and result["compare"] == ["hybrid", "full"]
    for row in result["rows"]:
        assert row["prefill_s"] > 0 and row["eager_ms_per_step"] > 0 and row["cache_bytes"] > 0
    for entry in result["ratios"]:
        full = next(
            r
            for r in result["rows"]
            if r["model"] == "full" and r["context"] == entry["context"] and r["batch"] == entry["batch"]
        )
        hybrid = next(
            r
            for r in result["rows"]
            if r["model"] == "hybrid" and r["context"] == entry["context"] and r["batch"] == entry["batch"]
        )
        assert entry["prefill_s_speedup"] == pytest.approx(full["prefill_s"] / hybrid["prefill_s"])
        assert entry["cache_ratio"] == pytest.approx(hybrid["cache_bytes"] / full["cache_bytes"])
    assert {p.name for p in tmp_path.glob("*.png")} == {"prefill_s.png", "eager_tokens_per_s.png", "cache_bytes.png"}
    assert "| hybrid | 128 | 2 |" in (tmp_path / "efficiency.md").read_text()


def test_bench_plugin_full_adds_the_all_full_effattn_model(tmp_path, torch_single_thread):
    args = ["bench", "--shape", "tiny", "--contexts", "64", "--decode-steps", "2", "--no-compile", "--plugin-full"]
    assert main([*args, "--device", "cpu", "--output", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "efficiency.json").read_text())
    assert sorted(row["model"] for row in result["rows"]) == ["full", "full (hf_effattn)", "hybrid"]
    parameters = result["environment"]["parameters"]
    assert parameters["full (hf_effattn)"] == parameters["full"]
    # the targets stay between the hybrid and the Llama; the other two pairs get their speed-ups
    assert result["compare"] == ["hybrid", "full"]
    assert {t["target"] for t in result["targets"]} == {"cache bytes hybrid / full at 64"}
    rows = {row["model"]: row for row in result["rows"]}
    pairs = result["other_ratios"]
    assert set(pairs) == {"full (hf_effattn) vs full", "hybrid vs full (hf_effattn)"}
    plugin, hybrid = rows["full (hf_effattn)"], rows["hybrid"]
    layout = pairs["hybrid vs full (hf_effattn)"][0]
    assert layout["prefill_s_speedup"] == pytest.approx(plugin["prefill_s"] / hybrid["prefill_s"])
    # the same full layers on the same cache layout: the same cache bytes as the Llama
    assert pairs["full (hf_effattn) vs full"][0]["cache_ratio"] == 1.0
    text = (tmp_path / "efficiency.md").read_text()
    assert "| full (hf_effattn) | 64 | 1 |" in text and "| hybrid vs full (hf_effattn) | 64 | 1 |" in text
    with pytest.raises(SystemExit, match="--plugin-full needs --shape"):
        main(["bench", "some-model", "--plugin-full", "--output", str(tmp_path)])


def test_bench_merge_joins_runs_of_other_contexts(tmp_path, torch_single_thread):
    """Two runs (as a sweep split to fit a time limit) merge into one report whose ratios are each run's own, and
    runs that overlap, differ in setting or were cut short are refused."""
    args = ["bench", "--shape", "tiny", "--decode-steps", "2", "--no-compile", "--plugin-full", "--device", "cpu"]
    for name, context in (("a", "64"), ("b", "96")):
        assert main([*args, "--contexts", context, "--output", str(tmp_path / name)]) == 0
    runs = {name: json.loads((tmp_path / name / "efficiency.json").read_text()) for name in "ab"}
    assert main(["bench", "--merge", str(tmp_path / "a"), str(tmp_path / "b" / "efficiency.json"),
                 "--output", str(tmp_path / "merged")]) == 0
    merged = json.loads((tmp_path / "merged" / "efficiency.json").read_text())
    assert merged["environment"]["runs"] == 2
    assert merged["rows"] == sorted(runs["a"]["rows"] + runs["b"]["rows"],
                                    key=lambda r: (["full", "hybrid", "full (hf_effattn)"].index(r["model"]),
                                                   r["context"]))
    assert merged["ratios"] == runs["a"]["ratios"] + runs["b"]["ratios"]
    assert merged["targets"] == runs["a"]["targets"] + runs["b"]["targets"]
    for pair in merged["other_ratios"]:
        assert merged["other_ratios"][pair] == runs["a"]["other_ratios"][pair] + runs["b"]["other_ratios"][pair]
    assert "Merged from 2 runs" in (tmp_path / "merged" / "efficiency.md").read_text()
    # the same context twice: which run's ratio would it be?
    with pytest.raises(SystemExit, match="context 64 was measured by both"):
        main(["bench", "--merge", str(tmp_path / "a"), str(tmp_path / "a"), "--output", str(tmp_path / "x")])
    # another setting
    other = dict(runs["b"], environment={**runs["b"]["environment"], "dtype": "bfloat16"})
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="dtype"):
        main(["bench", "--merge", str(tmp_path / "a"), str(tmp_path / "other.json"), "--output", str(tmp_path / "x")])
    # a run cut short, and a missing file
    (tmp_path / "partial.json").write_text(json.dumps({**runs["b"], "partial": True}))
    with pytest.raises(SystemExit, match="partial run"):
        main(["bench", "--merge", str(tmp_path / "a"), str(tmp_path / "partial.json"), "--output", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="no efficiency.json"):
        main(["bench", "--merge", str(tmp_path / "a"), str(tmp_path / "nothing"), "--output", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_attention_cache_bytes_predicts_the_keys_and_values(pair):
    full_model, hybrid = pair
    ids = torch.randint(0, 4096, (2, 24))
    _, full_cache = efficiency.prefill(full_model, ids, None)
    assert efficiency.attention_cache_bytes(full_model, 2, 24) == efficiency.cache_bytes(full_cache)
    _, hybrid_cache = efficiency.prefill(hybrid, ids, None)
    keys_values = sum(layer.keys.numel() * 4 * 2 for layer in hybrid_cache.layers if hasattr(layer, "keys"))
    assert efficiency.attention_cache_bytes(hybrid, 2, 24) == keys_values


def test_chunked_prefill_builds_no_mask_and_padding_still_does(pair, monkeypatch):
    from hf_effattn import modeling_effattn

    _, hybrid = pair
    ids = torch.randint(0, 4096, (2, 96))
    whole, _ = efficiency.prefill(hybrid, ids, None)
    built = []
    original = modeling_effattn.create_causal_mask
    monkeypatch.setattr(modeling_effattn, "create_causal_mask", lambda **kw: built.append(1) or original(**kw))
    chunked, _ = efficiency.prefill(hybrid, ids, 40)
    # the first chunk has no cached tokens (transformers skips its mask); the later ones run without one
    assert (whole - chunked).abs().max().item() < 1e-4
    assert len(built) == 1
    # a padded batch keeps transformers' mask, and its real tokens get what they get alone
    mask = torch.ones_like(ids)
    mask[0, :10] = 0
    with torch.no_grad():
        cache = None
        for start in (0, 40, 80):
            out = hybrid(
                ids[:, start : start + 40],
                attention_mask=mask[:, : start + 40],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            cache = out.past_key_values
        assert len(built) == 4
        alone = hybrid(ids[1:], logits_to_keep=1).logits
    assert (out.logits[1:] - alone).abs().max().item() < 1e-4


def test_offset_causal_attention_matches_a_masked_sdpa():
    from hf_effattn.mixer_full import offset_causal_attention

    # 4 query heads over 2 key/value heads, 37 new tokens after 100 cached ones
    q, k, v = torch.randn(2, 4, 37, 16), torch.randn(2, 2, 137, 16), torch.randn(2, 2, 137, 16)
    out = offset_causal_attention(q, k, v, 0.25)
    mask = torch.arange(137)[None, :] <= (100 + torch.arange(37))[:, None]
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask, scale=0.25
    )
    assert out.shape == (2, 37, 4, 16)
    assert (out - expected.transpose(1, 2)).abs().max().item() < 1e-5


def test_static_copy_tiled_over_a_batch_decodes_each_row_alike(pair):
    _, hybrid = pair
    ids = torch.randint(0, 4096, (1, 40))
    logits, cache = efficiency.prefill(hybrid, ids, None)
    token = logits[:, -1:].argmax(-1)
    single = efficiency.to_static(hybrid, cache, 48)
    tiled = efficiency.to_static(hybrid, cache, 48, batch=3)
    # every tensor but the static layers' 0-d length counters grows with the batch
    counters = sum(8 for layer in single.layers if hasattr(layer, "cumulative_length"))
    assert efficiency.cache_bytes(tiled) - counters == 3 * (efficiency.cache_bytes(single) - counters)
    with torch.no_grad():
        for step in range(3):
            one = hybrid(token, position_ids=torch.tensor([[40 + step]]), past_key_values=single).logits
            three = hybrid(token.expand(3, 1), position_ids=torch.full((3, 1), 40 + step), past_key_values=tiled).logits
            assert (three - one).abs().max().item() < 1e-5
            token = one[:, -1:].argmax(-1)


def test_sweep_finds_the_largest_batch_targets_and_breakdown(tmp_path, monkeypatch, torch_single_thread):
    # the compiled forward replaced by the plain one: the static-cache path, the search and the report without
    # minutes of compilation on a CPU
    monkeypatch.setattr(efficiency, "_compiled_forward", lambda model, device, dynamic=None: model.forward)
    result = efficiency.run_random_pair(
        tmp_path,
        "tiny",
        [64, 96],
        [1],
        device="cpu",
        dtype="float32",
        decode_steps=2,
        largest_batch_contexts=[64],
        max_batch=4,
        eager_max_context=64,
        only="hybrid",
        breakdown_context=64,
    )
    rows = result["rows"]
    tiled = [row for row in rows if row.get("largest_batch")]
    assert [(row["context"], row["batch"]) for row in tiled] == [(64, 4)]
    assert tiled[0]["compiled_ms_per_step"] > 0 and tiled[0]["cache_bytes"] == 4 * rows[0]["cache_bytes"]
    assert rows[0]["eager_ms_per_step"] > 0 and rows[0]["compiled_ms_per_step"] > 0
    assert rows[-1]["context"] == 96 and rows[-1]["eager_ms_per_step"].startswith("skipped")
    assert {"prefill", "decode_step"} <= set(result["breakdown"])
    assert (tmp_path / "breakdown.md").exists() and "(largest)" in (tmp_path / "efficiency.md").read_text()


def test_targets_compare_the_hybrid_with_the_baseline():
    rows = [
        {
            "model": "full",
            "context": 131072,
            "batch": 1,
            "prefill_s": 4.5,
            "compiled_ms_per_step": 30.0,
            "cache_bytes": 100,
        },
        {
            "model": "hybrid",
            "context": 131072,
            "batch": 1,
            "prefill_s": 1.5,
            "compiled_ms_per_step": 15.0,
            "cache_bytes": 25,
        },
        {
            "model": "full",
            "context": 131072,
            "batch": 4,
            "largest_batch": True,
            "compiled_ms_per_step": 90.0,
            "cache_bytes": 400,
        },
        {
            "model": "hybrid",
            "context": 131072,
            "batch": 4,
            "largest_batch": True,
            "compiled_ms_per_step": 20.0,
            "cache_bytes": 100,
        },
        {"model": "full", "context": 1 << 20, "batch": 1, "prefill_s": "oom"},
        {
            "model": "hybrid",
            "context": 1 << 20,
            "batch": 1,
            "prefill_s": 40.0,
            "compiled_ms_per_step": 20.0,
            "cache_bytes": 7,
        },
    ]
    targets = {t["target"]: t for t in efficiency.check_targets(rows, efficiency.ratios(rows))}
    assert targets["prefill speed-up at 131,072, batch 1"]["met"] is True
    assert targets["compiled decode speed-up at 131,072, batch 1"]["met"] is False
    assert targets["compiled decode speed-up at 131,072, batch 4 (the baseline's largest)"]["value"] == 4.5
    assert targets["cache bytes hybrid / full at 131,072"]["met"] is True
    assert targets["hybrid prefills and decodes 1,048,576 tokens"]["met"] is True
    assert targets["full runs out of memory at 1,048,576 tokens"]["met"] is True


def test_eager_decode_warms_each_model_up_once(pair, monkeypatch):
    """The first eager measurement of a model runs an untimed generate on a fresh cache first (kernel compilation and
    launch tuning stay out of the row); later ones do not, and the timed generate continues the given cache."""
    _, hybrid = pair
    monkeypatch.setattr(efficiency, "_EAGER_WARM", set())
    calls = []
    original = hybrid.generate

    def counted(ids, **kwargs):
        calls.append((ids.shape[1], kwargs.get("past_key_values") is not None))
        return original(ids, **kwargs)

    monkeypatch.setattr(hybrid, "generate", counted)
    ids = torch.randint(0, 4096, (1, 24))
    for _ in range(2):
        _, cache = efficiency.prefill(hybrid, ids[:, :-1], None)
        assert efficiency.decode_eager(hybrid, cache, ids, 3, "cpu") > 0
    # warm-up on the last 8 tokens without a cache, then one timed generate per measurement
    assert calls == [(8, False), (24, True), (24, True)]
