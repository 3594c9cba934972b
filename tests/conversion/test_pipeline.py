"""The conversion pipeline end to end on a tiny random Llama teacher: outputs, stages, bad input, kill and resume."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_effattn.checkpoint import check_remote_code
from hf_effattn.conversion.data import DataError
from hf_effattn.conversion.distill import AttentionTransferLoss, capture_attention, choose_full_layers, chunked_kl
from hf_effattn.conversion.pipeline import REPORT_NAME, ConversionError, convert
from hf_effattn.conversion.recipe import RecipeError, make_recipe
from hf_effattn.conversion.teachers import TeacherError
from hf_effattn.conversion.weight_map import effattn_from_teacher
from hf_effattn.conversion.workdir import WorkDir, WorkDirError

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def quiet(*args, **kwargs):
    pass


def test_convert_writes_a_complete_remote_code_checkpoint(tiny_teacher, tmp_path):
    recipe = make_recipe("smoke", full_share=0.5, stage1_steps=3, stage2_steps=3, answer_weight=5.0)
    out = convert(str(tiny_teacher), tmp_path / "hybrid", recipe, log=quiet)
    check_remote_code(out)
    report = json.loads((out / REPORT_NAME).read_text())
    layout = report["layout"]
    assert layout["selection"] == "auto" and len(layout["full_layers"]) == 2
    assert [s["layer"] for s in layout["sensitivity"]] == [0, 1, 2, 3]
    replaced = [i for i, kind in enumerate(layout["mixer_types"]) if kind == "gdn"]
    assert len(replaced) == 2
    assert sorted(map(int, report["stage1"]["layer_errors_after"])) == replaced
    for stage in ("stage1", "stage2"):
        assert report[stage]["steps"] == 3 and report[stage]["tokens"] == 3 * 256
        assert all(loss > 0 and loss == loss for loss in report[stage]["losses"])
    quality = report["quality"]
    assert quality["perplexity"]["ratio"] > 0 and set(quality["passkey"]["hybrid"]) == {"256"}
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the card parses; a local teacher folder has no hub id, so the card names no base_model
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers" and card.data.base_model is None and "## Measured" in card.text
    assert not WorkDir(out).root.exists()

    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert model.config.mixer_types == layout["mixer_types"]
    assert model.config.mixer_options["gdn"]["window"] == 64
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("def f(x): return x", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(ids).logits).all()
    # LoRA was merged: no adapter weights in the checkpoint
    assert not any("lora" in key for key in load_file(out / "model.safetensors"))

    with pytest.raises(ConversionError, match="--overwrite"):
        convert(str(tiny_teacher), out, recipe, log=quiet)


def test_auto_layout_keeps_the_most_sensitive_layers():
    scores = [{"layer": i, "score": s} for i, s in enumerate([0.1, 0.9, -0.2, 0.5, 0.3, 0.0, 0.7, 0.2])]
    assert choose_full_layers(make_recipe(full_share=0.25), 8, scores) == [1, 6]
    assert choose_full_layers(make_recipe(full_share=0.25, full_layers="uniform"), 8, scores) == [3, 7]
    assert choose_full_layers(make_recipe(full_layers=[5, 2, 5]), 8, scores) == [2, 5]
    assert choose_full_layers(make_recipe(full_share=0.0), 8, scores) == []


def test_attention_transfer_lowers_the_layer_error(tiny_teacher):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    torch.manual_seed(0)
    student, new = effattn_from_teacher(teacher, ["gdn", "full", "gdn", "full"], {"gdn": {"chunk_size": 16}})
    for name, p in student.named_parameters():
        p.requires_grad_(name in new)
    loss_fn = AttentionTransferLoss(student, [0, 2])
    ids = torch.randint(0, 400, (2, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = teacher(ids).logits
    records, rotary = capture_attention(teacher, [0, 2], ids)
    # the teacher stops after layer 2's attention; the records are those of a longer pass, and the model still
    # runs as before afterwards
    longer, _ = capture_attention(teacher, [0, 2, 3], ids)
    for i in (0, 2):
        assert all(torch.equal(a, b) for a, b in zip(records[i], longer[i]))
    with torch.no_grad():
        assert torch.equal(teacher(ids).logits, logits)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    first = None
    for _ in range(40):
        loss, per_layer = loss_fn(records, rotary)
        first = per_layer if first is None else first
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    final = loss_fn(records, rotary)[1]
    assert (final < 0.7 * first).all(), (first, final)


def test_weighted_kl_scales_each_position_and_keeps_the_token_mean():
    torch.manual_seed(0)
    hidden = torch.randn(2, 2100, 8)  # more positions than one KL chunk
    head = torch.nn.Linear(8, 11)
    teacher_logits = torch.randn(2, 2100, 11)
    logits_fn = lambda start, stop: teacher_logits[:, start:stop]  # noqa: E731
    plain, _ = chunked_kl(hidden, head, logits_fn, 1.0)
    ones, _ = chunked_kl(hidden, head, logits_fn, 1.0, weights=torch.ones(2, 2100))
    torch.testing.assert_close(ones, plain)
    per_position = (teacher_logits.softmax(-1) * (teacher_logits.log_softmax(-1) - head(hidden).log_softmax(-1))).sum(-1)
    weights = torch.ones(2, 2100)
    weights[1, 2050:2060] = 11.0
    weighted, _ = chunked_kl(hidden, head, logits_fn, 1.0, weights=weights)
    torch.testing.assert_close(weighted, plain + 10.0 * per_position[1, 2050:2060].sum() / per_position.numel())


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (dict(full_share=1.5), RecipeError, "within \\[0, 1\\]"),
        (dict(full_layers=[0, 9]), RecipeError, "out of range"),
        (dict(window=1), RecipeError, "at least 2 tokens"),
        (dict(answer_weight=-1.0), RecipeError, "answer_weight"),
        (dict(stage1_layer_block=-1), RecipeError, "stage1_layer_block"),
        (dict(data="stdlib+teacher", teacher_documents=0), RecipeError, "--teacher-documents"),
        (dict(data="stdlib+"), DataError, "empty part"),
    ],
)
def test_bad_recipes_fail_before_training(tiny_teacher, tmp_path, overrides, error, message):
    with pytest.raises(error, match=message):
        convert(str(tiny_teacher), tmp_path / "out", make_recipe("smoke", **overrides), log=quiet)
    assert not (tmp_path / "out").exists() and not WorkDir(tmp_path / "out").root.exists()


def test_bad_teacher_or_data_fail_before_training(tiny_teacher, tmp_path):
    with pytest.raises(TeacherError):
        convert(str(tmp_path / "missing-model"), tmp_path / "out", make_recipe("smoke"), log=quiet)
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(TeacherError, match="gpt2"):
        convert(str(gpt2), tmp_path / "out", make_recipe("smoke"), log=quiet)
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(DataError, match="holds no text"):
        convert(str(tiny_teacher), tmp_path / "out", make_recipe("smoke", data=str(tmp_path / "empty.txt")), log=quiet)
    assert not (tmp_path / "out").exists() and not WorkDir(tmp_path / "out").root.exists()


def test_a_work_folder_of_another_recipe_is_not_resumed(tmp_path):
    work = WorkDir(tmp_path / "out")
    assert work.open({"recipe": {"stage2_steps": 10}}) is False
    assert work.open({"recipe": {"stage2_steps": 10}}) is True
    with pytest.raises(WorkDirError, match="different settings.*recipe"):
        work.open({"recipe": {"stage2_steps": 20}})


# ------------------------------------------------------------------------------------------------ kill and resume

RESUME_ARGS = ["--preset", "smoke", "--full-share", "0.5", "--stage1-steps", "30", "--stage2-steps", "60",
               "--save-every", "1", "--max-new-tokens", "0"]


def _command(teacher, out):
    return [sys.executable, "-m", "hf_effattn.cli", "convert", "--teacher", str(teacher), "--output", str(out),
            *RESUME_ARGS]


def _env():
    # one thread: identical arithmetic in every run, and no oversubscription on small machines
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run_and_kill(teacher, out, checkpoint_name, timeout=240):
    """Starts the conversion and SIGKILLs it as soon as `checkpoint_name` exists in the work folder."""
    work = WorkDir(out)
    errors = out.with_name(out.name + ".stderr")
    with open(errors, "wb") as stderr:
        process = subprocess.Popen(_command(teacher, out), env=_env(), stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.time() + timeout
    while not work.path(checkpoint_name).exists():
        if process.poll() is not None:
            raise AssertionError(f"the run ended before {checkpoint_name} appeared: {errors.read_text()[-2000:]}")
        if time.time() > deadline:
            process.kill()
            raise AssertionError(f"{checkpoint_name} never appeared")
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return torch.load(work.path(checkpoint_name), weights_only=True)["step"]


def _run_to_end(teacher, out):
    result = subprocess.run(_command(teacher, out), env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_killed_conversion_resumes_to_the_same_model(tiny_teacher, tmp_path):
    reference = tmp_path / "reference"
    _run_to_end(tiny_teacher, reference)

    out = tmp_path / "interrupted"
    stage1_step = _run_and_kill(tiny_teacher, out, "stage1-checkpoint.pt")
    work = WorkDir(out)
    assert not out.exists() and not work.path("stage1.pt").exists(), "the kill should land inside stage 1"
    assert 1 <= stage1_step < 30
    stage2_step = _run_and_kill(tiny_teacher, out, "stage2-checkpoint.pt")
    assert not out.exists() and not work.path("stage2.pt").exists(), "the kill should land inside stage 2"
    assert 1 <= stage2_step < 60
    log = _run_to_end(tiny_teacher, out)
    assert "resuming" in log and "stage1: done in an earlier run" in log

    expected, actual = load_file(reference / "model.safetensors"), load_file(out / "model.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    losses = [json.loads((folder / REPORT_NAME).read_text())["stage2"]["losses"] for folder in (reference, out)]
    assert losses[0] == losses[1]


def test_layer_ranking_measures_increases_from_the_teacher_itself(tiny_teacher):
    """Swapping a layer for itself changes nothing; swapping in a fresh mixer moves the loss away from the teacher's."""
    from hf_effattn.conversion.data import load_documents
    from hf_effattn.conversion.distill import rank_layers

    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher)
    documents = load_documents("stdlib", "train")[:50]
    recipe = make_recipe("smoke", mixer="sliding", window=2, sink_tokens=0)
    scores = rank_layers(teacher, tokenizer, recipe, documents)
    assert [s["layer"] for s in scores] == [0, 1, 2, 3]
    # a window of two tokens changes every layer of a random model, in either direction, but by little
    assert all(0 < abs(s["text_loss_increase"]) < 1.0 for s in scores), scores
    # a window as long as the sequence is the teacher's own attention: zero increase
    exact = rank_layers(teacher, tokenizer, make_recipe("smoke", mixer="sliding", window=4096, sink_tokens=0),
                        documents)
    assert all(abs(s["score"]) < 1e-5 for s in exact), exact


