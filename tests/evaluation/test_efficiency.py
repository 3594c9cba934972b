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
    with torch.no_grad():
        model(torch.randint(1, 97, (1, 8)), past_key_values=static, use_cache=True)
        with pytest.raises(ValueError, match="static cache serves layouts"):
            model(torch.randint(1, 97, (1, 1)), position_ids=torch.tensor([[8]]), past_key_values=static)


def test_bench_sweep_writes_report(tmp_path, torch_single_thread):
    code = main(["bench", "--shape", "tiny", "--contexts", "64,128", "--batches", "1,2", "--decode-steps", "2",
                 "--no-compile", "--device", "cpu", "--output", str(tmp_path)])
    assert code == 0
    result = json.loads((tmp_path / "efficiency.json").read_text())
    assert len(result["rows"]) == 8 and result["compare"] == ["hybrid", "full"]
    for row in result["rows"]:
        assert row["prefill_s"] > 0 and row["eager_ms_per_step"] > 0 and row["cache_bytes"] > 0
    for entry in result["ratios"]:
        full = next(r for r in result["rows"] if r["model"] == "full" and r["context"] == entry["context"]
                    and r["batch"] == entry["batch"])
        hybrid = next(r for r in result["rows"] if r["model"] == "hybrid" and r["context"] == entry["context"]
                      and r["batch"] == entry["batch"])
        assert entry["prefill_s_speedup"] == pytest.approx(full["prefill_s"] / hybrid["prefill_s"])
        assert entry["cache_ratio"] == pytest.approx(hybrid["cache_bytes"] / full["cache_bytes"])
    assert {p.name for p in tmp_path.glob("*.png")} == {"prefill_s.png", "eager_tokens_per_s.png", "cache_bytes.png"}
    assert "| hybrid | 128 | 2 |" in (tmp_path / "efficiency.md").read_text()
