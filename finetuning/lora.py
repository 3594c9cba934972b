"""PEFT LoRA for hybrids: targets derived from the model, mixer parameters through `modules_to_save`, merging to a
standalone checkpoint, and adapter metadata for publishing.

Every mixer kind keeps the teacher's `q_proj/k_proj/v_proj/o_proj` and adds its own projections (`g_proj`, the
output gate of linear mixers; `a_proj`/`b_proj`, the decay and write-strength inputs of Gated DeltaNet and
DeltaNet; `gk_proj.0/1` and `f_proj.0/1`, the low-rank decays of GLA and KDA). The default LoRA targets are every
`nn.Linear` found inside the model's mixers, so a hybrid of any mix of kinds is covered (names differ across layer
types, and a fixed list would silently miss some).

LoRA cannot reach mixer parameters that are not linear layers: short convolutions, the output norm, Hedgehog
feature maps. With `train_mixer_params` they are trained whole through PEFT's `modules_to_save` (saved in the
adapter), together with the small gate and decay projections. PEFT saves whole modules only, so parameters held
directly by a mixer module (`A_log` and `dt_bias` of Gated DeltaNet, `recurrent_scale` of windowed linear mixers,
sliding-window `sinks`) stay frozen unless the whole mixer is listed (`modules_to_save=["self_attn"]`, which trains
every mixer fully instead of through LoRA).
"""

import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = (ADAPTER_CONFIG, "adapter_model.safetensors", "adapter_model.bin")
MLP_PREFIX = "mlp"
MIXER_PREFIX = "self_attn"
# mixer submodules trained whole with `train_mixer_params`: gate/decay projections (one value per head, or a
# low-rank gate), short convolutions, the gated output's norm, Hedgehog feature maps
MIXER_PARAMETER_MODULES = (
    "a_proj", "b_proj", "gk_proj", "f_proj", "conv1d", "output.o_norm", "feature_map_q", "feature_map_k"
)


class AdapterError(ValueError):
    pass


def _decoder_layers(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.layers


def linear_module_names(model, prefix: str) -> list[str]:
    """`prefix.name` of every nn.Linear under each decoder layer's `prefix` module (e.g. `self_attn.q_proj`)."""
    names = set()
    for layer in _decoder_layers(model):
        for name, module in getattr(layer, prefix).named_modules():
            if isinstance(module, nn.Linear):
                names.add(f"{prefix}.{name}")
    return sorted(names)


def mixer_modules_to_save(model) -> list[str]:
    """The `MIXER_PARAMETER_MODULES` present in the model, as `self_attn.NAME`."""
    present = set()
    for layer in _decoder_layers(model):
        names = {name for name, _ in layer.self_attn.named_modules()}
        present.update(name for name in MIXER_PARAMETER_MODULES if name in names)
    return [f"{MIXER_PREFIX}.{name}" for name in MIXER_PARAMETER_MODULES if name in present]


def unreachable_mixer_parameters(model) -> list[str]:
    """Kinds of parameters held directly by mixer modules, which neither LoRA nor per-module saving reaches."""
    names = set()
    for layer in _decoder_layers(model):
        names.update(name for name, _ in layer.self_attn.named_parameters(recurse=False))
    return sorted(names)


def default_target_modules(model, include_mlp: bool = False, train_mixer_params: bool = False) -> list[str]:
    """LoRA targets: every linear layer of every mixer kind in `model` (plus the MLP's with `include_mlp`)."""
    targets = linear_module_names(model, MIXER_PREFIX)
    if include_mlp:
        targets += linear_module_names(model, MLP_PREFIX)
    if train_mixer_params:
        # trained whole through modules_to_save instead
        saved = tuple(mixer_modules_to_save(model))
        targets = [name for name in targets if not name.startswith(saved)]
    return targets


def _check_names_exist(model, names: list[str], option: str) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    module_names = [name for name, _ in base.named_modules()]
    missing = [name for name in names if not any(m == name or m.endswith(f".{name}") for m in module_names)]
    if missing:
        linear = linear_module_names(model, MIXER_PREFIX) + linear_module_names(model, MLP_PREFIX)
        raise AdapterError(
            f"{option} {missing} match no module of this model; its linear layers are {linear} (names match a "
            "module's full name or its ending, e.g. 'q_proj' or 'self_attn.q_proj')."
        )


def lora_config(
    model,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.0,
    target_modules: list[str] | None = None,
    include_mlp: bool = False,
    train_mixer_params: bool = False,
    modules_to_save: list[str] | None = None,
):
    """A PEFT `LoraConfig` for `model` (task CAUSAL_LM), with targets and modules_to_save resolved and checked."""
    from peft import LoraConfig

    if target_modules:
        _check_names_exist(model, target_modules, "target_modules")
        targets = list(target_modules)
    else:
        targets = default_target_modules(model, include_mlp, train_mixer_params)
    saved = list(modules_to_save or [])
    _check_names_exist(model, saved, "modules_to_save")
    if train_mixer_params:
        saved += [name for name in mixer_modules_to_save(model) if name not in saved]
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        modules_to_save=saved or None,
    )


# ------------------------------------------------------------------------------------------------- merging


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict:
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise AdapterError(
            f"{adapter_dir} is not a PEFT adapter folder (no {ADAPTER_CONFIG}); pass the --output folder of "
            "`hf-effattn finetune`."
        )
    return json.loads(path.read_text())