def test_teacher_written_text_joins_the_data_and_is_not_written_twice(tiny_teacher, tmp_path):
    from hf_effattn.conversion.data import load_documents
    from hf_effattn.conversion.teacher_text import teacher_prompts

    recipe = make_recipe("smoke", data="stdlib+teacher", teacher_documents=3, teacher_document_tokens=8,
                         full_layers="uniform", stage1_steps=1, stage2_steps=1, eval_lengths=[], eval_ppl_blocks=0)
    out = convert(str(tiny_teacher), tmp_path / "hybrid", recipe, keep_work=True, log=quiet)
    report = json.loads((out / REPORT_NAME).read_text())
    stdlib = len(load_documents("stdlib"))
    assert report["data"] == {"source": "stdlib+teacher", "documents": stdlib + 3, "teacher_documents": 3}
    cache = WorkDir(out).path("teacher-text-00000.json")
    documents = json.loads(cache.read_text())
    # the tiny teacher has no chat template: each document is its prompt, then the answer
    assert [d.split("\n\n")[0] for d in documents] == teacher_prompts(3, seed=recipe.seed)
    card = (out / "README.md").read_text()
    assert "3 documents the teacher wrote itself" in card
    assert all(option in card for option in ("--data stdlib+teacher ", "--teacher-documents 3 ",
                                             "--teacher-document-tokens 8 ")), card

    # the rerun resumes from the work folder and reads the documents there instead of writing them again
    before = cache.stat()
    logs = []
    convert(str(tiny_teacher), out, recipe, overwrite=True, keep_work=True, log=logs.append)
    assert any("resuming" in line for line in logs) and any("3 documents written by the teacher" in line
                                                          for line in logs), logs
    after = cache.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


