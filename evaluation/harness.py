"""Teacher-vs-hybrid evaluation through lm-eval's Python API, with hf_effattn's offline long-context task pack.

    hf-effattn eval runs/smollm2-gdn --teacher embedded --tasks passkey,niah_single --lengths 1024,2048 --output eval/

Each model is loaded once (trust_remote_code), wrapped in lm-eval's `HFLM` with its batch size and max length set
explicitly, and evaluated per length: the task pack sizes every prompt to that length in the model's own tokens.
Raw lm-eval results go to `raw/`; `evaluation.json` and `retention.md` hold the scores, the retention table and
the effective context length.
"""

import os
import time
from pathlib import Path

import torch

from .report import retention_report, write_json_atomic

TASK_DIR = Path(__file__).resolve().parent / "tasks"
PACK_TASKS = (
    "passkey", "niah_single", "niah_multikey", "niah_uuid", "niah_multivalue", "niah_multiquery",
    "vt", "cwe", "fwe", "mqar", "ppl",
)
# the metric each pack task reports, and whether higher is better
PACK_METRICS = {task: ("score", True) for task in PACK_TASKS}
PACK_METRICS.update({"mqar": ("acc", True), "ppl": ("word_perplexity", False)})  # mqar reported in percent
DEFAULT_TASKS = ("passkey", "niah_single", "niah_multikey", "vt")


class EvaluationError(ValueError):
    """Bad evaluation input; the message says what was expected."""


def load_model(spec: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer, description) for a checkpoint folder, a GGUF file, a hub id or "embedded"."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from hf_effattn.conversion.teachers import TeacherError, resolve_teacher

    try:
        name, kwargs, label = resolve_teacher(spec)
        AutoConfig.from_pretrained(name, trust_remote_code=True, **kwargs)
    except (TeacherError, OSError, ValueError) as error:
        raise EvaluationError(
            f"Cannot load model {spec!r}: {error}. Pass a checkpoint folder, a .gguf file, a reachable hub id, "
            "or 'embedded' for the embedded SmolLM2-135M-Instruct."
        ) from error
    model = AutoModelForCausalLM.from_pretrained(name, trust_remote_code=True, dtype=dtype, **kwargs).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    # local paths are recorded by their last component: result files travel into model cards
    recorded = Path(spec).name if Path(str(spec)).expanduser().exists() else str(spec)
    return model, tokenizer, {"spec": recorded, "name": label, "model_type": model.config.model_type,
                              "parameters": sum(p.numel() for p in model.parameters())}


def check_tasks(tasks: list[str]) -> None:
    """Unknown task names fail before any model is loaded (pack tasks and lm-eval's own index)."""
    from lm_eval.tasks import TaskManager

    unknown = [t for t in tasks if t not in PACK_TASKS]
    if unknown:
        known = set(TaskManager(include_path=str(TASK_DIR)).all_tasks)
        missing = [t for t in unknown if t not in known]
        if missing:
            raise EvaluationError(
                f"Unknown task(s) {', '.join(missing)}. The offline pack has {', '.join(PACK_TASKS)}; any lm-eval "
                "task name also works when its data is reachable (`lm-eval ls tasks` lists them)."
            )


def _score(task_results: dict, task: str) -> float:
    metric = PACK_METRICS[task][0] if task in PACK_METRICS else None
    if metric is None:
        # a standard lm-eval task: its first reported metric
        metric = next(k.split(",")[0] for k in task_results if "," in k and "_stderr" not in k)
    value = float(task_results[f"{metric},none"])
    # accuracies in percent, like the other pack scores
    return 100.0 * value if task == "mqar" else value


