"""Saving hf_effattn checkpoints: self-contained remote code, safetensors only, written atomically."""

import contextlib
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
    "cache_layers.py",
    "mixer_full.py",
    "mixer_sliding.py",
    "mixer_linear.py",
    "mixer_hedgehog.py",
    "mixer_block_topk.py",
    "ops_reference.py",
    # Triton kernels (kernels/, linked into hf_effattn/): used on GPUs where triton imports
    "linear_attn.py",
    "linear_attn_kernels.py",
    "linear_attn_ops.py",
    "linear_mixer_fusion.py",
    "decoder_fusion.py",
    "block_topk.py",
    "block_topk_kernels.py",
    "sliding_window.py",
    "sliding_window_kernels.py",
    "decode_attention.py",
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


@contextlib.contextmanager
def atomic_folder(output_dir: str | os.PathLike):
    """Yields a temporary sibling folder to fill; on success it replaces `output_dir` in one rename.

    An interrupted write never leaves a folder that looks complete, and an existing `output_dir` is replaced only
    once the new one is complete.
    """
    output_dir = Path(output_dir).resolve()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    try:
        yield staging
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


def write_extra_files(folder: Path, extra_files: dict | None) -> None:
    """Writes `{name: text or bytes}` into `folder`."""
    for name, content in (extra_files or {}).items():
        if isinstance(content, bytes):
            (folder / name).write_bytes(content)
        else:
            (folder / name).write_text(content)


def save_checkpoint(model, output_dir: str | os.PathLike, tokenizer=None, extra_files: dict | None = None) -> Path:
    """Writes `model` (and its tokenizer, and `extra_files` {name: text or bytes}) to `output_dir` atomically
    (see `atomic_folder`), checked to be a loadable remote-code checkpoint before it takes its place."""
    with atomic_folder(output_dir) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        # save_pretrained maps only the saved class; AutoModel must resolve too
        config_path = staging / "config.json"
        config = json.loads(config_path.read_text())
        config["auto_map"] = dict(AUTO_MAP)
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        write_extra_files(staging, extra_files)
        check_remote_code(staging)
    return Path(output_dir).resolve()
