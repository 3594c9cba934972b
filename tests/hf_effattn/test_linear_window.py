"""Linear mixers with a softmax window inside: the initial layer is exactly sliding-window attention with sinks,
the cache (window keys/values + state + convolution) decodes exactly, and left padding changes nothing."""

import pytest
import torch
from transformers import DynamicCache

from hf_effattn import EffAttnConfig, EffAttnForCausalLM

pytestmark = pytest.mark.usefixtures("torch_single_thread")

KINDS = ["gdn", "deltanet", "gla"]
WINDOW = {"window": 8, "sink_tokens": 2, "chunk_size": 16}


def build(tiny_config, kind, seed=0, randomise_scale=True):
    config = tiny_config([kind, "full", kind], {kind: WINDOW})
    torch.manual_seed(seed)
    model = EffAttnForCausalLM(config).eval()
    if randomise_scale:
        with torch.no_grad():
            for layer in (0, 2):
                model.model.layers[layer].self_attn.recurrent_scale.normal_(0.0, 1.0)
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_layer_types_and_cache_window(tiny_config, kind):
    config = tiny_config([kind, "full", kind], {kind: WINDOW})
    assert config.layer_types == ["hybrid_sliding", "full_attention", "hybrid_sliding"]
    assert config.sliding_window == 8
    assert tiny_config([kind, "full"]).layer_types == ["linear_attention", "full_attention"]


@pytest.mark.parametrize("kind", KINDS)
def test_initial_windowed_layer_is_sliding_attention_with_sinks(tiny_config, kind):
    linear = build(tiny_config, kind, randomise_scale=False)
    assert all((linear.model.layers[i].self_attn.recurrent_scale == 0).all() for i in (0, 2))
    sliding = EffAttnForCausalLM(
        tiny_config(["sliding", "full", "sliding"], {"sliding": {**WINDOW, "sink_logits": False}})
    ).eval()
    sliding.load_state_dict(linear.state_dict(), strict=False)
    ids = torch.randint(1, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(linear(ids).logits, sliding(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_cached_decode_matches_full_forward(tiny_config, kind):
    model = build(tiny_config, kind)
    ids = torch.randint(1, 97, (2, 84), generator=torch.Generator().manual_seed(2))
    expected = model(ids).logits
    cache, pieces, start = DynamicCache(config=model.config), [], 0
    with torch.no_grad():
        for size in [70, 4] + [1] * 10:
            pieces.append(model(ids[:, start : start + size], past_key_values=cache, use_cache=True).logits)
            start += size
    actual = torch.cat(pieces, dim=1)
    assert (actual - expected).abs().max() / expected.abs().max() < 2e-5


@pytest.mark.parametrize("kind", KINDS)
def test_left_padded_batch_generates_like_each_prompt_alone(tiny_config, kind):
    model = build(tiny_config, kind)
    long = torch.randint(1, 97, (1, 30), generator=torch.Generator().manual_seed(3))
    short = torch.randint(1, 97, (1, 19), generator=torch.Generator().manual_seed(4))
    batch = torch.cat([long, torch.cat([torch.zeros(1, 11, dtype=torch.long), short], dim=1)])
    mask = (torch.arange(30)[None] >= torch.tensor([[0], [11]])).long()
    together = model.generate(batch, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    for row, prompt in enumerate((long, short)):
        alone = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert torch.equal(together[row, 30:], alone[0, prompt.shape[1] :]), row


def test_window_needs_the_backbone_heads():
    with pytest.raises(ValueError, match="softmax window runs on the backbone's attention heads"):
        EffAttnConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=4, mixer_types=["gdn"],
                      mixer_options={"gdn": {"window": 16, "head_dim": 32}})
    with pytest.raises(ValueError, match="integer >= 0"):
        EffAttnConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=4, mixer_types=["gla"],
                      mixer_options={"gla": {"window": -1}})
