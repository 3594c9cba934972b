"""Saving hf_effattn checkpoints: self-contained remote code, safetensors only, written atomically."""

import json
import os
import shutil
import tempfile
from pathlib import Path

# the flat files every checkpoint carries (the modeling file and everything it imports, relatively)
REMOTE_CODE_FILES = (
    "configuration_effattn.py",
    "modeling_effattn.py",
    "mixer_common.py",
    "mixer_full.py",
    "mixer_sliding.py",
    "mixer_linear.py",
    "mixer_hedgehog.py",
    "ops_reference.py",
)

AUTO_MAP = {
    "AutoConfig": "configuration_effattn.EffAttnConfig",
    "AutoModel": "modeling_effattn.EffAttnModel",
    "AutoModelForCausalLM": "modeling_effattn.EffAttnForCausalLM",
}


def check_remote_code(folder: str | os.PathLike) -> None:
    """Raises if `folder` is not a loadable remote-code checkpoint (auto_map, code files, safetensors weights)."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    if config.get("auto_map") != AUTO_MAP:
        raise RuntimeError(f"{folder}/config.json has auto_map {config.get('auto_map')}, expected {AUTO_MAP}.")
    missing = [name for name in REMOTE_CODE_FILES if not (folder / name).is_file()]
    if missing:
        raise RuntimeError(f"{folder} lacks the remote-code files {missing}.")
    if not list(folder.glob("*.safetensors")):
        raise RuntimeError(f"{folder} has no .safetensors weights.")
    if list(folder.glob("*.bin")) or list(folder.glob("*.pt")):
        raise RuntimeError(f"{folder} holds pickle weights; checkpoints are safetensors only.")


def save_checkpoint(model, output_dir: str | os.PathLike, tokenizer=None, extra_files: dict | None = None) -> Path:
    """Writes `model` (and its tokenizer, and `extra_files` {name: text or bytes}) to `output_dir` atomically.

    Everything is written to a temporary sibling folder first, checked, then renamed into place, so an interrupted
    save never leaves a folder that looks complete. An existing `output_dir` is replaced only after the new one is
    complete.
    """
    output_dir = Path(output_dir).resolve()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        # save_pretrained maps only the saved class; AutoModel must resolve too
        config_path = staging / "config.json"
        config = json.loads(config_path.read_text())
        config["auto_map"] = dict(AUTO_MAP)
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        for name, content in (extra_files or {}).items():
            if isinstance(content, bytes):
                (staging / name).write_bytes(content)
            else:
                (staging / name).write_text(content)
        check_remote_code(staging)
        if output_dir.exists():
            retired = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
            os.replace(output_dir, retired)
            os.replace(staging, output_dir)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, output_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return output_dir
