"""`hf-effattn publish` on a real converted tiny checkpoint: the dry-run listing, each failing check with its message,
adapters pointed at their base's hub id, and the offline and unreachable-Hub paths (nothing uploaded)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from huggingface_hub import HfApi

from hf_effattn import cli
from hf_effattn.conversion.pipeline import convert
from hf_effattn.conversion.recipe import make_recipe
from hf_effattn.model_cards.publish import PublishError, check_folder, folder_files, publish

REPO_ID = "my-org/tiny-hybrid"


@pytest.fixture(scope="module")
def converted(tiny_teacher, tmp_path_factory, torch_single_thread):
    """A tiny hybrid from `convert` whose card names REPO_ID: ready to publish."""
    out = tmp_path_factory.mktemp("publish") / "tiny-hybrid"
    recipe = make_recipe("smoke", full_share=0.5, eval_lengths=[], eval_ppl_blocks=0)
    convert(str(tiny_teacher), out, recipe, log=lambda *a: None)
    assert cli.main(["card", str(out), "--repo-id", REPO_ID, "--license", "apache-2.0"]) == 0
    return out


@pytest.fixture
def folder(converted, tmp_path):
    return shutil.copytree(converted, tmp_path / "tiny-hybrid")


@pytest.fixture
def no_hub(monkeypatch):
    """Every HfApi call fails the test: nothing may reach the Hub."""
    calls = []
    for name in ("create_repo", "create_branch", "upload_folder", "create_commit", "preupload_lfs_files"):
        monkeypatch.setattr(HfApi, name, lambda *a, _name=name, **k: calls.append(_name))
    yield calls
    assert calls == [], f"the Hub was called: {calls}"


def test_dry_run_lists_exactly_the_files_that_would_go(folder, capsys, no_hub):
    (folder / ".cache").mkdir()
    (folder / ".cache" / "lock").write_text("")
    assert cli.main(["publish", str(folder), "--repo-id", REPO_ID, "--dry-run"]) == 0
    out = capsys.readouterr().out
    files = folder_files(folder)
    assert f"would upload the checkpoint {folder} to https://huggingface.co/{REPO_ID} (branch main): " \
           f"{len(files)} files" in out
    listed = [line.split()[-1] for line in out.splitlines() if line.startswith("  ")]
    assert listed == files and ".cache/lock" not in listed
    assert {"config.json", "model.safetensors", "modeling_effattn.py", "tokenizer.json", "README.md",
            "conversion_report.json"} <= set(files)
    assert out.rstrip().endswith("dry run: every check passed; nothing was uploaded")


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _drop_auto_map(folder):
    data = json.loads((folder / "config.json").read_text())
    del data["auto_map"]
    (folder / "config.json").write_text(json.dumps(data))


BREAKAGES = {
    "auto_map": (_drop_auto_map, "config.json has no auto_map for AutoModelForCausalLM"),
    "imported-file": (lambda f: (f / "mixer_linear.py").unlink(), "needs mixer_linear.py, which is missing"),
    "pickle": (lambda f: torch.save({}, f / "pytorch_model.bin"), "pickle files ['pytorch_model.bin']"),
    "no-safetensors": (lambda f: (f / "model.safetensors").unlink(), "no .safetensors weights"),
    "tokenizer": (lambda f: [(f / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")],
                  "no tokenizer files"),
    "no-card": (lambda f: (f / "README.md").unlink(), "no README.md model card"),
    "card-yaml": (lambda f: (f / "README.md").write_text("---\ntags: [a\n---\n"), "front matter does not parse"),
    "placeholder": (lambda f: cli.main(["card", str(f)]), "still names the placeholder repository"),
    "other-repo": (lambda f: cli.main(["card", str(f), "--repo-id", "my-org/other"]),
                   f"usage snippets load my-org/other, not {REPO_ID}"),
    "local-path": (lambda f: _edit_json(f / "conversion_report.json", teacher_spec="/home/me/teachers/tiny"),
                   "conversion_report.json holds the local path(s) '/home/me/teachers/tiny'"),
    "windows-path": (lambda f: (f / "notes.md").write_text("trained from C:\\Users\\me\\data"),
                     "notes.md holds the local path(s) 'C:\\\\Users'"),
    "adapter-beside-weights": (lambda f: (f / "adapter_config.json").write_text("{}"),
                               "sit beside the full weights"),
}


@pytest.mark.parametrize("case", list(BREAKAGES))
def test_each_failing_check_has_its_message(folder, case, no_hub, capsys):
    breakage, message = BREAKAGES[case]
    breakage(folder)
    with pytest.raises(PublishError) as error:
        publish(folder, REPO_ID, log=lambda *a: None)
    assert message in str(error.value) and "nothing was uploaded" in str(error.value)
    # the command line prints the same and exits with 2, uploading nothing
    assert cli.main(["publish", str(folder), "--repo-id", REPO_ID, "--dry-run"]) == 2
    assert message in capsys.readouterr().err


def test_adapter_base_path_is_refused_then_rewritten_to_a_hub_id(converted, tmp_path, no_hub):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(converted, trust_remote_code=True)
    adapter = tmp_path / "adapter"
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(adapter)
    AutoTokenizer.from_pretrained(converted).save_pretrained(adapter)
    with pytest.raises(PublishError, match="base_model_name_or_path is '/.*not the base model's hub id") as error:
        check_folder(adapter, "my-org/tiny-adapter")
    assert "adapter_config.json holds the local path(s)" in str(error.value)
    publish(adapter, "my-org/tiny-adapter", dry_run=True, base_repo_id=REPO_ID, log=lambda *a: None)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == REPO_ID
    assert check_folder(adapter).kind == "adapter"


def test_offline_fails_fast_and_uploads_nothing(folder):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "hf_effattn.cli", "publish", str(folder), "--repo-id", REPO_ID],
                            capture_output=True, text=True, timeout=120, env=env, check=False)
    assert result.returncode == 2
    assert "HF_HUB_OFFLINE is set, so the Hub cannot be reached: nothing was uploaded" in result.stderr


def test_unreachable_hub_uploads_nothing(folder, monkeypatch):
    calls = []

    def unreachable(*args, **kwargs):
        calls.append("create_repo")
        raise ConnectionError("Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(HfApi, "create_repo", unreachable)
    monkeypatch.setattr(HfApi, "upload_folder", lambda *a, **k: calls.append("upload_folder"))
    with pytest.raises(PublishError, match="Cannot reach the Hub .*nothing was uploaded"):
        publish(folder, REPO_ID, log=lambda *a: None)
    assert calls == ["create_repo"]


def test_upload_sends_exactly_the_checked_files_in_one_commit(folder, monkeypatch):
    sent = {}

    class Commit:
        commit_url = f"https://huggingface.co/{REPO_ID}/commit/abc"

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: sent.setdefault("repo", repo_id))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kwargs: sent.update(kwargs) or Commit())
    (folder / ".hidden").write_text("not uploaded")
    assert publish(folder, REPO_ID, log=lambda *a: None) == Commit.commit_url
    assert sent["repo"] == REPO_ID and sent["repo_id"] == REPO_ID and sent["folder_path"] == str(folder)
    assert sent["allow_patterns"] == folder_files(folder) and ".hidden" not in sent["allow_patterns"]