def evaluate_model(model, tokenizer, tasks: list[str], lengths: list[int], output: Path, role: str, *,
                   num_samples: int, seed: int = 0, batch_size: int = 1, max_gen_toks: int | None = None,
                   log=print) -> dict:
    """{task: {length: score}} for one model; raw lm-eval output saved as `raw/{role}-{length}.json`."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    output.mkdir(parents=True, exist_ok=True)
    (output / "raw").mkdir(exist_ok=True)
    tokenizer_dir = output / f"tokenizer-{role}"
    tokenizer.save_pretrained(tokenizer_dir)
    pack = [t for t in tasks if t in PACK_TASKS]
    standard = [t for t in tasks if t not in PACK_TASKS]
    scores: dict[str, dict[int, float]] = {t: {} for t in tasks}
    runs = [(length, pack) for length in lengths if pack]
    if standard:
        runs.append((max(lengths), standard))
    for length, run_tasks in runs:
        start = time.perf_counter()
        # prompts are sized so that prompt + the task's answer budget = length; HFLM cuts contexts to
        # max_length - max_gen_toks, so a larger answer budget given here widens max_length by as much
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                  max_length=length + (max_gen_toks or 0), trust_remote_code=True)
        metadata = {"tokenizer": str(tokenizer_dir), "max_seq_length": length, "num_samples": num_samples, "seed": seed}
        result = simple_evaluate(
            model=lm, tasks=run_tasks, task_manager=TaskManager(include_path=str(TASK_DIR), metadata=metadata),
            bootstrap_iters=0, log_samples=True, gen_kwargs={"max_gen_toks": max_gen_toks} if max_gen_toks else None,
        )
        name = f"{role}-{length}" if run_tasks is pack else f"{role}-standard"
        write_json_atomic(output / "raw" / f"{name}.json", result)
        for task in run_tasks:
            scores[task][length] = _score(result["results"][task], task)
        log(f"  {role} @ {length}: " + ", ".join(f"{t} {scores[t][length]:.1f}" for t in run_tasks)
            + f" ({time.perf_counter() - start:.0f} s)")
    return scores


def run_evaluation(model_spec: str, output: str | os.PathLike, *, teacher_spec: str | None = None,
                   tasks=DEFAULT_TASKS, lengths=(1024, 2048, 4096), num_samples: int = 20, seed: int = 0,
                   batch_size: int = 1, device: str | None = None, dtype: str = "float32",
                   max_gen_toks: int | None = None, log=print) -> dict:
    """Evaluates a model (and its teacher), writes `evaluation.json` and `retention.md` into `output`."""
    tasks, lengths = list(tasks), sorted({int(length) for length in lengths})
    if not tasks or not lengths or min(lengths) < 128:
        raise EvaluationError(f"tasks = {tasks}, lengths = {lengths}: expected task names and lengths >= 128 tokens.")
    if num_samples <= 0:
        raise EvaluationError(f"num_samples = {num_samples}: expected a positive count.")
    check_tasks(tasks)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    output = Path(output)
    models, scores = {}, {}
    for role, spec in (("model", model_spec), ("teacher", teacher_spec)):
        if spec is None:
            continue
        log(f"loading {role} {spec}")
        model, tokenizer, info = load_model(spec, device, torch_dtype)
        models[role] = info
        scores[role] = evaluate_model(model, tokenizer, tasks, lengths, output, role, num_samples=num_samples,
                                      seed=seed, batch_size=batch_size, max_gen_toks=max_gen_toks, log=log)
        del model
    higher_is_better = {t: PACK_METRICS.get(t, ("", True))[1] for t in tasks}
    report = {
        "models": models,
        "tasks": tasks,
        "lengths": lengths,
        "metrics": {t: PACK_METRICS.get(t, ("first reported", True))[0] for t in tasks},
        "scores": scores,
        "settings": {"num_samples": num_samples, "seed": seed, "batch_size": batch_size, "device": device,
                     "dtype": dtype, "max_gen_toks": max_gen_toks, "lm_eval": _lm_eval_version()},
    }
    if "teacher" in scores:
        report.update(retention_report(scores["model"], scores["teacher"], higher_is_better))
    write_json_atomic(output / "evaluation.json", report)
    from .report import render_markdown

    (output / "retention.md").write_text(render_markdown(report))
    return report


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")
