"""EffAttnConfig: a Llama-family backbone whose layers each pick a token mixer.

`mixer_types` lists one mixer kind per layer; `mixer_options` holds JSON-serializable options per kind.
transformers' `layer_types` is derived from `mixer_types` with names transformers accepts, so that
`DynamicCache(config=...)`, its masks and `generate` build the right per-layer caches.
"""

import copy

from transformers import PretrainedConfig

# mixer kind -> transformers layer type (decides the per-layer cache DynamicCache builds)
MIXER_LAYER_TYPES = {
    "full": "full_attention",
    "sliding": "sliding_attention",
    "gdn": "linear_attention",
    "deltanet": "linear_attention",
    "gla": "linear_attention",
    "kda": "linear_attention",
    # a recurrent state plus a window of raw keys/values
    "hedgehog": "hybrid_sliding",
    # every key is cached; each query block reads its own block, block 0 and its top-k blocks
    "block_topk": "full_attention",
}

_LINEAR_HEADS = {"num_heads": None, "num_kv_heads": None, "head_dim": None}
# an optional softmax window (plus sink tokens) inside a linear layer; 0 turns it off
_LINEAR_WINDOW = {"window": 0, "sink_tokens": 0}
LINEAR_KINDS = ("gdn", "deltanet", "gla", "kda")

# defaults per mixer kind; `None` means "take it from the backbone" (heads, head_dim, feature size)
MIXER_DEFAULTS = {
    "full": {},
    "sliding": {"window": 512, "sink_tokens": 4, "sink_logits": False, "chunk_size": 64},
    "gdn": {**_LINEAR_HEADS, **_LINEAR_WINDOW, "conv_size": 4, "chunk_size": 64, "output_gate": True, "output_norm": True},
    "deltanet": {**_LINEAR_HEADS, **_LINEAR_WINDOW, "conv_size": 4, "chunk_size": 64, "output_gate": True, "output_norm": True},
    "gla": {
        **_LINEAR_HEADS,
        **_LINEAR_WINDOW,
        "conv_size": 0,
        "chunk_size": 64,
        "output_gate": True,
        "output_norm": True,
        "gate_rank": 16,
        "gate_normalizer": 16.0,
    },
    # Kimi Linear: the delta rule with a per-channel decay from a low-rank gate (rank None: head_dim)
    "kda": {
        **_LINEAR_HEADS,
        **_LINEAR_WINDOW,
        "conv_size": 4,
        "chunk_size": 64,
        "output_gate": True,
        "output_norm": True,
        "gate_rank": None,
    },
    "hedgehog": {"window": 64, "feature_dim": None, "chunk_size": 64},
    # MoBA/NSA-style block-sparse attention: blocks of `block_size` tokens, `top_k` selected blocks per query block
    "block_topk": {"block_size": 64, "top_k": 16, "keep_first_block": True},
}

_POSITIVE_INTS = {"window", "chunk_size", "gate_rank", "num_heads", "num_kv_heads", "head_dim", "feature_dim"}
_NON_NEGATIVE_INTS = {"sink_tokens", "conv_size"}
_BOOLS = {"sink_logits", "output_gate", "output_norm", "keep_first_block"}
# block sizes the block top-k kernels tile (powers of two)
BLOCK_TOPK_SIZES = (16, 32, 64, 128, 256)


def _check_option(kind: str, key: str, value) -> None:
    where = f"mixer_options['{kind}']['{key}']"
    if value is None and (key in _LINEAR_HEADS | {"feature_dim": None} or (kind, key) == ("kda", "gate_rank")):
        return
    if key == "window" and kind in LINEAR_KINDS:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{where} = {value!r} is invalid: expected an integer >= 0 (0: no softmax window).")
    elif key in _POSITIVE_INTS and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ValueError(f"{where} = {value!r} is invalid: expected a positive integer.")
    if key in _NON_NEGATIVE_INTS and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"{where} = {value!r} is invalid: expected an integer >= 0 (0 turns it off).")
    if key == "window" and value == 1:
        raise ValueError(f"{where} = 1 is invalid: a window must hold at least 2 tokens (the token itself and one more).")
    if key == "conv_size" and value == 1:
        raise ValueError(f"{where} = 1 is invalid: a causal convolution needs a kernel of 2 or more (0 turns it off).")
    if key in _BOOLS and not isinstance(value, bool):
        raise ValueError(f"{where} = {value!r} is invalid: expected true or false.")
    if key == "block_size" and (isinstance(value, bool) or not isinstance(value, int) or value not in BLOCK_TOPK_SIZES):
        raise ValueError(f"{where} = {value!r} is invalid: expected one of {BLOCK_TOPK_SIZES} (a power of two).")
    if key == "top_k" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{where} = {value!r} is invalid: expected a positive integer (blocks per query block).")
    if key == "gate_normalizer" and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
        raise ValueError(f"{where} = {value!r} is invalid: expected a positive number.")


