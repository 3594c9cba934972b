"""The model card written next to a converted checkpoint: what it is, how it was made, what was measured."""


def _passkey_rows(quality: dict) -> list[str]:
    passkey = quality.get("passkey")
    if not passkey:
        return []
    rows = ["| passkey length (tokens) | teacher | hybrid |", "|---|---|---|"]
    for length, hybrid in passkey["hybrid"].items():
        teacher = passkey["teacher"].get(length) or passkey["teacher"].get(int(length))
        rows.append(
            f"| {length} | {teacher['correct']}/{teacher['total']} | {hybrid['correct']}/{hybrid['total']} |"
        )
    return rows


def conversion_model_card(report: dict, name: str) -> str:
    layout, recipe, quality = report["layout"], report["recipe"], report.get("quality", {})
    num_layers = len(layout["mixer_types"])
    full = layout["full_layers"]
    mixer = recipe["mixer"]
    window = f" with a {recipe['window']}-token softmax window and {recipe['sink_tokens']} sink tokens" if recipe["window"] and mixer in ("gdn", "deltanet", "gla") else ""
    lines = [
        "---",
        "library_name: transformers",
        f"base_model: {report['teacher']}",
        "tags:",
        "- hf_effattn",
        "- hybrid-attention",
        f"- {mixer}",
        "---",
        "",
        f"# {name}",
        "",
        f"A hybrid of `{report['teacher']}` made with hf_effattn {report['hf_effattn']}: {len(full)} of {num_layers} "
        f"layers keep full attention (layers {full}, chosen `{layout['selection']}`), the other "
        f"{num_layers - len(full)} use `{mixer}`{window}.",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)',
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
        "```",
        "",
        "## How it was made",
        "",
        f"- Stage 0: every teacher weight copied; new `{mixer}` parameters initialised so that each layer starts as "
        "close to the teacher's attention as the mixer allows.",
        f"- Stage 1 (attention transfer): {report['stage1']['steps']} steps, {report['stage1']['tokens']:,} tokens, "
        f"{report['stage1']['seconds'] / 60:.1f} min.",
        f"- Stage 2 (logit distillation, {'LoRA r=' + str(recipe['lora_r']) + ' merged' if recipe['lora_r'] else 'full fine-tuning'}): "
        f"{report['stage2']['steps']} steps, {report['stage2']['tokens']:,} tokens, "
        f"{report['stage2']['seconds'] / 60:.1f} min.",
        f"- Data: `{recipe['data']}` with {recipe['retrieval_share']:.0%} synthetic retrieval samples; device: "
        f"{report['device']}.",
        "",
        "## Measured",
        "",
    ]
    ppl = quality.get("perplexity")
    if ppl:
        lines += [
            f"Held-out perplexity ({ppl['source']}, {ppl['blocks']} x {ppl['seq_len']} tokens): teacher "
            f"{ppl['teacher']:.3f}, hybrid {ppl['hybrid']:.3f} ({ppl['ratio']:.3f}x the teacher).",
            "",
        ]
    lines += _passkey_rows(quality)
    if not ppl and not quality.get("passkey"):
        lines.append("Nothing was measured for this checkpoint.")
    lines += [
        "",
        "## Limitations",
        "",
        "- These numbers come from one conversion run and small samples; evaluate on your own tasks before use.",
        f"- Only {report['stage1']['tokens'] + report['stage2']['tokens']:,} tokens of distillation: knowledge and "
        "long-context behaviour outside the probes above may be worse than the teacher's.",
        "",
    ]
    return "\n".join(lines)
