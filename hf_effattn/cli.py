"""`hf-effattn`: the command-line entry point.

    hf-effattn convert --output runs/smollm2-gdn            # embedded teacher, 25% full attention, GDN elsewhere
    hf-effattn convert --teacher path/or/model.gguf --mixer sliding --full-share 0.5 --output DIR
    hf-effattn generate runs/smollm2-gdn --prompt "The capital of France is"
    hf-effattn info runs/smollm2-gdn
"""

import argparse
import json
import sys
import time

EFFICIENT_MIXERS = ("gdn", "deltanet", "gla", "hedgehog", "sliding")


def _parse_layer_list(text: str) -> list[int]:
    try:
        return sorted({int(item) for item in text.split(",") if item.strip()})
    except ValueError:
        raise SystemExit(f"--full-layers must be 'uniform' or a comma-separated list of layer indices, got {text!r}.")


def _parse_full_layers(text: str, num_layers: int, share: float) -> list[int]:
    from hf_effattn.conversion import select_full_layers

    if text == "uniform":
        return select_full_layers(num_layers, share)
    layers = _parse_layer_list(text)
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise SystemExit(f"--full-layers {bad} out of range: the teacher has layers 0..{num_layers - 1}.")
    return layers


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
    from hf_effattn.checkpoint import save_checkpoint
    from hf_effattn.conversion import effattn_from_teacher, load_teacher

    if not 0.0 <= args.full_share <= 1.0:
        raise SystemExit(f"--full-share must be within [0, 1], got {args.full_share}.")
    if args.full_layers != "uniform":
        _parse_layer_list(args.full_layers)
    started = time.time()
    print(f"loading teacher: {args.teacher or 'embedded SmolLM2-135M-Instruct'}", flush=True)
    teacher, tokenizer, hub_id = load_teacher(args.teacher)
    num_layers = teacher.config.num_hidden_layers
    full_layers = _parse_full_layers(args.full_layers, num_layers, args.full_share)
    mixer_types = ["full" if i in full_layers else args.mixer for i in range(num_layers)]
    model, new_parameters = effattn_from_teacher(teacher, mixer_types=mixer_types)
    print(f"layout ({num_layers} layers): " + " ".join("F" if kind == "full" else kind[0].upper() for kind in mixer_types))
    print(f"full attention in layers {full_layers}; {args.mixer} elsewhere")
    print(
        f"WARNING: the {len(mixer_types) - len(full_layers)} {args.mixer} layers are UNTRAINED: they start from the "
        f"teacher's q/k/v/o weights, but {len(new_parameters)} new mixer tensors (gates, decays, convolutions, "
        "feature maps) are freshly initialised and no distillation has run yet, so the hybrid's output is degraded."
    )
    report = {
        "teacher": hub_id,
        "mixer_types": mixer_types,
        "full_layers": full_layers,
        "new_parameters": new_parameters,
        "distilled": False,
    }
    readme = (
        f"# {args.output}\n\nAn hf_effattn hybrid built from `{hub_id}`: {len(full_layers)} of {num_layers} layers keep "
        f"full attention ({full_layers}), the others use `{args.mixer}`.\n\n**Not distilled**: the efficient layers "
        "are initialised from the teacher's attention weights only; expect degraded quality.\n"
    )
    path = save_checkpoint(
        model, args.output, tokenizer, {"conversion_report.json": json.dumps(report, indent=2) + "\n", "README.md": readme}
    )
    print(f"saved remote-code checkpoint to {path} ({time.time() - started:.0f} s)")
    if args.max_new_tokens > 0:
        print(f"\nprompt: {args.prompt}")
        print(f"teacher: {_generate(teacher, tokenizer, args.prompt, args.max_new_tokens)}")
        print(f"hybrid (untrained {args.mixer} layers): {_generate(model, tokenizer, args.prompt, args.max_new_tokens)}")
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

    convert = sub.add_parser("convert", help="build a hybrid from a teacher checkpoint")
    convert.add_argument("--teacher", default=None,
                         help="checkpoint folder, .gguf file or hub id (default: the embedded SmolLM2-135M-Instruct)")
    convert.add_argument("--mixer", default="gdn", choices=EFFICIENT_MIXERS, help="replacement mixer (default: gdn)")
    convert.add_argument("--full-share", type=float, default=0.25,
                         help="share of layers kept as full attention, 0..1 (default: 0.25)")
    convert.add_argument("--full-layers", default="uniform",
                         help="'uniform' (evenly spaced) or a comma-separated list of layer indices")
    convert.add_argument("--output", required=True, help="folder for the checkpoint")
    convert.add_argument("--prompt", default="What is the capital of France?", help="sample prompt shown at the end")
    convert.add_argument("--max-new-tokens", type=int, default=24, help="tokens for the sample (0 = no sample)")
    convert.set_defaults(func=cmd_convert)

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
    from hf_effattn.conversion.teachers import TeacherError

    try:
        return args.func(args)
    except (TeacherError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