# ------------------------------------------------------------------------------------------- stage 1 in blocks

# layer 3 keeps full attention (uniform, a quarter); layers 0, 1 and 2 become pure linear layers (no window: the
# random teacher's attention, nearly uniform, is matched by the window alone, and training would move nothing);
# no stage 2, no passkey check
BLOCKS = dict(full_layers="uniform", full_share=0.25, window=0, stage1_steps=30, stage2_steps=0, eval_lengths=[])
BLOCKS_ARGS = ["--preset", "smoke", "--full-layers", "uniform", "--full-share", "0.25", "--window", "0",
               "--stage1-steps", "30", "--stage2-steps", "0", "--eval-lengths", "", "--stage1-layer-block", "2",
               "--max-new-tokens", "0"]


def test_stage1_in_blocks_of_layers(tiny_teacher, tmp_path):
    together = convert(str(tiny_teacher), tmp_path / "together", make_recipe("smoke", **BLOCKS), log=quiet)
    # a block at least as large as the model is all layers together
    whole = convert(str(tiny_teacher), tmp_path / "whole", make_recipe("smoke", stage1_layer_block=4, **BLOCKS),
                    log=quiet)
    expected, actual = load_file(together / "model.safetensors"), load_file(whole / "model.safetensors")
    assert all(torch.equal(expected[key], actual[key]) for key in expected)
    reports = [json.loads((folder / REPORT_NAME).read_text())["stage1"] for folder in (together, whole)]
    assert reports[0] == {**reports[1], "seconds": reports[0]["seconds"],
                          "blocks": [{**reports[1]["blocks"][0], "seconds": reports[0]["blocks"][0]["seconds"]}]}
    assert [b["layers"] for b in reports[0]["blocks"]] == [[0, 1, 2]]

    # blocks of two layers, [0, 1] then [2], each trained 30 steps; killed inside the second, then resumed
    logs = []
    reference = convert(str(tiny_teacher), tmp_path / "reference",
                        make_recipe("smoke", stage1_layer_block=2, save_every=1, **BLOCKS), log=logs.append)
    assert any("stage1-block1: layers [2] (2 of 2 blocks)" in line for line in logs), logs
    report = json.loads((reference / REPORT_NAME).read_text())
    stage1 = report["stage1"]
    assert [b["layers"] for b in stage1["blocks"]] == [[0, 1], [2]]
    assert stage1["steps"] == 60 and stage1["tokens"] == 2 * 30 * 256
    for block in stage1["blocks"]:
        assert block["steps"] == 30 and block["error_after"] < 0.5 * block["error_before"], block
        layers = block["layers"]
        assert block["error_after"] == pytest.approx(
            sum(stage1["layer_errors_after"][str(i)] for i in layers) / len(layers))
    # a layer learns nearly the same in a block as with all layers together (each layer's error depends on its own
    # parameters only), up to the gradient clipping, which sees the norm of the block's gradients only (measured:
    # within 0.6%)
    torch.testing.assert_close(stage1["layer_errors_after"], reports[0]["layer_errors_after"], rtol=0.02, atol=0)
    card = (reference / "README.md").read_text()
    assert "2 layer(s) at a time (2 blocks)" in card and "layers 0,1:" in card

    out = tmp_path / "interrupted"
    command = [sys.executable, "-m", "hf_effattn.cli", "convert", "--teacher", str(tiny_teacher), "--output",
               str(out), *BLOCKS_ARGS, "--save-every", "1"]
    work = WorkDir(out)
    with open(tmp_path / "stderr.txt", "wb") as stderr:
        process = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.time() + 240
    while not work.path("stage1-block1-checkpoint.pt").exists():
        assert process.poll() is None, (tmp_path / "stderr.txt").read_text()[-2000:]
        assert time.time() < deadline, "no checkpoint of the second block appeared"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    step = torch.load(work.path("stage1-block1-checkpoint.pt"), weights_only=True)["step"]
    assert 1 <= step < 30 and work.path("stage1-block0.pt").exists() and not work.path("stage1.pt").exists()
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stage1-block0: done in an earlier run" in result.stdout
    assert f"stage1-block1: resuming at step {step} of 30" in result.stdout
    expected, actual = load_file(reference / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(expected[key], actual[key]) for key in expected)
    assert json.loads((out / REPORT_NAME).read_text())["stage1"]["losses"] == stage1["losses"]


