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
def test_convert_default_recipe_on_embedded_teacher(tmp_path):
    out = tmp_path / "hybrid"
    result = run_cli("convert", "--output", str(out), "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "UNTRAINED" in result.stdout
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["full_layers"] == [2, 6, 10, 14, 17, 21, 25, 29]
    assert report["mixer_types"].count("gdn") == 22 and report["distilled"] is False
    info = run_cli("info", str(out))
    assert info.returncode == 0, info.stderr[-3000:]
    assert json.loads(info.stdout)["mixer_types"] == report["mixer_types"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--full-share", "1.5"], "--full-share must be within [0, 1]"),
        (["--full-layers", "0,99"], "out of range"),
        (["--full-layers", "a,b"], "comma-separated list"),
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
