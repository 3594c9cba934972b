"""`hf-effattn`: the command-line entry point.

    hf-effattn convert --output runs/smollm2-gdn            # embedded teacher, 25% full attention, GDN elsewhere
    hf-effattn convert --teacher path/or/model.gguf --mixer gla --full-share 0.5 --preset gpu --output DIR
    hf-effattn generate runs/smollm2-gdn --prompt "The capital of France is"
    hf-effattn info runs/smollm2-gdn
    hf-effattn eval runs/smollm2-gdn --teacher embedded --tasks passkey,niah_single --lengths 1024,2048 --output DIR
"""

import argparse
import json
import sys
from pathlib import Path

from hf_effattn.conversion.recipe import EFFICIENT_MIXERS, PRESETS


def _parse_ints(text: str, error: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise SystemExit(f"{error}, got {text!r}.")


def _parse_full_layers(text: str):
    if text in ("auto", "uniform"):
        return text
    return sorted(set(_parse_ints(text, "--full-layers must be 'auto', 'uniform' or a comma-separated list of layer indices")))


def _parse_lengths(text: str | None):
    return None if text is None else _parse_ints(text, "expected comma-separated token counts such as 512,1024")


def _generate(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    import torch

    messages = [{"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = prompt
    inputs = tokenizer(text, return_tensors="pt").to(model.device)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def cmd_convert(args) -> int:
    from hf_effattn.conversion.pipeline import convert
    from hf_effattn.conversion.recipe import make_recipe

    recipe = make_recipe(
        args.preset,
        mixer=args.mixer,
        full_share=args.full_share,
        full_layers=_parse_full_layers(args.full_layers) if args.full_layers else None,
        window=args.window,
        sink_tokens=args.sink_tokens,
        data=args.data,
        retrieval_share=args.retrieval_share,
        stage1_steps=args.stage1_steps,
        stage1_lr=args.stage1_lr,
        stage2_steps=args.stage2_steps,
        stage2_lr=args.stage2_lr,
        stage2_seq_lens=_parse_lengths(args.seq_lens),
        lora_r=args.lora_r,
        batch_size=args.batch_size,
        save_every=args.save_every,
        seed=args.seed,
        precision=args.precision,
        eval_lengths=_parse_lengths(args.eval_lengths),
    )
    path = convert(args.teacher, args.output, recipe, overwrite=args.overwrite, keep_work=args.keep_work)
    report = json.loads((path / "conversion_report.json").read_text())
    quality = report["quality"]
    if "perplexity" in quality:
        ppl = quality["perplexity"]
        print(f"held-out perplexity: teacher {ppl['teacher']:.3f}, hybrid {ppl['hybrid']:.3f} ({ppl['ratio']:.3f}x)")
    for length, result in quality.get("passkey", {}).get("hybrid", {}).items():
        teacher = quality["passkey"]["teacher"][length]
        print(f"passkey at {length} tokens: teacher {teacher['correct']}/{teacher['total']}, "
              f"hybrid {result['correct']}/{result['total']}")
    if args.max_new_tokens > 0:
        model, tokenizer = _load(str(path))
        print(f"\nprompt: {args.prompt}\nhybrid: {_generate(model, tokenizer, args.prompt, args.max_new_tokens)}")
    return 0


def cmd_eval(args) -> int:
    import logging

    from hf_effattn.evaluation.harness import DEFAULT_TASKS, run_evaluation

    # lm-eval logs every task's configuration at INFO; our own progress lines say what runs
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else list(DEFAULT_TASKS)
    lengths = _parse_ints(args.lengths, "--lengths expects comma-separated token counts, e.g. 1024,2048")
    report = run_evaluation(args.model, args.output, teacher_spec=args.teacher, tasks=tasks, lengths=lengths,
                            num_samples=args.num_samples, seed=args.seed, batch_size=args.batch_size,
                            device=args.device, dtype=args.dtype, max_gen_toks=args.max_gen_toks)
    from hf_effattn.evaluation.report import render_markdown

    print(render_markdown(report))
    print(f"results: {Path(args.output) / 'evaluation.json'}")
    return 0


def _load(model_dir: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    return model, tokenizer


def cmd_generate(args) -> int:
    model, tokenizer = _load(args.model)
    print(_generate(model, tokenizer, args.prompt, args.max_new_tokens))
    return 0


def cmd_info(args) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(args.model, trust_remote_code=True)
    print(json.dumps({"model_type": config.model_type, "mixer_types": config.mixer_types,
                      "layer_types": config.layer_types, "mixer_options": config.mixer_options}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-effattn", description="Efficient-attention hybrids for transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    convert = sub.add_parser("convert", help="distill a teacher checkpoint into a hybrid")
    convert.add_argument("--teacher", default=None,
                         help="checkpoint folder, .gguf file or hub id (default: the embedded SmolLM2-135M-Instruct)")
    convert.add_argument("--output", required=True, help="folder for the checkpoint")
    convert.add_argument("--preset", default="cpu", choices=sorted(PRESETS),
                         help="recipe preset: cpu (default, ~20 min for a 135M teacher on 2 cores), gpu, smoke")
    convert.add_argument("--mixer", default=None, choices=EFFICIENT_MIXERS, help="replacement mixer (default: gdn)")
    convert.add_argument("--full-share", type=float, default=None,
                         help="share of layers kept as full attention, 0..1 (default: 0.25)")
    convert.add_argument("--full-layers", default=None,
                         help="'auto' (default: most sensitive layers), 'uniform', or comma-separated indices")
    convert.add_argument("--window", type=int, default=None,
                         help="softmax window inside each replaced layer, 0 for none (default: 64)")
    convert.add_argument("--sink-tokens", type=int, default=None, help="sink tokens of that window (default: 4)")
    convert.add_argument("--data", default=None,
                         help="'stdlib' (default), a .txt/.jsonl file or folder, or hf:NAME[:CONFIG]")
    convert.add_argument("--stage1-steps", type=int, default=None, help="attention-transfer steps")
    convert.add_argument("--stage1-lr", type=float, default=None, help="attention-transfer learning rate")
    convert.add_argument("--stage2-steps", type=int, default=None, help="logit-distillation steps")
    convert.add_argument("--stage2-lr", type=float, default=None, help="logit-distillation learning rate")
    convert.add_argument("--retrieval-share", type=float, default=None,
                         help="share of synthetic retrieval samples in the training data (default: 0.5)")
    convert.add_argument("--seq-lens", default=None, help="stage-2 sequence-length schedule, e.g. 512,1024")
    convert.add_argument("--lora-r", type=int, default=None, help="LoRA rank of stage 2, 0 for full fine-tuning")
    convert.add_argument("--batch-size", type=int, default=None)
    convert.add_argument("--save-every", type=int, default=None, help="checkpoint interval in steps")
    convert.add_argument("--seed", type=int, default=None)
    convert.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16"])
    convert.add_argument("--eval-lengths", default=None, help="passkey lengths of the final check, e.g. 1024,2048")
    convert.add_argument("--overwrite", action="store_true", help="replace a finished conversion in --output")
    convert.add_argument("--keep-work", action="store_true", help="keep the work folder (checkpoints) at the end")
    convert.add_argument("--prompt", default="What is the capital of France?", help="sample prompt shown at the end")
    convert.add_argument("--max-new-tokens", type=int, default=24, help="tokens for the sample (0 = no sample)")
    convert.set_defaults(func=cmd_convert)

    evaluate = sub.add_parser("eval", help="evaluate a model (and its teacher) with lm-eval and the offline task pack")
    evaluate.add_argument("model", help="checkpoint folder, .gguf file, hub id, or 'embedded'")
    evaluate.add_argument("--teacher", default=None, help="the same kinds of spec; adds the retention table")
    evaluate.add_argument("--tasks", default=None,
                          help="comma-separated: passkey, niah_single, niah_multikey, niah_uuid, niah_multivalue, "
                               "niah_multiquery, vt, cwe, fwe, mqar, ppl, or any lm-eval task "
                               "(default: passkey,niah_single,niah_multikey,vt)")
    evaluate.add_argument("--lengths", default="1024,2048,4096", help="context lengths in tokens (default: 1024,2048,4096)")
    evaluate.add_argument("--num-samples", type=int, default=20, help="samples per task and length (default: 20)")
    evaluate.add_argument("--batch-size", type=int, default=1)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    evaluate.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    evaluate.add_argument("--max-gen-toks", type=int, default=None, help="override every task's answer budget")
    evaluate.add_argument("--output", required=True, help="folder for evaluation.json, retention.md and raw results")
    evaluate.set_defaults(func=cmd_eval)

    generate = sub.add_parser("generate", help="greedy generation from a checkpoint")
    generate.add_argument("model", help="checkpoint folder or hub id")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.set_defaults(func=cmd_generate)

    info = sub.add_parser("info", help="print a checkpoint's layer layout")
    info.add_argument("model", help="checkpoint folder or hub id")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from hf_effattn.conversion.distill import ConversionError
    from hf_effattn.conversion.teachers import TeacherError

    try:
        return args.func(args)
    except (TeacherError, ConversionError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
