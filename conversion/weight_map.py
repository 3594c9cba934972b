"""Building an EffAttn model from a Llama, Mistral, Qwen2 or Qwen3 teacher.

Every mixer keeps the teacher's projection names (`model.layers.{i}.self_attn.{q,k,v,o}_proj`), so the map is the
identity on the teacher's keys; it is declared as data and checked both ways: a teacher key with no destination,
or a student weight the teacher should provide but does not, raises.
"""

import re

import torch

from hf_effattn import EffAttnConfig, EffAttnForCausalLM

from .teachers import TeacherError, check_family

# teacher key pattern -> student key pattern ({i}: layer index); the same for every mixer kind
WEIGHT_MAP = {
    "model.embed_tokens.weight": "model.embed_tokens.weight",
    "model.norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    "model.layers.{i}.input_layernorm.weight": "model.layers.{i}.input_layernorm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "model.layers.{i}.mlp.up_proj.weight": "model.layers.{i}.mlp.up_proj.weight",
    "model.layers.{i}.mlp.down_proj.weight": "model.layers.{i}.mlp.down_proj.weight",
    "model.layers.{i}.mlp.gate_proj.bias": "model.layers.{i}.mlp.gate_proj.bias",
    "model.layers.{i}.mlp.up_proj.bias": "model.layers.{i}.mlp.up_proj.bias",
    "model.layers.{i}.mlp.down_proj.bias": "model.layers.{i}.mlp.down_proj.bias",
    **{
        f"model.layers.{{i}}.self_attn.{name}.{kind}": f"model.layers.{{i}}.self_attn.{name}.{kind}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj")
        for kind in ("weight", "bias")
    },
    # Qwen3
    "model.layers.{i}.self_attn.q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "model.layers.{i}.self_attn.k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
}

# teacher keys that carry no weights (recomputed buffers)
IGNORED_TEACHER_KEYS = (re.compile(r".*rotary_emb\.inv_freq$"),)


def _compile_map():
    compiled = []
    for source, target in WEIGHT_MAP.items():
        pattern = re.compile("^" + re.escape(source).replace(r"\{i\}", r"(?P<i>\d+)") + "$")
        compiled.append((pattern, target))
    return compiled


_COMPILED_MAP = _compile_map()


def select_full_layers(num_layers: int, share: float) -> list[int]:
    """Evenly spaced full-attention layers, `round(share * num_layers)` of them, the last layer included."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"The share of full-attention layers must be within [0, 1], got {share}.")
    count = round(share * num_layers)
    return sorted({(k + 1) * num_layers // count - 1 for k in range(count)}) if count else []


def teacher_layer_mixers(teacher_config) -> list[str]:
    """The mixer kind that reproduces each teacher layer exactly: `full`, or `sliding` for sliding-window layers."""
    layer_types = getattr(teacher_config, "layer_types", None) or []
    window = getattr(teacher_config, "sliding_window", None)
    use_sliding = getattr(teacher_config, "use_sliding_window", True)
    mixers = []
    for i in range(teacher_config.num_hidden_layers):
        kind = layer_types[i] if i < len(layer_types) else ("sliding_attention" if window else "full_attention")
        mixers.append("sliding" if kind == "sliding_attention" and window and use_sliding else "full")
    return mixers


def config_from_teacher(teacher_config, mixer_types=None, mixer_options=None, **overrides) -> EffAttnConfig:
    """An EffAttnConfig with the teacher's backbone; `mixer_types=None` reproduces the teacher exactly."""
    check_family(teacher_config)
    family = teacher_config.model_type
    exact = teacher_layer_mixers(teacher_config)
    options = {kind: dict(values) for kind, values in (mixer_options or {}).items()}
    if "sliding" in exact:
        # the teacher's own sliding-window layers: exact window, no sinks
        options.setdefault("sliding", {}).update(window=teacher_config.sliding_window, sink_tokens=0)
    if mixer_types is None:
        mixer_types = exact
    attention_bias = bool(getattr(teacher_config, "attention_bias", False)) or family == "qwen2"
    rope = dict(teacher_config.rope_parameters or {}) if hasattr(teacher_config, "rope_parameters") else None
    fields = dict(
        vocab_size=teacher_config.vocab_size,
        hidden_size=teacher_config.hidden_size,
        intermediate_size=teacher_config.intermediate_size,
        num_hidden_layers=teacher_config.num_hidden_layers,
        num_attention_heads=teacher_config.num_attention_heads,
        num_key_value_heads=teacher_config.num_key_value_heads,
        head_dim=getattr(teacher_config, "head_dim", None)
        or teacher_config.hidden_size // teacher_config.num_attention_heads,
        hidden_act=teacher_config.hidden_act,
        max_position_embeddings=teacher_config.max_position_embeddings,
        rms_norm_eps=teacher_config.rms_norm_eps,
        tie_word_embeddings=bool(getattr(teacher_config, "tie_word_embeddings", False)),
        rope_parameters=rope,
        attention_bias=attention_bias,
        # Qwen2 puts biases on q/k/v only
        attention_out_bias=False if family == "qwen2" else attention_bias,
        mlp_bias=bool(getattr(teacher_config, "mlp_bias", False)),
        qk_norm=family == "qwen3",
        mixer_types=list(mixer_types),
        mixer_options=options,
        bos_token_id=teacher_config.bos_token_id,
        eos_token_id=teacher_config.eos_token_id,
        pad_token_id=teacher_config.pad_token_id,
    )
    fields.update(overrides)
    return EffAttnConfig(**fields)


