"""`hf-effattn` end to end on the embedded teacher, and its errors on bad input."""

import json
import subprocess
import sys

import pytest


def run_cli(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "hf_effattn.cli", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.teacher
def test_convert_smoke_recipe_on_embedded_teacher(tmp_path):
    """The whole pipeline on the real teacher with a tiny budget: ranking, both stages, quality check, outputs."""
    out = tmp_path / "hybrid"
    result = run_cli("convert", "--output", str(out), "--preset", "smoke", "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "full attention in layers" in result.stdout and "held-out perplexity" in result.stdout
    report = json.loads((out / "conversion_report.json").read_text())
    layout = report["layout"]
    assert report["teacher"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and report["distilled"] is True
    assert layout["selection"] == "auto" and len(layout["full_layers"]) == 8 and len(layout["sensitivity"]) == 30
    assert layout["mixer_types"].count("gdn") == 22
    # the ranking measured something: replacing some layer alone costs the teacher loss
    assert max(s["score"] for s in layout["sensitivity"]) > 0
    assert report["stage1"]["steps"] == 2 and report["stage2"]["steps"] == 2
    assert len(report["stage1"]["layer_errors_after"]) == 22
    assert report["quality"]["perplexity"]["teacher"] > 1
    assert (out / "loss_curves.png").is_file() and (out / "README.md").is_file()
    info = run_cli("info", str(out))
    assert info.returncode == 0, info.stderr[-3000:]
    assert json.loads(info.stdout)["mixer_types"] == layout["mixer_types"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--full-share", "1.5"], "full_share = 1.5: expected a share within [0, 1]"),
        (["--window", "1"], "window = 1"),
        (["--full-layers", "a,b"], "comma-separated list"),
        (["--data", "/nonexistent/corpus.txt"], "does not exist"),
        (["--data", "stdlib+teacher", "--teacher-documents", "0"], "teacher_documents = 0"),
        (["--stage1-layer-block", "-2"], "stage1_layer_block = -2"),
        (["--teacher", "/nonexistent/model.gguf"], "does not exist"),
    ],
)
def test_convert_bad_input_fails_before_work(tmp_path, args, message):
    result = run_cli("convert", "--output", str(tmp_path / "out"), *args, timeout=300)
    assert result.returncode != 0
    assert message in result.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_mixer_is_rejected(tmp_path):
    result = run_cli("convert", "--output", str(tmp_path / "out"), "--mixer", "mamba")
    assert result.returncode == 2
    assert "invalid choice: 'mamba'" in result.stderr
