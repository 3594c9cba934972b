"""LoRA targets on every mixer kind, mixer parameters through modules_to_save, adapter metadata for publishing."""

import json

import pytest
import torch
from huggingface_hub import ModelCard
from peft import get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils.other import ModulesToSaveWrapper
from torch import nn
from transformers import AutoModelForCausalLM

from hf_effattn.finetuning.lora import (
    AdapterError,
    lora_config,
    read_adapter_config,
    rewrite_adapter_base,
    unreachable_mixer_parameters,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def load(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def linear_layers(model, prefix: str) -> dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules()
            if f".{prefix}." in name and isinstance(module, nn.Linear) and ".lora_" not in name
            and "base_layer" not in name and "modules_to_save" not in name and "original_module" not in name}


def test_default_targets_cover_every_linear_layer_of_every_mixer(tiny_hybrid):
    model = load(tiny_hybrid)
    mixer_linears = linear_layers(model, "self_attn")
    # the kind-specific projections are there to be covered
    names = {name.split("self_attn.", 1)[1] for name in mixer_linears}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "a_proj", "b_proj", "output.g_proj", "gk_proj.0",
            "gk_proj.1"} <= names
    peft_model = get_peft_model(model, lora_config(model, r=4))
    wrapped = {name for name, module in peft_model.named_modules() if isinstance(module, LoraLayer)}
    assert {f"base_model.model.{name}" for name in mixer_linears} == wrapped
    assert not any(".mlp." in name or "lm_head" in name for name in wrapped)

    model = load(tiny_hybrid)
    mlp_linears = linear_layers(model, "mlp")
    peft_model = get_peft_model(model, lora_config(model, r=4, include_mlp=True))
    wrapped = {name for name, module in peft_model.named_modules() if isinstance(module, LoraLayer)}
    assert {f"base_model.model.{name}" for name in {**mixer_linears, **mlp_linears}} == wrapped


def test_mixer_parameters_train_whole_through_modules_to_save(tiny_hybrid):
    model = load(tiny_hybrid)
    config = lora_config(model, r=4, train_mixer_params=True)
    assert config.modules_to_save == ["self_attn.a_proj", "self_attn.b_proj", "self_attn.gk_proj", "self_attn.conv1d",
                                      "self_attn.output.o_norm", "self_attn.feature_map_q", "self_attn.feature_map_k"]
    peft_model = get_peft_model(model, config)
    saved = {name.removeprefix("base_model.model.model.layers.") for name, module in peft_model.named_modules()
             if isinstance(module, ModulesToSaveWrapper)}
    # layers: 0 full, 1 sliding, 2 gdn, 3 deltanet, 4 gla, 5 hedgehog
    assert saved == {
        "2.self_attn.a_proj", "2.self_attn.b_proj", "2.self_attn.conv1d", "2.self_attn.output.o_norm",
        "3.self_attn.b_proj", "3.self_attn.conv1d", "3.self_attn.output.o_norm",
        "4.self_attn.gk_proj", "4.self_attn.conv1d", "4.self_attn.output.o_norm",
        "5.self_attn.feature_map_q", "5.self_attn.feature_map_k",
    }
    # whole modules are not also LoRA targets
    lora_names = [name for name, module in peft_model.named_modules() if isinstance(module, LoraLayer)]
    assert not any(part in name for name in lora_names for part in ("a_proj", "b_proj", "gk_proj"))
    assert unreachable_mixer_parameters(peft_model) == ["A_log", "dt_bias", "recurrent_scale", "sinks"]


def test_unknown_target_modules_are_rejected(tiny_hybrid):
    model = load(tiny_hybrid)
    with pytest.raises(AdapterError, match=r"target_modules \['wq'\] match no module.*self_attn.q_proj"):
        lora_config(model, target_modules=["q_proj", "wq"])
    with pytest.raises(AdapterError, match=r"modules_to_save \['gates'\] match no module"):
        lora_config(model, modules_to_save=["gates"])


def test_rewrite_adapter_base_replaces_local_paths(tiny_hybrid, tmp_path):
    model = load(tiny_hybrid)
    local = str(tiny_hybrid)
    assert model.name_or_path == local
    adapter = tmp_path / "adapter"
    get_peft_model(model, lora_config(model, r=4)).save_pretrained(adapter)
    (adapter / "finetune_report.json").write_text(json.dumps({"base_model": local, "steps": 3}))
    assert local in (adapter / "README.md").read_text()

    rewrite_adapter_base(adapter, "my-org/tiny-hybrid")
    assert read_adapter_config(adapter)["base_model_name_or_path"] == "my-org/tiny-hybrid"
    card = ModelCard.load(adapter / "README.md")
    assert card.data.base_model == "my-org/tiny-hybrid" and card.data.library_name == "peft"
    assert "base_model:adapter:my-org/tiny-hybrid" in card.data.tags
    assert json.loads((adapter / "finetune_report.json").read_text()) == {"base_model": "my-org/tiny-hybrid", "steps": 3}
    for path in adapter.iterdir():
        if path.suffix in (".json", ".md"):
            assert local not in path.read_text(), path.name
    with pytest.raises(AdapterError, match="not a valid hub id"):
        rewrite_adapter_base(adapter, "not a/valid//id")
    with pytest.raises(AdapterError, match="not a PEFT adapter folder"):
        rewrite_adapter_base(tmp_path, "my-org/tiny-hybrid")
