"""The weight map reproduces Llama, Mistral, Qwen2 and Qwen3 exactly when every mixer is `full`."""

import pytest
import torch
import transformers

from hf_effattn.conversion import config_from_teacher, effattn_from_teacher, map_teacher_state_dict, select_full_layers
from hf_effattn.conversion.teachers import TeacherError, load_teacher

SMALL = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2)

FAMILIES = [
    pytest.param(transformers.LlamaConfig(**SMALL, tie_word_embeddings=True), id="llama-tied"),
    pytest.param(
        transformers.LlamaConfig(
            **SMALL,
            attention_bias=True,
            mlp_bias=True,
            rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        ),
        id="llama3-rope-bias",
    ),
    pytest.param(transformers.MistralConfig(**SMALL, sliding_window=16), id="mistral-window16"),
    pytest.param(transformers.Qwen2Config(**SMALL), id="qwen2"),
    pytest.param(transformers.Qwen3Config(**SMALL, head_dim=24), id="qwen3-headdim24"),
]


def random_teacher(config):
    torch.manual_seed(0)
    teacher = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for parameter in teacher.parameters():
            # non-trivial norms, biases and q/k norms
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return teacher


@pytest.mark.parametrize("teacher_config", FAMILIES)
def test_all_full_reproduces_teacher_logits(teacher_config):
    teacher = random_teacher(teacher_config)
    model, new_parameters = effattn_from_teacher(teacher)
    assert new_parameters == []
    ids = torch.randint(0, 101, (2, 57))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            expected = teacher(ids, **kwargs).logits
            got = model(ids, **kwargs).logits
            rows = slice(None) if not kwargs else (1, slice(9, None))
            diff = (got[rows] - expected[rows]).abs().max().item()
            assert diff <= 1e-4, (kwargs.keys(), diff)


@pytest.mark.parametrize("teacher_config", FAMILIES)
def test_hybrid_takes_teacher_projections(teacher_config):
    teacher = random_teacher(teacher_config)
    model, new_parameters = effattn_from_teacher(teacher, mixer_types=["gdn", "full", "hedgehog"])
    layers = teacher.model.layers
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        for i in (0, 2):
            assert torch.equal(getattr(model.model.layers[i].self_attn, name).weight, getattr(layers[i].self_attn, name).weight)
    assert "model.layers.0.self_attn.A_log" in new_parameters
    assert "model.layers.2.self_attn.feature_map_q.weight" in new_parameters
    assert not any(key.startswith("model.layers.1.") for key in new_parameters)


def test_unknown_teacher_weight_raises():
    teacher = random_teacher(transformers.LlamaConfig(**SMALL))
    state = dict(teacher.state_dict())
    state["model.layers.0.self_attn.rel_bias"] = torch.zeros(3)
    with pytest.raises(TeacherError, match="rel_bias"):
        map_teacher_state_dict(state, 3, tied=False)


def test_missing_teacher_weight_raises(monkeypatch):
    teacher = random_teacher(transformers.LlamaConfig(**SMALL))
    state = {k: v for k, v in teacher.state_dict().items() if "layers.1.mlp.up_proj" not in k}
    monkeypatch.setattr(teacher, "state_dict", lambda: state)
    with pytest.raises(TeacherError, match="missing 1 weight"):
        effattn_from_teacher(teacher)


def test_unsupported_family_raises():
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2)
    with pytest.raises(TeacherError, match="Unsupported teacher architecture 'gpt2'"):
        config_from_teacher(config)


def test_missing_teacher_file_raises(tmp_path):
    with pytest.raises(TeacherError, match="does not exist"):
        load_teacher(tmp_path / "absent.gguf")
    with pytest.raises(TeacherError, match="no config.json"):
        load_teacher(tmp_path)


def test_gguf_without_gguf_package_raises(tmp_path, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    with pytest.raises(TeacherError, match="pip install gguf"):
        load_teacher(path)


@pytest.mark.parametrize(
    ("layers", "share", "expected"),
    [(30, 0.25, [2, 6, 10, 14, 17, 21, 25, 29]), (4, 0.25, [3]), (8, 0.0, []), (5, 1.0, [0, 1, 2, 3, 4])],
)
def test_select_full_layers(layers, share, expected):
    assert select_full_layers(layers, share) == expected


def test_select_full_layers_rejects_bad_share():
    with pytest.raises(ValueError, match=r"within \[0, 1\]"):
        select_full_layers(10, 1.5)
