"""EffAttnConfig: validation messages, derived transformers fields, serialization and the caches it builds."""

import json

import pytest
from transformers import AutoConfig, DynamicCache
from transformers.cache_utils import (
    DynamicLayer,
    DynamicSlidingWindowLayer,
    LinearAttentionAndSlidingWindowAttentionLayer,
    LinearAttentionLayer,
)

from hf_effattn import MIXER_KINDS, EffAttnConfig

pytestmark = pytest.mark.usefixtures("torch_single_thread")

EXPECTED_LAYER_TYPES = {
    "full": "full_attention",
    "sliding": "sliding_attention",
    "gdn": "linear_attention",
    "deltanet": "linear_attention",
    "gla": "linear_attention",
    "kda": "linear_attention",
    "hedgehog": "hybrid_sliding",
    "block_topk": "full_attention",
}

EXPECTED_CACHE_LAYERS = {
    "full": DynamicLayer,
    "sliding": DynamicSlidingWindowLayer,
    "gdn": LinearAttentionLayer,
    "deltanet": LinearAttentionLayer,
    "gla": LinearAttentionLayer,
    "kda": LinearAttentionLayer,
    "hedgehog": LinearAttentionAndSlidingWindowAttentionLayer,
    "block_topk": DynamicLayer,
}


def small(**kwargs):
    defaults = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    defaults.update(kwargs)
    return EffAttnConfig(**defaults)


# (kwargs, substrings the message must contain: the field and the offending value)
CONFIG_ERRORS = [
    pytest.param(dict(mixer_types=["full", "mamba"]), ["mixer_types[1]", "'mamba'"], id="unknown-mixer-kind"),
    pytest.param(dict(hidden_size=66), ["hidden_size", "66", "num_attention_heads", "4"], id="heads-not-dividing-hidden"),
    pytest.param(
        dict(mixer_types=["sliding", "full"], mixer_options={"sliding": {"window": 0}}),
        ["mixer_options['sliding']['window']", "0"],
        id="sliding-window-zero",
    ),
    pytest.param(
        dict(mixer_types=["sliding", "full"], mixer_options={"sliding": {"window": -3}}),
        ["mixer_options['sliding']['window']", "-3"],
        id="sliding-window-negative",
    ),
    pytest.param(
        dict(mixer_types=["hedgehog", "full"], mixer_options={"hedgehog": {"window": 0}}),
        ["mixer_options['hedgehog']['window']", "0"],
        id="hedgehog-window-zero",
    ),
    pytest.param(
        dict(mixer_types=["sliding", "full"], mixer_options={"sliding": {"window": 1}}),
        ["mixer_options['sliding']['window']", "1"],
        id="sliding-window-one",
    ),
    pytest.param(
        dict(mixer_types=["hedgehog", "full"], mixer_options={"hedgehog": {"window": 1}}),
        ["mixer_options['hedgehog']['window']", "1"],
        id="hedgehog-window-one",
    ),
    pytest.param(
        dict(mixer_options={"sliding": {"window": True}}),
        ["mixer_options['sliding']['window']", "True"],
        id="window-bool",
    ),
    pytest.param(
        dict(mixer_options={"sliding": {"window": 8.0}}), ["mixer_options['sliding']['window']", "8.0"], id="window-float"
    ),
    pytest.param(
        dict(mixer_types=["full", "gdn", "full"]), ["mixer_types", "3", "num_hidden_layers", "2"], id="mixer-types-too-long"
    ),
    pytest.param(dict(mixer_types=["full"]), ["mixer_types", "1", "num_hidden_layers", "2"], id="mixer-types-too-short"),
    pytest.param(
        dict(mixer_options={"sliding": {"windw": 8}}), ["mixer_options['sliding']", "'windw'"], id="unknown-option-key"
    ),
    pytest.param(
        dict(mixer_options={"full": {"window": 8}}), ["mixer_options['full']", "'window'"], id="option-on-full"
    ),
    pytest.param(dict(mixer_options={"mamba": {}}), ["mixer_options", "'mamba'"], id="unknown-kind-in-options"),
    pytest.param(
        dict(mixer_options={"gdn": {"conv_size": 1}}), ["mixer_options['gdn']['conv_size']", "1"], id="conv-size-one"
    ),
    pytest.param(
        dict(mixer_options={"gla": {"conv_size": -2}}), ["mixer_options['gla']['conv_size']", "-2"], id="conv-size-negative"
    ),
    pytest.param(
        dict(mixer_options={"sliding": {"sink_tokens": -1}}),
        ["mixer_options['sliding']['sink_tokens']", "-1"],
        id="sink-tokens-negative",
    ),
    pytest.param(
        dict(mixer_options={"sliding": {"sink_logits": "yes"}}),
        ["mixer_options['sliding']['sink_logits']", "'yes'"],
        id="sink-logits-not-bool",
    ),
    pytest.param(
        dict(mixer_options={"gla": {"gate_normalizer": 0}}),
        ["mixer_options['gla']['gate_normalizer']", "0"],
        id="gate-normalizer-zero",
    ),
    pytest.param(
        dict(mixer_options={"gdn": {"chunk_size": 0}}), ["mixer_options['gdn']['chunk_size']", "0"], id="chunk-size-zero"
    ),
    pytest.param(
        dict(num_key_value_heads=3), ["num_key_value_heads", "3", "num_attention_heads", "4"], id="kv-heads-not-dividing"
    ),
    pytest.param(dict(num_key_value_heads=0), ["num_key_value_heads", "0"], id="kv-heads-zero"),
    pytest.param(
        dict(mixer_types=["gdn", "full"], mixer_options={"gdn": {"num_heads": 4, "num_kv_heads": 3}}),
        ["mixer_options['gdn']", "num_heads = 4", "num_kv_heads = 3"],
        id="linear-kv-heads-not-dividing",
    ),
]


