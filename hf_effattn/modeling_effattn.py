"""EffAttnModel / EffAttnForCausalLM: a Llama-family decoder whose token mixer is chosen per layer.

Every mixer lives at `model.layers.{i}.self_attn` with the teacher's projection names, so a Llama, Mistral,
Qwen2 or Qwen3 checkpoint maps onto it 1:1. This file and its siblings import only torch and transformers:
they are copied, flat, into every saved checkpoint (remote code).
"""

import inspect

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import (
    Cache,
    CacheLayerMixin,
    DynamicCache,
    DynamicLayer,
    LinearAttentionAndSlidingWindowAttentionLayer,
    LinearAttentionLayer,
    StaticLayer,
)
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRotaryEmbedding

from .cache_layers import LinearStateLayer, adopt_layers, drop_keys
from .configuration_effattn import LINEAR_KINDS, EffAttnConfig
from .mixer_block_topk import BlockTopkAttention
from .mixer_common import Padding, RMSNorm, ShortConvolution, decoder_fusion_ops
from .mixer_full import FullAttention
from .mixer_hedgehog import HedgehogAttention, HedgehogFeatureMap
from .mixer_linear import DeltaNet, GatedDeltaNet, GatedLinearAttention, KimiDeltaAttention, LinearMixer
from .mixer_sliding import SinkLinearWindowLayer, SlidingWindowAttention

# transformers 5.24 renamed the cache from `past_key_values` to `cache`: in the arguments generate passes to forward,
# in model outputs, in generate's model kwargs and in the mask helpers (the old names warn, then go). These files
# take either name and use the one the installed version expects
CACHE_NAME = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
_MASK_CACHE_NAME = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


def _cache_argument(past_key_values: Cache | None, cache: Cache | None) -> Cache | None:
    if past_key_values is not None and cache is not None:
        raise ValueError("The cache was passed twice, as `past_key_values` and as `cache`: pass it once.")
    return cache if cache is not None else past_key_values


MIXER_CLASSES = {
    "full": FullAttention,
    "sliding": SlidingWindowAttention,
    "gdn": GatedDeltaNet,
    "deltanet": DeltaNet,
    "gla": GatedLinearAttention,
    "kda": KimiDeltaAttention,
    "hedgehog": HedgehogAttention,
    "block_topk": BlockTopkAttention,
}


class EffAttnDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: EffAttnConfig, layer_idx: int):
        super().__init__()
        self.mixer_type = config.mixer_types[layer_idx]
        self.self_attn = MIXER_CLASSES[self.mixer_type](config, layer_idx)
        self.mlp = LlamaMLP(config)
        # SwiGLU (Llama's MLP): its silu(gate) * up runs as one kernel at inference on a GPU
        self.swiglu = config.hidden_act in ("silu", "swish")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        past_key_values: Cache | None = None,
        query_start: int = 0,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.self_attn(
            self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            query_start=query_start,
            **kwargs,
        )
        normed, hidden_states = self.post_attention_layernorm(hidden_states, residual=residual)
        return hidden_states + self.feed_forward(normed)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = decoder_fusion_ops(x) if self.swiglu else None
        if ops is None:
            return self.mlp(x)
        mlp = self.mlp
        return mlp.down_proj(ops[1](mlp.gate_proj(x), mlp.up_proj(x)))


class EffAttnPreTrainedModel(PreTrainedModel):
    config_class = EffAttnConfig
    config: EffAttnConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["EffAttnDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = False
    # recurrent states cannot be rolled back, which assisted generation needs
    _is_stateful = True

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, ShortConvolution):
            bound = module.kernel_size**-0.5
            init.uniform_(module.weight, -bound, bound)
        elif isinstance(module, HedgehogFeatureMap):
            heads, head_dim, feature_dim = module.weight.shape
            eye = torch.eye(head_dim, feature_dim, device=module.weight.device).expand(heads, -1, -1)
            init.copy_(module.weight, eye)
        elif isinstance(module, GatedDeltaNet):
            a_log, dt_bias = module.reset_gate_parameters()
            init.copy_(module.A_log, a_log)
            init.copy_(module.dt_bias, dt_bias)
        elif isinstance(module, SlidingWindowAttention) and module.sinks is not None:
            init.zeros_(module.sinks)
        if isinstance(module, LinearMixer) and module.window:
            # a windowed linear layer starts as softmax attention over its window and sinks
            init.zeros_(module.recurrent_scale)