# ------------------------------------------------------------------------------------------------ two processes

# with text the teacher writes: 20 documents, two batches of generation, one per process
DDP = dict(full_share=0.5, stage1_steps=3, stage2_steps=12, data="stdlib+teacher", teacher_documents=20,
           teacher_document_tokens=8)
DDP_ARGS = ["--preset", "smoke", "--full-share", "0.5", "--stage1-steps", "3", "--stage2-steps", "12",
            "--data", "stdlib+teacher", "--teacher-documents", "20", "--teacher-document-tokens", "8",
            "--max-new-tokens", "0"]


def _torchrun(teacher, out, batch_size):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
            "hf_effattn.cli", "convert", "--teacher", str(teacher), "--output", str(out), *DDP_ARGS,
            "--batch-size", str(batch_size)]


def test_two_processes_convert_like_one_and_resume(tiny_teacher, tmp_path):
    """DDP on two CPU processes (gloo), one sample each per step, against one process with both samples: the same
    data, the same losses and nearly the same weights. The two-process run is killed inside stage 2 and resumed by
    the same command; only the main process logs and writes, and one checkpoint results. Each process writes one of
    the two batches of teacher text, and both read both."""
    recipe = make_recipe("smoke", batch_size=2, **DDP)
    single = convert(str(tiny_teacher), tmp_path / "single", recipe, log=quiet)

    out = tmp_path / "ddp"
    work = WorkDir(out)
    with open(tmp_path / "killed.stderr", "wb") as stderr:
        process = subprocess.Popen(_torchrun(tiny_teacher, out, 1), env=_env(), stdout=subprocess.DEVNULL,
                                   stderr=stderr)
    deadline = time.time() + 240
    while not work.path("stage2-checkpoint.pt").exists():
        assert process.poll() is None, (tmp_path / "killed.stderr").read_text()[-3000:]
        assert time.time() < deadline, "no stage-2 checkpoint appeared"
        time.sleep(0.01)
    # torchrun passes SIGTERM on to both workers, which end at once (no handler)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    step = torch.load(work.path("stage2-checkpoint.pt"), weights_only=True)["step"]
    assert 1 <= step < 12 and not out.exists(), "the kill should land inside stage 2"

    # the work folder belongs to a two-process run: one process may not take it over
    with pytest.raises(WorkDirError, match="processes"):
        convert(str(tiny_teacher), out, make_recipe("smoke", batch_size=1, **DDP), log=quiet)

    result = subprocess.run(_torchrun(tiny_teacher, out, 1), env=_env(), capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    for line in ("resuming the unfinished conversion", "stage1: done in an earlier run", "saved "):
        assert result.stdout.count(line) == 1, result.stdout
    assert f"stage2: resuming at step {step}" in result.stdout
    # one checkpoint and nothing else: no work folder, no partial folder of the other process
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["ddp", "single"]

    reports = [json.loads((folder / REPORT_NAME).read_text()) for folder in (single, out)]
    assert [r["processes"] for r in reports] == [1, 2]
    assert reports[0]["data"] == reports[1]["data"] and reports[0]["data"]["teacher_documents"] == 20
    assert reports[0]["layout"] == reports[1]["layout"]
    for stage in ("stage1", "stage2"):
        assert reports[0][stage]["tokens"] == reports[1][stage]["tokens"] == (3 if stage == "stage1" else 12) * 2 * 256
        # each process averages its own sample; the all-reduce averages the two: only rounding differs
        torch.testing.assert_close(reports[1][stage]["losses"], reports[0][stage]["losses"], rtol=1e-4, atol=1e-6)
    errors = [{int(k): v for k, v in r["stage1"]["layer_errors_after"].items()} for r in reports]
    torch.testing.assert_close(errors[1], errors[0], rtol=1e-4, atol=1e-6)
    # Adam turns rounding noise of near-zero gradients into steps of up to lr, so weights match less closely than
    # the losses (measured: at most 4e-6)
    expected, actual = (load_file(folder / "model.safetensors") for folder in (single, out))
    assert expected.keys() == actual.keys()
    for key in expected:
        relative = ((actual[key] - expected[key]).norm() / expected[key].norm().clamp_min(1e-12)).item()
        assert relative < 1e-4, (key, relative)
