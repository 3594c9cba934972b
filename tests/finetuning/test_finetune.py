"""`finetune` and `merge` end to end on a tiny six-kind hybrid: the loss falls, only trainable weights move, merged
equals unmerged, adapters load where hf_effattn is not installed (PEFT and lm-eval), runs resume after a kill, and
bad input fails before training."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_effattn.checkpoint import check_remote_code
from hf_effattn.cli import main
from hf_effattn.conversion.workdir import WorkDir
from hf_effattn.finetuning import FinetuneConfig, finetune, load_adapter_model, merge_adapter
from hf_effattn.finetuning.data import collate
from hf_effattn.finetuning.lora import ADAPTER_FILES, read_adapter_config, rewrite_adapter_base
from hf_effattn.finetuning.trainer import (
    CHECKPOINT_NAME,
    REPORT_NAME,
    CausalLMLoss,
    enable_activation_checkpointing,
    load_examples,
    make_accelerator,
    prepare_model,
    train,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TRAINED = FinetuneConfig(max_steps=40, batch_size=8, lr=1e-2, eval_share=0.25, lora_r=8,
                         train_mixer_params=True, save_every=100, base_repo_id="my-org/tiny-hybrid")


def quiet(*args, **kwargs):
    pass


@pytest.fixture(scope="module")
def adapter(tiny_hybrid, colour_data, tmp_path_factory):
    return finetune(tiny_hybrid, colour_data, tmp_path_factory.mktemp("trained") / "adapter", TRAINED, log=quiet)


@pytest.fixture(scope="module")
def token_ids():
    # longer than every window and chunk of the tiny hybrid
    return torch.randint(0, 400, (2, 41), generator=torch.Generator().manual_seed(1))


def test_finetuning_lowers_the_loss_on_a_synthetic_task(adapter, tiny_hybrid):
    report = json.loads((adapter / REPORT_NAME).read_text())
    before, after = report["history"]["eval"][0], report["history"]["eval"][-1]
    assert (before["step"], after["step"]) == (0, 40)
    assert after["loss"] < 0.6 * before["loss"], report["history"]["eval"]
    assert report["data"]["train_examples"] == 36 and report["data"]["eval_examples"] == 12
    assert report["base_model"] == str(tiny_hybrid) and report["base_repo_id"] == "my-org/tiny-hybrid"
    assert "self_attn.conv1d" in report["lora"]["modules_to_save"]
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json"} <= {
        p.name for p in adapter.iterdir()}
    # the adapter points at the local base until it is published
    assert read_adapter_config(adapter)["base_model_name_or_path"] == str(tiny_hybrid)
    assert not WorkDir(adapter).root.exists()


def test_training_changes_only_the_trainable_weights(tiny_hybrid, colour_data, tmp_path):
    config = FinetuneConfig(max_steps=4, batch_size=4, lr=1e-2, lora_r=4, include_mlp=True, train_mixer_params=True,
                            save_every=100)
    tokenizer = AutoTokenizer.from_pretrained(tiny_hybrid)
    train_examples, _, _ = load_examples(tokenizer, colour_data, config)
    accelerator = make_accelerator()
    model = prepare_model(tiny_hybrid, config, accelerator.device)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    workdir = WorkDir(tmp_path / "out")
    workdir.open({})
    train(model, train_examples, [], config, accelerator, workdir, tokenizer.eos_token_id, log=quiet)
    changed, unchanged = [], []
    for name, p in model.named_parameters():
        (changed if not torch.equal(before[name], p.detach()) else unchanged).append(name)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    # every adapter weight and every whole-trained module moved; nothing else did
    assert set(changed) == trainable
    assert any("modules_to_save" in name and "feature_map_k" in name for name in changed)
    assert any(".mlp.down_proj.lora_B" in name for name in changed)
    assert all("lora_" not in name and "modules_to_save" not in name for name in unchanged)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_hybrid, colour_data):
    config = FinetuneConfig(lora_r=4, train_mixer_params=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_hybrid)
    examples, _, _ = load_examples(tokenizer, colour_data, config)
    batch = collate(examples[:4], tokenizer.eos_token_id)
    model = prepare_model(tiny_hybrid, config, torch.device("cpu")).train()
    # LoRA B starts at zero, which would leave A without gradient
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    loss_module = CausalLMLoss(model)

    def gradients():
        model.zero_grad(set_to_none=True)
        loss_module(**batch).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}

    plain = gradients()
    enable_activation_checkpointing(model.get_base_model())
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_packed_bf16_accumulated_run(tiny_hybrid, colour_data, tmp_path):
    config = FinetuneConfig(max_steps=6, batch_size=2, grad_accum=2, packing=True, max_length=64, lr=1e-2,
                            precision="bf16", gradient_checkpointing=True, eval_share=0.25, lora_r=4)
    out = finetune(tiny_hybrid, colour_data, tmp_path / "adapter", config, log=quiet)
    report = json.loads((out / REPORT_NAME).read_text())
    losses = report["history"]["losses"]
    assert len(losses) == 6 and all(0 < loss < 20 for loss in losses)
    # the chats (46 or 70 tokens) run on across the 64-token blocks, uncut
    unpacked, _, _ = load_examples(AutoTokenizer.from_pretrained(tiny_hybrid), colour_data,
                                   FinetuneConfig(eval_share=0.25))
    assert report["data"]["truncated"] == 0 and report["data"]["eval_truncated"] > 0
    assert report["data"]["train_blocks"] == -(-sum(len(e.input_ids) for e in unpacked) // 64)
    # 6 steps x 2 micro-batches x 2 blocks of 64 tokens, one of which may be the shorter last block
    assert 6 * 2 * 2 * 64 - 64 < report["history"]["tokens"] <= 6 * 2 * 2 * 64
    assert report["history"]["eval"][-1]["loss"] < report["history"]["eval"][0]["loss"]


def test_merged_checkpoint_equals_the_adapter_model(adapter, tiny_hybrid, token_ids, tmp_path):
    merged_dir = merge_adapter(adapter, tmp_path / "merged")
    check_remote_code(merged_dir)
    assert not [name for name in ADAPTER_FILES if (merged_dir / name).exists()]
    weights = load_file(merged_dir / "model.safetensors")
    assert weights.keys() == load_file(tiny_hybrid / "model.safetensors").keys()
    # the card names the base by the hub id recorded at fine-tuning time
    assert "base_model: my-org/tiny-hybrid" in (merged_dir / "README.md").read_text()

    adapted, _ = load_adapter_model(adapter)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_hybrid, dtype=torch.float32).eval()
    with torch.no_grad():
        expected, actual, original = (m(token_ids).logits for m in (adapted, merged, base))
    difference = (actual - expected).abs().max().item()
    print(f"merged vs adapter max abs diff: {difference:.2e}")
    assert difference <= 1e-4
    assert (original - expected).abs().max().item() > 1e-2, "the adapter should change the model"

    # once published, the adapter names a hub id: the local base is passed explicitly
    published = tmp_path / "published"
    shutil.copytree(adapter, published)
    rewrite_adapter_base(published, "my-org/tiny-hybrid")
    again = merge_adapter(published, tmp_path / "merged-bf16", base=tiny_hybrid, dtype="bf16")
    halves = load_file(again / "model.safetensors")
    assert all(value.dtype == torch.bfloat16 for key, value in halves.items() if value.is_floating_point())
    for key, value in weights.items():
        torch.testing.assert_close(halves[key].float(), value, rtol=1e-2, atol=1e-2, msg=key)


# runs in a fresh interpreter where importing hf_effattn fails, as on a machine that never installed it
RELOAD = textwrap.dedent(
    """
    import importlib.abc, json, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "hf_effattn" or name.startswith("hf_effattn."):
                raise ModuleNotFoundError(f"No module named {name!r}")
    sys.meta_path.insert(0, Block())
    import torch
    from peft import AutoPeftModelForCausalLM
    adapter, base, ids_path, logits_path, request = sys.argv[1:6]
    model = AutoPeftModelForCausalLM.from_pretrained(adapter, trust_remote_code=True, dtype=torch.float32).eval()
    assert type(model.get_base_model()).__module__.startswith("transformers_modules."), type(model.get_base_model())
    with torch.no_grad():
        torch.save(model(torch.load(ids_path)).logits, logits_path)

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    lm = HFLM(pretrained=base, peft=adapter, trust_remote_code=True, batch_size=1, max_length=128, device="cpu")
    context, continuation = json.loads(request)
    (result,) = lm.loglikelihood([Instance("loglikelihood", {}, (context, continuation), 0)])
    assert "hf_effattn" not in sys.modules
    print("LOGLIKELIHOOD", json.dumps(result[0]))
    """
)


def continuation_logprob(model, tokenizer, context: str, continuation: str) -> float:
    # as lm-eval scores it: the context's trailing whitespace belongs to the continuation
    context_ids = tokenizer(context.rstrip(), add_special_tokens=False)["input_ids"]
    ids = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        log_probs = F.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
    targets = torch.tensor(ids[1:])
    picked = log_probs.gather(-1, targets[:, None])[:, 0]
    return float(picked[len(context_ids) - 1 :].sum())


def test_adapter_loads_without_the_package(adapter, tiny_hybrid, token_ids, tmp_path):
    pytest.importorskip("lm_eval")
    torch.save(token_ids, tmp_path / "ids.pt")
    script = tmp_path / "reload.py"
    script.write_text(RELOAD)
    context, continuation = "<|user|>\nWhat colour is golf?<eos>\n<|assistant|>\n", "golf is white.<eos>"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": "", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, str(script), str(adapter), str(tiny_hybrid), str(tmp_path / "ids.pt"),
         str(tmp_path / "logits.pt"), json.dumps([context, continuation])],
        check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    adapted, _ = load_adapter_model(adapter)
    with torch.no_grad():
        expected = adapted(token_ids).logits
    difference = (torch.load(tmp_path / "logits.pt") - expected).abs().max().item()
    print(f"subprocess reload vs in-process max abs diff: {difference:.2e}")
    assert difference <= 1e-5

    tokenizer = AutoTokenizer.from_pretrained(tiny_hybrid)
    line = next(line for line in result.stdout.splitlines() if line.startswith("LOGLIKELIHOOD"))
    harness = json.loads(line.split(" ", 1)[1])
    wanted = continuation_logprob(adapted, tokenizer, context, continuation)
    base = AutoModelForCausalLM.from_pretrained(tiny_hybrid, dtype=torch.float32).eval()
    print(f"lm-eval loglikelihood {harness:.4f}, adapter {wanted:.4f}, base "
          f"{continuation_logprob(base, tokenizer, context, continuation):.4f}")
    assert abs(harness - wanted) <= 1e-3
    # the harness scored the adapted model, not the base
    assert abs(harness - continuation_logprob(base, tokenizer, context, continuation)) > 1.0


# ------------------------------------------------------------------------------------------------ kill and resume

RESUME = FinetuneConfig(max_steps=40, batch_size=4, lr=1e-2, lora_r=4, lora_dropout=0.1, save_every=1,
                        eval_share=0.25, train_mixer_params=True)
RESUME_ARGS = ["--max-steps", "40", "--batch-size", "4", "--lr", "0.01", "--lora-r", "4", "--lora-dropout", "0.1",
               "--save-every", "1", "--eval-share", "0.25", "--train-mixer-params"]


def test_killed_run_resumes_to_the_same_adapter(tiny_hybrid, colour_data, tmp_path):
    reference = finetune(tiny_hybrid, colour_data, tmp_path / "reference", RESUME, log=quiet)

    out = tmp_path / "interrupted"
    work = WorkDir(out)
    command = [sys.executable, "-m", "hf_effattn.cli", "finetune", str(tiny_hybrid), "--data", colour_data,
               "--output", str(out), *RESUME_ARGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(tmp_path / "stderr.txt", "wb") as stderr:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.time() + 240
    while not work.path(CHECKPOINT_NAME).exists():
        assert process.poll() is None, (tmp_path / "stderr.txt").read_text()[-2000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    step = torch.load(work.path(CHECKPOINT_NAME), weights_only=True)["step"]
    assert 1 <= step < 40 and not out.exists(), "the kill should land inside training"

    logs = []
    finetune(tiny_hybrid, colour_data, out, RESUME, log=logs.append)
    assert any("resuming at step" in line for line in logs), logs
    expected, actual = load_file(reference / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    histories = [json.loads((folder / REPORT_NAME).read_text())["history"] for folder in (reference, out)]
    assert histories[0]["losses"] == histories[1]["losses"] and histories[0]["eval"] == histories[1]["eval"]
    assert not work.root.exists()


def test_two_processes_train_like_one(tiny_hybrid, colour_data, tmp_path):
    """DDP on two CPU processes (gloo): each takes half of every step's examples, and the loss is normalised by the
    targets of both, so the run matches one process with the whole batch."""
    config = FinetuneConfig(max_steps=6, batch_size=8, lr=1e-2, lora_r=4, eval_share=0.25, train_mixer_params=True)
    single = finetune(tiny_hybrid, colour_data, tmp_path / "single", config, log=quiet)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "hf_effattn.cli", "finetune", str(tiny_hybrid), "--data", colour_data, "--output", str(tmp_path / "ddp"),
               "--max-steps", "6", "--batch-size", "4", "--lr", "0.01", "--lora-r", "4", "--eval-share", "0.25",
               "--train-mixer-params"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("eval loss at step 0") == 1, "only the main process logs"
    reports = [json.loads((folder / REPORT_NAME).read_text()) for folder in (single, tmp_path / "ddp")]
    assert [r["processes"] for r in reports] == [1, 2]
    for key in ("losses", "eval"):
        first, second = (r["history"][key] for r in reports)
        values = (lambda h: [e["loss"] for e in h]) if key == "eval" else (lambda h: h)
        torch.testing.assert_close(values(second), values(first), rtol=1e-5, atol=1e-5)
    # Adam turns rounding noise of near-zero gradients into steps of up to lr, so weights match less closely
    expected, actual = (load_file(folder / "adapter_model.safetensors") for folder in (single, tmp_path / "ddp"))
    for key in expected:
        relative = ((actual[key] - expected[key]).norm() / expected[key].norm().clamp_min(1e-12)).item()
        assert relative < 1e-3, (key, relative)


# ------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("data", "extra", "message"),
    [
        ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\nnot json\n',
         [], "line 2: not valid JSON"),
        ("", [], "holds no records"),
        ('{"question": "hi", "answer": "hello"}\n', [], "neither a 'messages' list nor a 'text' string"),
        ('{"messages": [{"role": "bot", "content": "hi"}]}\n', [], "has role 'bot'; allowed roles"),
        ('{"text": "hello"}\n', ["--lora-r", "0"], "lora_r = 0: expected a positive integer"),
        ('{"text": "hello"}\n', ["--target-modules", "wq"], "match no module"),
    ],
    ids=["not-jsonl", "empty", "missing-fields", "unknown-role", "bad-rank", "unknown-target"],
)
def test_bad_input_fails_before_training(tiny_hybrid, tmp_path, capsys, data, extra, message):
    (tmp_path / "data.jsonl").write_text(data)
    out = tmp_path / "adapter"
    code = main(["finetune", str(tiny_hybrid), "--data", str(tmp_path / "data.jsonl"), "--output", str(out), *extra])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not WorkDir(out).root.exists()


def test_bad_model_or_adapter_folders_are_rejected(tiny_teacher, colour_data, tmp_path, capsys):
    out = tmp_path / "adapter"
    assert main(["finetune", str(tmp_path / "missing"), "--data", colour_data, "--output", str(out)]) == 2
    assert "is not a model folder (no config.json)" in capsys.readouterr().err
    assert main(["finetune", str(tiny_teacher), "--data", colour_data, "--output", str(out)]) == 2
    assert "holds a 'llama' model, not an hf_effattn hybrid" in capsys.readouterr().err
    assert not out.exists() and not WorkDir(out).root.exists()
    assert main(["merge", str(tmp_path), "--output", str(tmp_path / "merged")]) == 2
    assert "is not a PEFT adapter folder" in capsys.readouterr().err