def resolve_mixer_options(mixer_options: dict | None) -> dict:
    """Merges user options over the defaults of each kind; unknown kinds/keys and bad values raise."""
    resolved = copy.deepcopy(MIXER_DEFAULTS)
    for kind, options in (mixer_options or {}).items():
        if kind not in MIXER_DEFAULTS:
            raise ValueError(
                f"mixer_options has an unknown mixer kind {kind!r}; allowed kinds: {sorted(MIXER_DEFAULTS)}."
            )
        if not isinstance(options, dict):
            raise ValueError(f"mixer_options[{kind!r}] must be a dict of options, got {options!r}.")
        for key, value in options.items():
            if key not in MIXER_DEFAULTS[kind]:
                allowed = sorted(MIXER_DEFAULTS[kind]) or "none"
                raise ValueError(f"mixer_options[{kind!r}] has an unknown option {key!r}; allowed options: {allowed}.")
            _check_option(kind, key, value)
            resolved[kind][key] = value
    return resolved


class EffAttnConfig(PretrainedConfig):
    r"""Configuration of an hf_effattn hybrid causal LM.

    Backbone arguments keep transformers' Llama names (`hidden_size`, `num_attention_heads`, `rope_parameters`...);
    `attention_bias` (q/k/v) with `attention_out_bias` (o, default: same) covers Qwen2, and `qk_norm`
    Qwen3's per-head q/k RMSNorm.

    Args:
        mixer_types (`list[str]`): one of `full`, `sliding`, `gdn`, `deltanet`, `gla`, `kda`, `hedgehog`,
            `block_topk` per layer (default: all `full`).
        mixer_options (`dict[str, dict]`): options per mixer kind, e.g. `{"sliding": {"window": 256}}`; see
            `MIXER_DEFAULTS` for every key.

    Example:
        >>> config = EffAttnConfig(num_hidden_layers=4, mixer_types=["gdn", "full", "gdn", "sliding"])
        >>> config.layer_types
        ['linear_attention', 'full_attention', 'linear_attention', 'sliding_attention']
    """

    model_type = "effattn"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 1024,
        intermediate_size: int = 2816,
        num_hidden_layers: int = 16,
        num_attention_heads: int = 16,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 8192,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        rope_parameters: dict | None = None,
        attention_bias: bool = False,
        attention_out_bias: bool | None = None,
        attention_dropout: float = 0.0,
        mlp_bias: bool = False,
        qk_norm: bool = False,
        mixer_types: list[str] | None = None,
        mixer_options: dict | None = None,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | list[int] | None = 2,
        **kwargs,
    ):
        # transformers-derived fields are recomputed here; never trust copies read back from config.json
        kwargs.pop("layer_types", None)
        kwargs.pop("sliding_window", None)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = head_dim
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.attention_bias = attention_bias
        # Qwen2 has biases on q/k/v only; Llama's attention_bias covers o_proj too
        self.attention_out_bias = attention_bias if attention_out_bias is None else attention_out_bias
        self.attention_dropout = attention_dropout
        self.mlp_bias = mlp_bias
        self.qk_norm = qk_norm
        # a copy: the caller's dict is never modified
        self.rope_parameters = dict(rope_parameters) if rope_parameters is not None else None
        self.mixer_types = list(mixer_types) if mixer_types is not None else ["full"] * num_hidden_layers
        self.mixer_options = resolve_mixer_options(mixer_options)
        self._validate_backbone()
        self._validate_linear_windows()
        # a linear layer with a softmax window caches the window's keys/values next to its state
        self.layer_types = [
            "hybrid_sliding" if kind in LINEAR_KINDS and self.mixer_options[kind]["window"] else MIXER_LAYER_TYPES[kind]
            for kind in self.mixer_types
        ]
        # transformers builds sliding-window cache layers from one `sliding_window`; the cache keeps the largest
        # window in use and each mixer masks down to its own
        windowed = ("sliding", "hedgehog") + LINEAR_KINDS
        windows = [self.mixer_options[kind]["window"] for kind in self.mixer_types if kind in windowed]
        windows = [w for w in windows if w]
        self.sliding_window = max(windows) if windows else None
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        if self.rope_parameters is None:
            self.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        self.rope_parameters.setdefault("rope_type", "default")
        self.rope_parameters.setdefault("rope_theta", 10000.0)

    def _validate_backbone(self) -> None:
        if self.num_attention_heads <= 0 or self.hidden_size <= 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) and num_attention_heads ({self.num_attention_heads}) must be positive."
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads != 0:
                raise ValueError(
                    f"hidden_size = {self.hidden_size} is not divisible by num_attention_heads = "
                    f"{self.num_attention_heads}: pick a head count that divides it, or set head_dim explicitly."
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads <= 0 or self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_key_value_heads = {self.num_key_value_heads} must be positive and divide num_attention_heads = "
                f"{self.num_attention_heads} (grouped-query attention)."
            )
        if len(self.mixer_types) != self.num_hidden_layers:
            raise ValueError(
                f"mixer_types has {len(self.mixer_types)} entries but num_hidden_layers = {self.num_hidden_layers}: "
                "give exactly one mixer kind per layer."
            )
        for index, kind in enumerate(self.mixer_types):
            if kind not in MIXER_LAYER_TYPES:
                raise ValueError(
                    f"mixer_types[{index}] = {kind!r} is not a known mixer kind; allowed: {sorted(MIXER_LAYER_TYPES)}."
                )
        for kind in set(self.mixer_types) & set(LINEAR_KINDS):
            options = self.mixer_options[kind]
            heads = options["num_heads"] or self.num_attention_heads
            kv_heads = options["num_kv_heads"] or (self.num_key_value_heads if options["num_heads"] is None else heads)
            if heads % kv_heads != 0:
                raise ValueError(
                    f"mixer_options[{kind!r}]: num_heads = {heads} is not a multiple of num_kv_heads = {kv_heads}."
                )

    def _validate_linear_windows(self) -> None:
        for kind in set(self.mixer_types) & set(LINEAR_KINDS):
            options = self.mixer_options[kind]
            if not options["window"]:
                continue
            heads = (options["num_heads"], options["num_kv_heads"], options["head_dim"])
            backbone = (self.num_attention_heads, self.num_key_value_heads, self.head_dim)
            if any(mine is not None and mine != theirs for mine, theirs in zip(heads, backbone)):
                raise ValueError(
                    f"mixer_options['{kind}'] sets window = {options['window']} with heads {heads} (num_heads, "
                    f"num_kv_heads, head_dim) but the backbone has {backbone}: the softmax window runs on the "
                    "backbone's attention heads, so leave the head options unset or set window = 0."
                )

    def mixer_config(self, layer_idx: int) -> dict:
        """The resolved options of layer `layer_idx`'s mixer, with backbone defaults filled in."""
        kind = self.mixer_types[layer_idx]
        options = dict(self.mixer_options[kind])
        if "num_heads" in options:
            explicit_heads = options["num_heads"] is not None
            options["num_heads"] = options["num_heads"] or self.num_attention_heads
            default_kv = options["num_heads"] if explicit_heads else self.num_key_value_heads
            options["num_kv_heads"] = options["num_kv_heads"] or default_kv
            options["head_dim"] = options["head_dim"] or self.head_dim
        if "feature_dim" in options:
            options["feature_dim"] = options["feature_dim"] or self.head_dim
        return options


__all__ = ["MIXER_DEFAULTS", "MIXER_LAYER_TYPES", "EffAttnConfig"]
