"""The cache's own state across whole-cache operations: reset, crop, deepcopy and the batch operations of beam search
(reorder, select, repeat) keep the mixers' extra per-row state (block means, sink tokens) with its rows."""

import copy

import pytest
import torch
from test_generation import build_model, random_ids
from transformers import DynamicCache

from hf_effattn.cache_layers import RESET_KEEPS_KEYS, RowStateLayerMixin
from hf_effattn.modeling_effattn import EffAttnCache

pytestmark = pytest.mark.usefixtures("torch_single_thread")

# (mixer types, options): each layout keeps per-row state beside its keys/values. Windows of 6-8 tokens and blocks
# of 16 with a top-2 choice, so that prompts of `PROMPT` tokens have sinks that have left the window and more earlier
# blocks than the top_k (the block means decide the attention)
PROMPT = 70
LAYOUTS = {
    "sliding-sinks": (["sliding", "full", "sliding"], {}),
    "linear-window-sinks": (["gdn", "full"], {"gdn": {"window": 6, "sink_tokens": 2}}),
    "block_topk": (["block_topk", "full", "block_topk"], {"block_topk": {"block_size": 16, "top_k": 2}}),
}
# more layouts whose cache layers hold recurrent and convolution states, for the batch operations (transformers moves
# those states on reorders only: it selects and repeats the keys/values of a linear layer with a window, and has no
# batch selection or repetition for a linear layer without one)
MORE_STATE_LAYOUTS = {
    "linear": (["gdn", "full", "gla"], {}),
    "linear-window": (["deltanet", "full"], {"deltanet": {"window": 6}}),
    "hedgehog": (["hedgehog", "full"], {}),
}
STATE_LAYOUTS = {"linear-window-sinks", *MORE_STATE_LAYOUTS}


def layout_model(tiny_config, layout):
    mixer_types, options = {**LAYOUTS, **MORE_STATE_LAYOUTS}[layout]
    model = build_model(tiny_config, mixer_types, options)
    # a windowed linear layer starts as its window's softmax attention alone (the recurrent part's scale is 0): give
    # the recurrent state a say, so that a state on the wrong row shows in the logits
    for name, parameter in model.named_parameters():
        if name.endswith("recurrent_scale"):
            parameter.data.fill_(1.0)
    return model


def assert_same_logits(layout, logits, expected):
    if layout in STATE_LAYOUTS:
        # the linear mixers' reference ops round differently at another batch size (CPU matmul blocking): up to 2.5e-6
        # measured on logits of about 3; a state left on the wrong row moves them by about 1
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    else:
        assert torch.equal(logits, expected)


def decode(model, cache, tokens):
    """Feeds `tokens` `[B, N]` one at a time through `cache`: the `[B, N, V]` logits."""
    steps = [model(tokens[:, i : i + 1], past_key_values=cache, use_cache=True).logits for i in range(tokens.shape[1])]
    return torch.cat(steps, dim=1)


def prefilled(model, prompts, cache_class=DynamicCache):
    cache = cache_class(config=model.config)
    model(prompts, past_key_values=cache, use_cache=True)
    return cache


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_deep_copied_cache_is_independent(tiny_config, layout):
    model = layout_model(tiny_config, layout)
    prompts = random_ids(2, PROMPT, seed=11)
    # 20 steps cross block boundaries, so the block means change on both copies
    ours, theirs = random_ids(2, 20, seed=12), random_ids(2, 20, seed=13)
    swap = torch.tensor([1, 0])
    with torch.no_grad():
        cache = prefilled(model, prompts)
        other = copy.deepcopy(cache)
        other.reorder_cache(swap)
        other_logits = decode(model, other, theirs)
        logits = decode(model, cache, ours)
        expected = decode(model, prefilled(model, prompts), ours)
        expected_other = decode(model, prefilled(model, prompts[swap]), theirs)
    assert_same_logits(layout, logits, expected)
    assert_same_logits(layout, other_logits, expected_other)


@pytest.mark.parametrize(
    ("operation", "argument", "rows"),
    [
        ("reorder_cache", torch.tensor([2, 0, 1]), [2, 0, 1]),
        ("batch_select_indices", torch.tensor([2, 0]), [2, 0]),
        ("batch_repeat_interleave", 2, [0, 0, 1, 1, 2, 2]),
    ],
    ids=["reorder", "select", "repeat"],
)
@pytest.mark.parametrize("layout", [*LAYOUTS, *MORE_STATE_LAYOUTS])
def test_batch_operations_keep_the_row_state_with_its_rows(tiny_config, layout, operation, argument, rows):
    model = layout_model(tiny_config, layout)
    prompts = random_ids(3, PROMPT, seed=21)
    tokens = random_ids(len(rows), 20, seed=22)
    with torch.no_grad():
        cache = prefilled(model, prompts)
        getattr(cache, operation)(argument)
        logits = decode(model, cache, tokens)
        expected = decode(model, prefilled(model, prompts[rows]), tokens)
    assert_same_logits(layout, logits, expected)


