"""The project's catalogue of converted models: one card per results folder, and an index page.

    hf-effattn catalogue      # model_cards/results/NAME/ -> model_cards/NAME/README.md, and model_cards/README.md

A results folder holds the files of one conversion run: conversion_report.json (from `hf-effattn convert`), and
optionally evaluation.json (`hf-effattn eval`) and efficiency*.json (`hf-effattn bench`). Cards and index are
rendered from those files only; rerun the command whenever a results folder is added or replaced.
"""

from pathlib import Path

from .render import (
    CONVERSION_REPORT,
    CardError,
    Results,
    convert_command,
    is_hub_id,
    load_results,
    render_card,
    spec_name,
    teacher_hub_id,
)

ROOT = Path(__file__).resolve().parent
RESULTS = "results"
INDEX = "README.md"
# folder names under the catalogue root that are not cards
RESERVED = {RESULTS, "__pycache__"}


def _layout_cell(results: Results) -> str:
    report = results.conversion
    kinds, recipe = report["layout"]["mixer_types"], report["recipe"]
    counts = {kind: kinds.count(kind) for kind in sorted(set(kinds), key=lambda k: k != "full")}
    text = " + ".join(f"{count} {kind}" for kind, count in counts.items())
    if recipe.get("window") and recipe["mixer"] not in ("full", "block_topk"):
        text += f" (window {recipe['window']}, {recipe.get('sink_tokens', 0)} sinks)"
    elif recipe["mixer"] in ("gdn", "deltanet", "gla", "kda"):
        text += " (no window)"
    return text


def _retention_cell(results: Results) -> str:
    evaluation = results.evaluation
    if not evaluation or not evaluation.get("mean_retention"):
        quality = results.conversion.get("quality", {}).get("perplexity")
        if quality:
            return f"not evaluated; held-out perplexity {quality['ratio']:.3f}x the teacher's"
        return "not evaluated"
    mean = {int(k): v for k, v in evaluation["mean_retention"].items()}
    values = " / ".join("n/a" if v is None else f"{v:.2f}" for v in mean.values())
    lengths = " / ".join(f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in mean)
    effective = evaluation.get("effective_length", {}).get("mean")
    effective = f"< {min(mean):,}" if effective is None else f"{int(effective):,}"
    return f"mean {values} at {lengths}; effective length {effective}"


def _efficiency_cell(results: Results) -> str:
    cells = []
    for name, data in results.efficiency:
        ratios = [r for r in data.get("ratios", []) if isinstance(r.get("context"), int)]
        if not ratios:
            continue
        smallest_batch = min(r["batch"] for r in ratios)
        ratio = max((r for r in ratios if r["batch"] == smallest_batch), key=lambda r: r["context"])
        env = data.get("environment", {})
        source = f"random {env['shape']} shape" if env.get("shape") else "this model vs teacher"
        parts = []
        decode = (("compiled_ms_per_step_speedup", "compiled decode"), ("eager_ms_per_step_speedup", "eager decode"))
        for key, label in decode:
            if isinstance(ratio.get(key), (int, float)):
                parts.append(f"{label} {ratio[key]:.2f}x")
                break
        if isinstance(ratio.get("prefill_s_speedup"), (int, float)):
            parts.append(f"prefill {ratio['prefill_s_speedup']:.2f}x")
        if isinstance(ratio.get("cache_ratio"), (int, float)):
            parts.append(f"cache {ratio['cache_ratio']:.2f}x")
        if not parts:
            # no ratio: the baseline could not run (out of memory); say what the targets say
            parts = [t["target"] for t in data.get("targets", []) if t.get("met") and t.get("value") is True]
        if not parts:
            continue
        cells.append(f"{source}, {ratio['context']:,} tokens, batch {ratio['batch']}: " + ", ".join(parts))
    return "; ".join(cells) or "not measured"


def index_page(entries: list[tuple[str, Results]]) -> str:
    lines = [
        "# Model cards",
        "",
        ("The conversions hf_effattn publishes. Each card is rendered by `hf-effattn catalogue` from the result files "
         f"in `{RESULTS}/NAME/` (conversion report, evaluation, efficiency): every number comes from a run, none is "
         "typed. Weights are not stored here; each card's first command rebuilds them."),
        "",
        ("Retention is the hybrid's score over the teacher's, averaged over the long-context recall tasks, per context "
         "length; the effective length is the longest context up to which every length keeps the retention threshold "
         "given in the card. "
         "Speed-ups are the baseline's time over the hybrid's; the cache column is the hybrid's cache over the "
         "baseline's."),
        "",
        "| name | teacher | layout | retention | speed and memory | reproduce |",
        "|---|---|---|---|---|---|",
    ]
    for name, results in entries:
        report = results.conversion
        teacher = teacher_hub_id(report)
        teacher = f"[{teacher}](https://huggingface.co/{teacher})" if teacher else f"`{spec_name(report['teacher'])}`"
        command, _ = convert_command(report, name)
        lines.append(f"| [{name}]({name}/README.md) | {teacher} | {_layout_cell(results)} | "
                     f"{_retention_cell(results)} | {_efficiency_cell(results)} | `{command}` |")
    lines += ["", "Regenerate the cards and this page after adding or replacing a results folder:", "", "```bash",
              "hf-effattn catalogue", "```", ""]
    return "\n".join(lines)


def build_catalogue(root=ROOT, log=print) -> list[Path]:
    """Renders `root/NAME/README.md` for every `root/results/NAME/` and the index `root/README.md`; returns the
    written paths."""
    root = Path(root)
    results_root = root / RESULTS
    folders = sorted(p for p in results_root.glob("*") if (p / CONVERSION_REPORT).is_file())
    if not folders:
        raise CardError(f"{results_root} holds no results folder with a {CONVERSION_REPORT}: copy a conversion's "
                        "result files into results/NAME/ first.")
    written, entries = [], []
    for folder in folders:
        name = folder.name
        if name in RESERVED or not is_hub_id(f"org/{name}"):
            raise CardError(f"results folder {name!r} cannot name a card: use a hub repository name such as "
                            "'smollm2-gdn'.")
        results = load_results(folder)
        path = root / name / "README.md"
        path.parent.mkdir(exist_ok=True)
        path.write_text(render_card(results, name, catalogue=True), encoding="utf-8")
        log(f"card: {path}")
        written.append(path)
        entries.append((name, results))
    index = root / INDEX
    index.write_text(index_page(entries), encoding="utf-8")
    log(f"index: {index}")
    return [*written, index]