# transformers' cache layers of the linear mixers (with or without a window) and hedgehog, and the subclasses that
# replace them in a cache the model runs on (`adopt_layers`)
STATE_LAYER_CLASSES = {
    LinearAttentionLayer: LinearStateLayer,
    LinearAttentionAndSlidingWindowAttentionLayer: SinkLinearWindowLayer,
}


def _has_attention_layer(cache: Cache) -> bool:
    """Whether any layer of `cache` tracks tokens (an attention layer) rather than only recurrent states."""
    return any(isinstance(layer, CacheLayerMixin) for layer in cache.layers)


class EffAttnCache(DynamicCache):
    """A `DynamicCache` that also knows its length when every layer is linear (no attention layer to ask).

    The model's forward counts the tokens in `effattn_seen_tokens`; `reset` and `crop` keep that count with the
    layers.
    """

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if not _has_attention_layer(self):
            return getattr(self, "effattn_seen_tokens", 0)
        return super().get_seq_length(layer_idx)

    def reset(self) -> None:
        super().reset()
        for layer in self.layers:
            drop_keys(layer)
        self.effattn_seen_tokens = 0

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        # the layers refuse a positive count (the legacy "crop to this length"); negative counts are removed
        if tokens_to_remove < 0 and hasattr(self, "effattn_seen_tokens"):
            self.effattn_seen_tokens = max(self.effattn_seen_tokens + tokens_to_remove, 0)

    @property
    def is_compileable(self) -> bool:
        # all-linear caches would otherwise report True: generate would then turn the 2-D padding mask into a 4-D one
        # (which needs attention layers) and auto-compile the forward on GPU
        return False


def _has_static_layer(past_key_values: Cache | None) -> bool:
    return past_key_values is not None and any(isinstance(layer, StaticLayer) for layer in past_key_values.layers)


def _static_length(past_key_values: Cache) -> torch.Tensor | None:
    """The token count of a static cache (transformers' `StaticCache`) as its 0-d tensor, or None.

    A tensor, not an int, so that a compiled decode step reads it without being recompiled at every new length.
    """
    for layer in past_key_values.layers:
        if isinstance(layer, StaticLayer):
            return layer.get_seq_length() if layer.is_initialized else None
    return None


def _past_length(past_key_values: Cache | None) -> int | torch.Tensor:
    """Tokens already in the cache. All-linear caches have no attention layer to ask, so we count ourselves.

    The attention layers are asked first: they follow every cache method (`reset` and `crop` included) where our
    count follows only those of `EffAttnCache`, not those of a plain `DynamicCache` (which `generate` builds when
    some layer is attention).
    """
    if past_key_values is None:
        return 0
    static = _static_length(past_key_values)
    if static is not None:
        return static
    if _has_attention_layer(past_key_values):
        return past_key_values.get_seq_length()
    return getattr(past_key_values, "effattn_seen_tokens", 0)