def map_teacher_state_dict(teacher_state: dict, num_layers: int, tied: bool) -> dict:
    """Renames teacher weights to student names; unknown teacher keys raise `TeacherError`."""
    mapped, unknown = {}, []
    for key, tensor in teacher_state.items():
        if any(p.match(key) for p in IGNORED_TEACHER_KEYS) or (tied and key == "lm_head.weight"):
            continue
        for pattern, target in _COMPILED_MAP:
            match = pattern.match(key)
            if match and (match.groupdict().get("i") is None or int(match["i"]) < num_layers):
                mapped[target.format(i=match.groupdict().get("i"))] = tensor
                break
        else:
            unknown.append(key)
    if unknown:
        raise TeacherError(
            f"The teacher has {len(unknown)} weight(s) with no place in the hybrid, e.g. {unknown[:5]}: it is not a "
            "plain Llama/Mistral/Qwen2/Qwen3 decoder. Convert a supported architecture."
        )
    return mapped


def effattn_from_teacher(teacher, mixer_types=None, mixer_options=None, dtype=torch.float32, **overrides):
    """Builds an EffAttnForCausalLM from a loaded teacher model.

    Attention projections (and every backbone weight) are copied; mixer parameters the teacher lacks (gates,
    decays, convolutions, feature maps) keep their initialisation. `block_topk` layers have no parameters of their
    own: they start as the teacher's attention over their selected blocks (the teacher itself while every earlier
    block fits in `top_k`). Returns `(model, new_parameter_names)`.
    """
    config = config_from_teacher(teacher.config, mixer_types, mixer_options, **overrides)
    state = map_teacher_state_dict(teacher.state_dict(), config.num_hidden_layers, config.tie_word_embeddings)
    model = EffAttnForCausalLM(config).to(dtype)
    student = model.state_dict()
    if config.tie_word_embeddings:
        student.pop("lm_head.weight", None)
    shape_errors = [
        f"{key}: teacher {tuple(value.shape)} vs hybrid {tuple(student[key].shape)}"
        for key, value in state.items()
        if key in student and value.shape != student[key].shape
    ]
    if shape_errors:
        raise TeacherError(f"Teacher weights do not fit the hybrid's shapes: {shape_errors[:5]}.")
    orphans = [key for key in state if key not in student]
    if orphans:
        raise TeacherError(f"The hybrid has no place for teacher weights {orphans[:5]}.")
    # student weights that the teacher should have provided (backbone or projections of an attention layer)
    expected = [key for key in student if _is_teacher_weight(key)]
    missing = [key for key in expected if key not in state]
    if missing:
        raise TeacherError(f"The teacher checkpoint is missing {len(missing)} weight(s), e.g. {missing[:5]}.")
    model.load_state_dict(state, strict=False)
    new_parameters = [key for key in student if key not in state]
    return model.eval(), new_parameters


def _is_teacher_weight(key: str) -> bool:
    generic = re.sub(r"\.\d+\.", ".{i}.", key, count=1)
    return generic in WEIGHT_MAP.values()