@pytest.mark.parametrize("kwargs, expected", CONFIG_ERRORS)
def test_config_errors_name_field_and_value(kwargs, expected):
    with pytest.raises(ValueError) as error:
        small(**kwargs)
    message = str(error.value)
    missing = [part for part in expected if part not in message]
    assert not missing, f"message {message!r} does not mention {missing}"


def test_valid_edge_values_are_accepted():
    config = small(
        mixer_types=["sliding", "gdn"],
        mixer_options={"sliding": {"window": 2, "sink_tokens": 0}, "gdn": {"conv_size": 0}},
    )
    assert config.mixer_options["sliding"]["window"] == 2
    assert config.mixer_options["gdn"]["conv_size"] == 0


@pytest.mark.parametrize("kind", MIXER_KINDS)
def test_layer_types_derived_per_kind(kind):
    config = small(num_hidden_layers=3, mixer_types=[kind, "full", kind])
    assert config.layer_types == [EXPECTED_LAYER_TYPES[kind], "full_attention", EXPECTED_LAYER_TYPES[kind]]


def test_layer_types_and_sliding_window_for_a_hybrid():
    kinds = list(MIXER_KINDS)
    config = small(
        num_hidden_layers=len(kinds),
        mixer_types=kinds,
        mixer_options={"sliding": {"window": 8}, "hedgehog": {"window": 12}},
    )
    assert config.layer_types == [EXPECTED_LAYER_TYPES[kind] for kind in kinds]
    # the shared sliding cache keeps the largest window in use
    assert config.sliding_window == 12
    assert small(mixer_types=["gdn", "full"]).sliding_window is None
    assert small(mixer_types=["sliding", "full"], mixer_options={"sliding": {"window": 5}}).sliding_window == 5


def test_defaults_and_mixer_config_resolution():
    config = small(
        num_hidden_layers=3,
        num_key_value_heads=2,
        mixer_types=["gdn", "gla", "hedgehog"],
        mixer_options={"gla": {"num_heads": 8}, "hedgehog": {"window": 32}},
    )
    assert config.mixer_types == ["gdn", "gla", "hedgehog"]
    # unspecified kinds and keys keep their defaults
    assert config.mixer_options["sliding"]["window"] == 512
    assert config.mixer_options["hedgehog"]["chunk_size"] == 64
    gdn = config.mixer_config(0)
    assert (gdn["num_heads"], gdn["num_kv_heads"], gdn["head_dim"]) == (4, 2, 16)
    gla = config.mixer_config(1)
    # explicit heads without explicit kv heads: one kv head per head
    assert (gla["num_heads"], gla["num_kv_heads"], gla["head_dim"]) == (8, 8, 16)
    hedgehog = config.mixer_config(2)
    assert hedgehog["window"] == 32 and hedgehog["feature_dim"] == 16
    assert small().mixer_types == ["full", "full"]