@pytest.mark.parametrize("layout", ["sliding-sinks", "linear-window-sinks"])
def test_beam_search_with_cache_matches_without(tiny_config, layout):
    # three sink tokens after a one-token prompt: two are generated, so they differ between beams, and they leave the
    # window within the new tokens
    mixer_types, options = LAYOUTS[layout]
    kind = mixer_types[0]
    options = {kind: {**options.get(kind, {}), "sink_tokens": 3}}
    model = build_model(tiny_config, mixer_types, options)
    prompts = random_ids(2, 1, seed=3)
    kwargs = {"attention_mask": torch.ones_like(prompts), "num_beams": 3, "do_sample": False, "max_new_tokens": 16}
    assert torch.equal(model.generate(prompts, **kwargs), model.generate(prompts, use_cache=False, **kwargs))


CACHE_CLASSES = {"DynamicCache": DynamicCache, "EffAttnCache": EffAttnCache}


@pytest.mark.parametrize("cache_class", list(CACHE_CLASSES))
@pytest.mark.parametrize("layout", [*LAYOUTS, "all-linear"])
def test_a_reset_cache_starts_over(tiny_config, layout, cache_class, request):
    if layout == "all-linear" and cache_class == "DynamicCache":
        pytest.skip("an all-linear model counts its tokens in an EffAttnCache only (generate and forward build one)")
    if RESET_KEEPS_KEYS and cache_class == "DynamicCache" and layout != "all-linear":
        # our layers and EffAttnCache empty themselves; a plain DynamicCache's full-attention layers are transformers'
        request.applymarker(
            pytest.mark.xfail(reason="transformers 5.17's DynamicLayer.reset keeps stale keys", strict=True)
        )
    if layout == "all-linear":
        model = build_model(tiny_config, ["gdn", "deltanet", "gla"])
    else:
        model = layout_model(tiny_config, layout)
    cache_class = CACHE_CLASSES[cache_class]
    prompts, tokens = random_ids(2, PROMPT - 11, seed=31), random_ids(2, 6, seed=32)
    with torch.no_grad():
        cache = prefilled(model, random_ids(2, PROMPT, seed=30), cache_class)
        decode(model, cache, random_ids(2, 3, seed=33))
        cache.reset()
        assert cache.get_seq_length() == 0
        row_layers = [layer for layer in cache.layers if isinstance(layer, RowStateLayerMixin)]
        assert len(row_layers) == {"all-linear": 0, "linear-window-sinks": 1}.get(layout, 2)
        assert all(getattr(layer, name) is None for layer in row_layers for name in layer.row_state)
        model(prompts, past_key_values=cache, use_cache=True)
        logits = decode(model, cache, tokens)
        expected = decode(model, prefilled(model, prompts, cache_class), tokens)
    assert cache.get_seq_length() == PROMPT - 11 + 6
    assert torch.equal(logits, expected)


def test_crop_takes_the_tokens_off_the_count(tiny_config):
    model = build_model(tiny_config, ["gdn", "deltanet"])
    cache = EffAttnCache(config=model.config)
    cache.activate_past_recording()
    with torch.no_grad():
        model(random_ids(1, 10), past_key_values=cache, use_cache=True)
    cache.crop(0)
    assert cache.get_seq_length() == 10
    cache.crop(-3)
    assert cache.get_seq_length() == 7


def test_a_cache_layer_of_another_kind_is_refused(tiny_config):
    model = layout_model(tiny_config, "sliding-sinks")
    cache = DynamicCache(config=model.config)
    cache.layers[0] = cache.layers[1]
    with pytest.raises(TypeError, match="DynamicSlidingWindowLayer"):
        model(random_ids(1, 3), past_key_values=cache, use_cache=True)


@pytest.mark.parametrize("layout", ["sliding-sinks", "linear-window-sinks"])
def test_a_cache_without_the_sink_tokens_is_refused(tiny_config, layout):
    model = layout_model(tiny_config, layout)
    cache = DynamicCache(config=model.config)
    # keys/values from elsewhere, without the sink tokens (a windowed linear layer is taken over by the model's own
    # layer class first: its sinks must still be missing, not silently empty)
    cache.update(torch.zeros(1, 2, 5, 16), torch.zeros(1, 2, 5, 16), 0)
    with pytest.raises(ValueError, match="sink tokens"):
        model(random_ids(1, 1), past_key_values=cache, use_cache=True)
