"""A saved checkpoint is self-contained remote code: it loads where hf_effattn is not installed."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from hf_effattn import EffAttnConfig, EffAttnForCausalLM
from hf_effattn.checkpoint import REMOTE_CODE_FILES, check_remote_code, save_checkpoint
from hf_effattn.configuration_effattn import MIXER_LAYER_TYPES

ALL_KINDS = sorted(MIXER_LAYER_TYPES)

# runs in a fresh interpreter where importing hf_effattn (and triton) fails, as on a machine with only torch and
# transformers
LOADER = textwrap.dedent(
    """
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("hf_effattn", "triton"):
                raise ModuleNotFoundError(f"No module named {name!r}")
    sys.meta_path.insert(0, Block())
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32).eval()
    assert "hf_effattn" not in sys.modules
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    ids = torch.load(sys.argv[2])
    with torch.no_grad():
        torch.save(model(ids).logits, sys.argv[3])
    """
)


def tiny_model():
    torch.manual_seed(0)
    config = EffAttnConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=len(ALL_KINDS),
        num_attention_heads=4,
        num_key_value_heads=2,
        mixer_types=ALL_KINDS,
        mixer_options={"sliding": {"window": 8, "sink_tokens": 2, "sink_logits": True}, "hedgehog": {"window": 6}},
    )
    return EffAttnForCausalLM(config).eval()


def test_checkpoint_is_self_contained(tmp_path):
    model = tiny_model()
    folder = save_checkpoint(model, tmp_path / "ckpt")
    check_remote_code(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_effattn.EffAttnForCausalLM"
    assert config["mixer_types"] == ALL_KINDS
    # the checkpoint carries exactly the files the modeling file imports, directly or not
    from transformers.dynamic_module_utils import get_relative_import_files

    imported = {os.path.basename(path) for path in get_relative_import_files(str(folder / "modeling_effattn.py"))}
    assert imported | {"modeling_effattn.py"} == set(REMOTE_CODE_FILES)
    for name in REMOTE_CODE_FILES:
        source = (folder / name).read_text()
        # flat: only single-dot sibling imports, never the installed package
        assert "from hf_effattn" not in source and "import hf_effattn" not in source, name
        assert "from .." not in source, name


def test_remote_code_loads_without_the_package(tmp_path):
    model = tiny_model()
    folder = save_checkpoint(model, tmp_path / "ckpt")
    ids = torch.randint(0, 97, (2, 23))
    torch.save(ids, tmp_path / "ids.pt")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    script = tmp_path / "load.py"
    script.write_text(LOADER)
    result = subprocess.run(
        [sys.executable, str(script), str(folder), str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        expected = model(ids).logits
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)


def test_save_is_atomic_and_replaces_only_when_complete(tmp_path, monkeypatch):
    model = tiny_model()
    target = tmp_path / "ckpt"
    save_checkpoint(model, target)
    before = sorted(p.name for p in target.iterdir())

    def broken_save(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(model, "save_pretrained", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(model, target)
    # the old checkpoint is intact and no partial folder is left beside it
    assert sorted(p.name for p in target.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    check_remote_code(target)


def test_check_remote_code_rejects_incomplete_folders(tmp_path):
    folder = save_checkpoint(tiny_model(), tmp_path / "ckpt")
    (folder / "mixer_linear.py").unlink()
    with pytest.raises(RuntimeError, match="mixer_linear.py"):
        check_remote_code(folder)
