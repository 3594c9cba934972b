"""Retention of a hybrid against its teacher, the effective context length, and their markdown rendering."""

import json
import os
import tempfile
from pathlib import Path

RETENTION_THRESHOLD = 0.85  # the share of the teacher's score that counts as kept


def write_json_atomic(path: Path, data) -> None:
    """Writes JSON through a temporary file in the same folder and a rename, so a crash leaves no partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        json.dump(data, handle, indent=2, default=str)
        temporary = handle.name
    os.replace(temporary, path)


def retention(model_score: float, teacher_score: float, higher_is_better: bool = True) -> float | None:
    """model / teacher for scores (teacher / model for perplexities); None when the teacher scores 0."""
    if higher_is_better:
        return model_score / teacher_score if teacher_score > 0 else None
    return teacher_score / model_score if model_score > 0 else None


def effective_length(lengths: list[int], retained: dict[int, float | None], threshold=RETENTION_THRESHOLD):
    """The longest length up to which every evaluated length keeps >= `threshold` of the teacher (None if none)."""
    best = None
    for length in sorted(lengths):
        value = retained.get(length)
        if value is None or value < threshold:
            break
        best = length
    return best


def retention_report(model_scores: dict, teacher_scores: dict, higher_is_better: dict,
                     threshold: float = RETENTION_THRESHOLD) -> dict:
    """Per task and length: model / teacher; the mean over score tasks per length; effective lengths."""
    table, lengths = {}, set()
    for task, by_length in model_scores.items():
        table[task] = {}
        for length, score in by_length.items():
            teacher = teacher_scores.get(task, {}).get(length)
            table[task][length] = None if teacher is None else retention(score, teacher, higher_is_better[task])
            lengths.add(length)
    mean = {}
    for length in sorted(lengths):
        # perplexity is reported beside the tasks but kept out of the mean of recall scores
        values = [table[t][length] for t in table if higher_is_better[t] and table[t].get(length) is not None]
        mean[length] = sum(values) / len(values) if values else None
    return {
        "retention": table,
        "mean_retention": mean,
        "retention_threshold": threshold,
        "effective_length": {
            **{task: effective_length(sorted(table[task]), table[task], threshold) for task in table},
            "mean": effective_length(sorted(mean), mean, threshold),
        },
    }


def _cell(value, digits=1):
    return "n/a" if value is None else f"{value:.{digits}f}"


def render_markdown(report: dict) -> str:
    """Score tables of each model and, with a teacher, the retention table and effective lengths."""
    lengths = [int(length) for length in report["lengths"]]
    header = "| task | metric | " + " | ".join(f"{length:,}" for length in lengths) + " |"
    rule = "|---|---|" + "---|" * len(lengths)
    lines = []
    for role, scores in report["scores"].items():
        info = report["models"][role]
        lines += [f"### {role}: {info['name']}", "", header, rule]
        for task in report["tasks"]:
            by_length = {int(k): v for k, v in scores[task].items()}
            lines.append(f"| {task} | {report['metrics'][task]} | "
                         + " | ".join(_cell(by_length.get(length), 2 if task == 'ppl' else 1) for length in lengths) + " |")
        lines.append("")
    if "retention" in report:
        lines += ["### retention (model / teacher; teacher / model for perplexity)", "", header, rule]
        for task in report["tasks"]:
            by_length = {int(k): v for k, v in report["retention"][task].items()}
            lines.append(f"| {task} | ratio | " + " | ".join(_cell(by_length.get(length), 3) for length in lengths) + " |")
        mean = {int(k): v for k, v in report["mean_retention"].items()}
        lines.append("| **mean** | ratio | " + " | ".join(_cell(mean.get(length), 3) for length in lengths) + " |")
        threshold = report["retention_threshold"]
        sentence = (f"Effective context length (longest length up to which every length keeps >= {threshold:.0%} "
                    "of the teacher's score):")
        lines += ["", sentence, ""]
        for task, length in report["effective_length"].items():
            lines.append(f"- {task}: {'below the shortest length' if length is None else f'{int(length):,} tokens'}")
        lines.append("")
    return "\n".join(lines)