class EffAttnModel(EffAttnPreTrainedModel):
    def __init__(self, config: EffAttnConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([EffAttnDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        # transformers' StaticCache serves full attention and window-free linear layers
        self.supports_static_cache = all(
            kind == "full" or (kind in LINEAR_KINDS and not config.mixer_options.get(kind, {}).get("window"))
            for kind in config.mixer_types
        )
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _causal_after_cache(self, attention_mask, past_key_values, past_length, seq_len: int) -> bool:
        """Whether the full-attention mask would only say "causal, after `past_length` cached tokens" (a chunked
        prefill without padding): the sdpa full layers then run without it (`mixer_full.offset_causal_attention`),
        as transformers' `[seq_len, past_length + seq_len]` mask is gigabytes per chunk at 1M tokens."""
        if self.config._attn_implementation != "sdpa" or seq_len == 1 or not isinstance(past_length, int):
            return False
        if past_length == 0 or past_key_values is None:
            return False
        full_layer = past_key_values.layers[self.config.mixer_types.index("full")]
        if not isinstance(full_layer, DynamicLayer) or getattr(full_layer, "is_sliding", False):
            return False
        return attention_mask is None or (attention_mask.dim() == 2 and bool(attention_mask.all()))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """`cache` is `past_key_values` under its transformers >= 5.24 name; pass either."""
        past_key_values = _cache_argument(past_key_values, cache)
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        # training never reads a cache back (and gradient checkpointing cannot keep one)
        use_cache = use_cache and not (self.training and past_key_values is None)
        if use_cache and past_key_values is None:
            past_key_values = EffAttnCache(config=self.config)
        if not use_cache:
            past_key_values = None
        if past_key_values is not None and not torch.compiler.is_compiling():
            # our subclasses of transformers' linear-state layers move those states in batch selection and repetition;
            # not inside a compiled forward, where a layer changing class between steps would recompile the graph
            adopt_layers(past_key_values, STATE_LAYER_CLASSES)
        seq_len = inputs_embeds.shape[1]
        past_length = _past_length(past_key_values)
        static_cache = isinstance(past_length, torch.Tensor)
        # refused before the first token too: the windowed mixers keep their sinks on dynamic cache layers only
        if not self.supports_static_cache and _has_static_layer(past_key_values):
            raise ValueError(
                "A static cache serves layouts of full attention and linear mixers without a window "
                f"({', '.join(LINEAR_KINDS)}); this model has other layers: use the default dynamic cache."
            )
        if position_ids is None:
            position_ids = (past_length + torch.arange(seq_len, device=inputs_embeds.device)).unsqueeze(0)
        if static_cache:
            pass  # the mask below covers the whole static buffer; a 2-D mask is checked by transformers
        elif (
            attention_mask is not None
            and attention_mask.dim() == 2
            and attention_mask.shape[1] != past_length + seq_len
        ):
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[1]} positions but the cache holds {past_length} tokens "
                f"and {seq_len} are new: pass a 2-D mask over all {past_length + seq_len} positions."
            )

        full_mask = None
        if "full" in self.config.mixer_types and not self._causal_after_cache(
            attention_mask, past_key_values, past_length, seq_len
        ):
            full_mask = create_causal_mask(
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                layer_idx=self.config.mixer_types.index("full"),
                **{_MASK_CACHE_NAME: past_key_values},
            )
        # a decode step on a static cache with no mask from the caller: the full layers' valid keys are the first
        # past_length + 1 slots of the buffer, which their decode kernel reads without the mask (a tensor: a compiled
        # step serves every length)
        kv_len = None
        if static_cache and attention_mask is None and seq_len == 1 and "full" in self.config.mixer_types:
            kv_len = past_length + 1
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        # the other mixers read the 2-D mask: what they need of it is worked out once, not in every layer
        padding = Padding(attention_mask, inputs_embeds.shape[0], seq_len, inputs_embeds.device)
        for layer in self.layers:
            if layer.mixer_type == "full":
                mask_kwargs = {"attention_mask": full_mask, "kv_len": kv_len}
            else:
                mask_kwargs = {"attention_mask": attention_mask, "padding": padding}
            hidden_states = layer(
                hidden_states,
                position_embeddings=position_embeddings,
                past_key_values=past_key_values,
                query_start=past_length,
                **mask_kwargs,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        if past_key_values is not None and not static_cache:
            past_key_values.effattn_seen_tokens = past_length + seq_len
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **{CACHE_NAME: past_key_values})


class EffAttnForCausalLM(EffAttnPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: EffAttnConfig):
        super().__init__(config)
        self.model = EffAttnModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get(CACHE_NAME)
        # generate builds a plain DynamicCache, which cannot report its length when all layers are linear
        if type(cache) is DynamicCache and not _has_attention_layer(cache):
            model_kwargs[CACHE_NAME] = EffAttnCache(config=self.config.get_text_config(decoder=True))

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """`cache` is `past_key_values` under its transformers >= 5.24 name; pass either."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=_cache_argument(past_key_values, cache),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_NAME: getattr(outputs, CACHE_NAME)})


__all__ = ["EffAttnForCausalLM", "EffAttnModel", "EffAttnPreTrainedModel"]