def load_adapter_model(adapter_dir: str | os.PathLike, base: str | os.PathLike | None = None, dtype=torch.float32):
    """(PeftModel, base path): the base hybrid with the adapter applied, for inference."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = read_adapter_config(adapter_dir)
    base_path = str(base or config.get("base_model_name_or_path") or "")
    if not base_path:
        raise AdapterError(f"{adapter_dir}/{ADAPTER_CONFIG} names no base model: pass --base DIR.")
    try:
        model = AutoModelForCausalLM.from_pretrained(base_path, trust_remote_code=True, dtype=dtype)
    except OSError as error:
        raise AdapterError(
            f"The adapter's base model {base_path!r} could not be loaded ({error}). Pass the base checkpoint "
            "folder with --base DIR."
        ) from None
    if model.config.model_type != "effattn":
        raise AdapterError(f"The base model {base_path!r} is a {model.config.model_type!r} model, not an hf_effattn "
                           "hybrid.")
    return PeftModel.from_pretrained(model.eval(), str(adapter_dir)).eval(), base_path


def _merged_card(adapter_dir: Path, adapter_config: dict, base_path: str) -> str:
    """A model card naming the base by its hub id when the fine-tuning recorded one (else by its path)."""
    report = adapter_dir / "finetune_report.json"
    recorded = json.loads(report.read_text()).get("base_repo_id") if report.is_file() else None
    base = recorded or adapter_config.get("base_model_name_or_path") or base_path
    return (
        "---\n"
        "library_name: transformers\n"
        "pipeline_tag: text-generation\n"
        f"base_model: {base}\n"
        "base_model_relation: finetune\n"
        "tags: [hf_effattn, custom_code, lora, merged]\n"
        "---\n\n"
        f"LoRA adapter (rank {adapter_config.get('r')}) merged into the hybrid `{base}`.\n\n"
        "```python\n"
        "from transformers import AutoModelForCausalLM\n\n"
        'model = AutoModelForCausalLM.from_pretrained("PATH", trust_remote_code=True)\n'
        "```\n"
    )


def _saved_dtype(base_path: str) -> str | None:
    """The dtype a local base checkpoint was saved in (config.json), or None."""
    config = Path(base_path) / "config.json"
    if not config.is_file():
        return None
    values = json.loads(config.read_text())
    return values.get("dtype") or values.get("torch_dtype")


def merge_adapter(
    adapter_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    base: str | os.PathLike | None = None,
    dtype: str = "auto",
    overwrite: bool = False,
) -> Path:
    """Merges a LoRA adapter into its base hybrid and writes a standalone remote-code checkpoint.

    The merge runs in fp32; `dtype` ("auto": the base checkpoint's dtype, "fp32" or "bf16") is the saved precision.
    The output holds no adapter files, so transformers loads the merged weights, never the adapter (peft#1381).
    """
    from transformers import AutoTokenizer

    from hf_effattn.checkpoint import save_checkpoint

    output = Path(output_dir).resolve()
    if output == Path(adapter_dir).resolve():
        raise AdapterError("--output must differ from the adapter folder.")
    if output.exists() and not overwrite:
        raise AdapterError(f"{output} already exists: pass --overwrite to replace it.")
    if dtype not in ("auto", "fp32", "bf16"):
        raise AdapterError(f"dtype = {dtype!r}: expected 'auto', 'fp32' or 'bf16'.")
    adapter_config = read_adapter_config(adapter_dir)
    model, base_path = load_adapter_model(adapter_dir, base)
    merged = model.merge_and_unload()
    if dtype == "bf16" or (dtype == "auto" and _saved_dtype(base_path) == "bfloat16"):
        merged = merged.to(torch.bfloat16)
    has_tokenizer = (Path(adapter_dir) / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir) if has_tokenizer else base_path)
    path = save_checkpoint(merged, output, tokenizer,
                           {"README.md": _merged_card(Path(adapter_dir), adapter_config, base_path)})
    leftovers = [name for name in ADAPTER_FILES if (path / name).exists()]
    if leftovers:
        raise AdapterError(f"{path} holds adapter files {leftovers}; transformers would load the adapter instead.")
    return path


# ------------------------------------------------------------------------------------------------ publishing


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)


def rewrite_adapter_base(adapter_dir: str | os.PathLike, hub_id: str) -> None:
    """Points an adapter at its base model's hub id instead of a local path, before publishing.

    Rewrites `base_model_name_or_path` in adapter_config.json, and in README.md the front matter's `base_model`,
    the `base_model:adapter:...` tag and every other mention of the old path.
    """
    from huggingface_hub import ModelCard
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(hub_id)
    except HFValidationError as error:
        raise AdapterError(f"{hub_id!r} is not a valid hub id ({error}); expected 'org/name'.") from None
    folder = Path(adapter_dir)
    config = read_adapter_config(folder)
    old = config.get("base_model_name_or_path")
    config["base_model_name_or_path"] = hub_id
    _atomic_write_text(folder / ADAPTER_CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")

    readme = folder / "README.md"
    text = readme.read_text(encoding="utf-8") if readme.is_file() else "---\nlibrary_name: peft\n---\n"
    if old:
        text = text.replace(str(old), hub_id)
    card = ModelCard(text)
    card.data.base_model = hub_id
    card.data.library_name = card.data.library_name or "peft"
    tags = [tag for tag in (card.data.tags or []) if not tag.startswith("base_model:adapter:")]
    card.data.tags = [*tags, f"base_model:adapter:{hub_id}"]
    _atomic_write_text(readme, str(card))

    report = folder / "finetune_report.json"
    if report.is_file():
        data = json.loads(report.read_text())
        data["base_model"] = hub_id
        _atomic_write_text(report, json.dumps(data, indent=2) + "\n")