def test_save_pretrained_round_trip(tmp_path):
    rope = {"rope_type": "default", "rope_theta": 500000.0}
    options = {
        "sliding": {"window": 16, "sink_tokens": 2, "sink_logits": True},
        "gdn": {"conv_size": 0, "chunk_size": 32},
        "gla": {"gate_rank": 8, "gate_normalizer": 8.0},
        "hedgehog": {"window": 8, "feature_dim": 12},
    }
    kinds = ["sliding", "gdn", "full", "gla", "hedgehog", "deltanet"]
    config = small(num_hidden_layers=len(kinds), mixer_types=kinds, mixer_options=options, rope_parameters=dict(rope))
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "effattn"
    assert saved["mixer_types"] == kinds

    for loaded in (EffAttnConfig.from_pretrained(tmp_path), AutoConfig.from_pretrained(tmp_path)):
        assert isinstance(loaded, EffAttnConfig)
        assert loaded.mixer_types == kinds
        assert loaded.mixer_options == config.mixer_options
        for kind, values in options.items():
            for key, value in values.items():
                assert loaded.mixer_options[kind][key] == value
        assert loaded.rope_parameters["rope_type"] == "default"
        assert loaded.rope_parameters["rope_theta"] == 500000.0
        assert loaded.rope_parameters == config.rope_parameters
        assert loaded.layer_types == config.layer_types
        assert loaded.sliding_window == 16
        loaded_dict, config_dict = loaded.to_dict(), config.to_dict()
        for d in (loaded_dict, config_dict):
            d.pop("_name_or_path", None)
        assert loaded_dict == config_dict


def test_derived_fields_are_recomputed_on_load(tmp_path):
    """layer_types / sliding_window read back from config.json are never trusted."""
    config = small(mixer_types=["gdn", "sliding"], mixer_options={"sliding": {"window": 16}})
    config.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    saved = json.loads(path.read_text())
    saved["layer_types"] = ["full_attention", "full_attention"]
    saved["sliding_window"] = 4096
    path.write_text(json.dumps(saved))
    loaded = EffAttnConfig.from_pretrained(tmp_path)
    assert loaded.layer_types == ["linear_attention", "sliding_attention"]
    assert loaded.sliding_window == 16


def test_dynamic_cache_builds_one_layer_per_mixer():
    kinds = list(MIXER_KINDS) + ["gdn", "full"]
    config = small(
        num_hidden_layers=len(kinds),
        mixer_types=kinds,
        mixer_options={"sliding": {"window": 8}, "hedgehog": {"window": 6}},
    )
    cache = DynamicCache(config=config)
    assert len(cache.layers) == len(kinds)
    for index, (kind, layer) in enumerate(zip(kinds, cache.layers)):
        # exact classes: DynamicSlidingWindowLayer is itself a DynamicLayer
        assert type(layer) is EXPECTED_CACHE_LAYERS[kind], f"layer {index} ({kind}): {type(layer).__name__}"
        if kind in ("sliding", "hedgehog"):
            assert layer.sliding_window == 8


def test_rope_parameters_argument_is_not_modified():
    rope = {"rope_theta": 5e4}
    config = small(rope_parameters=rope)
    assert rope == {"rope_theta": 5e4}
    assert config.rope_parameters == {"rope_theta": 5e4, "rope_type": "default"}


def test_boolean_gate_normalizer_is_rejected():
    with pytest.raises(ValueError, match=r"mixer_options\['gla'\]\['gate_normalizer'\] = True"):
        small(mixer_types=["gla", "full"], mixer_options={"gla": {"gate_normalizer": True}})
