"""`hf-effattn`: the command-line entry point.

    hf-effattn convert --output runs/smollm2-gdn            # embedded teacher, 25% full attention, GDN elsewhere
    hf-effattn convert --teacher path/or/model.gguf --mixer gla --full-share 0.5 --preset gpu --output DIR
    hf-effattn generate runs/smollm2-gdn --prompt "The capital of France is"
    hf-effattn info runs/smollm2-gdn
    hf-effattn finetune runs/smollm2-gdn --data chats.jsonl --output runs/smollm2-gdn-lora
    hf-effattn merge runs/smollm2-gdn-lora --output runs/smollm2-gdn-tuned
    hf-effattn bench runs/smollm2-gdn --teacher embedded --contexts 512,1024,2048 --output DIR
    hf-effattn eval runs/smollm2-gdn --teacher embedded --tasks passkey,niah_single --lengths 1024,2048 --output DIR
    hf-effattn card runs/smollm2-gdn --repo-id ORG/smollm2-gdn --output runs/smollm2-gdn/README.md
    hf-effattn catalogue
    hf-effattn publish runs/smollm2-gdn --repo-id ORG/smollm2-gdn --dry-run
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
        teacher_documents=args.teacher_documents,
        teacher_document_tokens=args.teacher_document_tokens,
        retrieval_share=args.retrieval_share,
        answer_weight=args.answer_weight,
        stage1_steps=args.stage1_steps,
        stage1_lr=args.stage1_lr,
        stage1_layer_block=args.stage1_layer_block,
        stage2_steps=args.stage2_steps,
        stage2_lr=args.stage2_lr,
        stage2_seq_lens=_parse_lengths(args.seq_lens),
        lora_r=args.lora_r,
        batch_size=args.batch_size,
        save_every=args.save_every,
        seed=args.seed,
        precision=args.precision,
        eval_lengths=_parse_lengths(args.eval_lengths),
        eval_samples=args.eval_samples,
    )
    path = convert(args.teacher, args.output, recipe, overwrite=args.overwrite, keep_work=args.keep_work)
    if path is None:
        # another process of a multi-process run: the main process writes and reports
        return 0
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

    # lm-eval logs every task's configuration and warns about each generated data set and each task name the pack
    # takes over; our own progress lines say what runs, and errors still show
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else list(DEFAULT_TASKS)
    lengths = _parse_ints(args.lengths, "--lengths expects comma-separated token counts, e.g. 1024,2048")
    report = run_evaluation(args.model, args.output, teacher_spec=args.teacher, tasks=tasks, lengths=lengths,
                            num_samples=args.num_samples, seed=args.seed, batch_size=args.batch_size,
                            device=args.device, dtype=args.dtype, max_gen_toks=args.max_gen_toks)
    from hf_effattn.evaluation.report import render_markdown

    print(render_markdown(report))
    print(f"results: {Path(args.output) / 'evaluation.json'}")
    return 0


def cmd_bench(args) -> int:
    import torch

    from hf_effattn.evaluation import efficiency

    if args.merge:
        if args.model is not None or args.shape is not None:
            raise SystemExit("bench: --merge combines finished runs; it takes no MODEL or --shape.")
        try:
            result = efficiency.merge_reports(args.merge, Path(args.output))
        except (OSError, ValueError) as error:
            raise SystemExit(f"bench --merge: {error}") from None
        print(efficiency.render_table(result["rows"]))
        if result.get("targets"):
            print(efficiency.render_targets(result["targets"]))
        print(f"results: {Path(args.output) / 'efficiency.json'}")
        return 0
    if (args.model is None) == (args.shape is None):
        raise SystemExit("bench: pass a MODEL (optionally with --teacher) or --shape for random weights, not both.")
    if args.plugin_full and not args.shape:
        raise SystemExit("bench: --plugin-full needs --shape (it builds an all-full EffAttn model of that shape).")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    contexts = _parse_ints(args.contexts, "--contexts expects comma-separated token counts")
    batches = _parse_ints(args.batches, "--batches expects comma-separated batch sizes")
    options = {"decode_steps": args.decode_steps, "compiled": not args.no_compile, "prefill_chunk": args.prefill_chunk,
               "eager_max_context": args.eager_max_context, "breakdown_context": args.breakdown,
               "max_batch": args.max_batch,
               "largest_batch_contexts": _parse_ints(args.largest_batch, "--largest-batch expects token counts")
               if args.largest_batch else []}
    if args.shape:
        result = efficiency.run_random_pair(Path(args.output), args.shape, contexts, batches, full_share=args.full_share,
                                            mixer=args.mixer, device=device, dtype=dtype,
                                            plugin_full=args.plugin_full, **options)
    else:
        from hf_effattn.evaluation.harness import load_model

        torch_dtype = getattr(torch, dtype)
        models, environment = {}, {"dtype": dtype}
        for role, spec in (("model", args.model), ("teacher", args.teacher)):
            if spec is not None:
                models[role], _, environment[role] = load_model(spec, device, torch_dtype)
        result = efficiency.run(Path(args.output), models, contexts, batches, environment=environment, device=device,
                                **options)
    print(efficiency.render_table(result["rows"]))
    if result.get("targets"):
        print(efficiency.render_targets(result["targets"]))
    print(f"results: {Path(args.output) / 'efficiency.json'}")
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


def _names(text: str | None) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()] if text else []


def cmd_finetune(args) -> int:
    import dataclasses

    from hf_effattn.finetuning import FinetuneConfig, finetune

    # every FinetuneConfig field is an option of the same name
    values = {field.name: getattr(args, field.name) for field in dataclasses.fields(FinetuneConfig)}
    values["target_modules"], values["modules_to_save"] = _names(args.target_modules), _names(args.modules_to_save)
    config = FinetuneConfig(**values)
    finetune(args.model, args.data, args.output, config, overwrite=args.overwrite, keep_work=args.keep_work)
    return 0


def cmd_merge(args) -> int:
    from hf_effattn.finetuning import merge_adapter

    path = merge_adapter(args.adapter, args.output, base=args.base, dtype=args.dtype, overwrite=args.overwrite)
    print(f"saved the merged checkpoint to {path}")
    return 0


def cmd_card(args) -> int:
    from hf_effattn.model_cards import write_card

    output = Path(args.output or Path(args.results) / "README.md")
    path = write_card(args.results, output, name=args.name, repo_id=args.repo_id, revision=args.revision,
                      base_model=args.base_model, license=args.license, evaluation=args.evaluation,
                      efficiency=args.efficiency or ())
    print(f"card: {path}")
    return 0


def cmd_catalogue(args) -> int:
    from hf_effattn.model_cards.catalogue import ROOT, build_catalogue

    build_catalogue(Path(args.root) if args.root else ROOT)
    return 0


def cmd_publish(args) -> int:
    from hf_effattn.model_cards.publish import PublishError, publish

    try:
        publish(args.folder, args.repo_id, dry_run=args.dry_run, revision=args.revision,
                commit_message=args.commit_message, private=args.private, base_repo_id=args.base_repo_id)
    except PublishError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
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
                         help="'stdlib' (default), a .txt/.jsonl file or folder, hf:NAME[:CONFIG], or 'teacher' "
                              "(text the teacher writes), several joined with '+', e.g. stdlib+teacher")
    convert.add_argument("--teacher-documents", type=int, default=None,
                         help="documents the teacher writes for a data spec with 'teacher' (default: 64)")
    convert.add_argument("--teacher-document-tokens", type=int, default=None,
                         help="the most tokens the teacher writes per document (default: 256)")
    convert.add_argument("--stage1-steps", type=int, default=None, help="attention-transfer steps")
    convert.add_argument("--stage1-lr", type=float, default=None, help="attention-transfer learning rate")
    convert.add_argument("--stage1-layer-block", type=int, default=None,
                         help="attention transfer N replaced layers at a time, each block its own steps, the teacher "
                              "run only up to the block's last layer (default: 0 = all layers together)")
    convert.add_argument("--stage2-steps", type=int, default=None, help="logit-distillation steps")
    convert.add_argument("--stage2-lr", type=float, default=None, help="logit-distillation learning rate")
    convert.add_argument("--retrieval-share", type=float, default=None,
                         help="share of synthetic retrieval samples in the training data (default: 0.5)")
    convert.add_argument("--answer-weight", type=float, default=None,
                         help="stage-2 weight of the positions that predict a retrieval answer (a text token: 1)")
    convert.add_argument("--seq-lens", default=None, help="stage-2 sequence-length schedule, e.g. 512,1024")
    convert.add_argument("--lora-r", type=int, default=None, help="LoRA rank of stage 2, 0 for full fine-tuning")
    convert.add_argument("--batch-size", type=int, default=None)
    convert.add_argument("--save-every", type=int, default=None, help="checkpoint interval in steps")
    convert.add_argument("--seed", type=int, default=None)
    convert.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16"])
    convert.add_argument("--eval-lengths", default=None, help="passkey lengths of the final check, e.g. 1024,2048")
    convert.add_argument("--eval-samples", type=int, default=None, help="passkey samples per length in that check")
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

    bench = sub.add_parser("bench", help="prefill, decode and cache memory vs context: a model beside its teacher, "
                                         "or a random hybrid beside its all-full model (--shape)")
    bench.add_argument("model", nargs="?", default=None, help="checkpoint folder, .gguf file, hub id, or 'embedded'")
    bench.add_argument("--teacher", default=None, help="measured beside the model")
    bench.add_argument("--shape", default=None, help="random weights instead: 'tiny' (CPU) or '1.5b' (GPU)")
    bench.add_argument("--full-share", type=float, default=0.25, help="with --shape: share of full layers")
    bench.add_argument("--mixer", default="gdn", help="with --shape: the replacement mixer")
    bench.add_argument("--plugin-full", action="store_true",
                       help="with --shape: also an all-full-attention EffAttn model of the shape (rows "
                            "'full (hf_effattn)'), to separate the hybrid layout's gain from the full layers'")
    bench.add_argument("--contexts", default="512,1024,2048", help="context lengths in tokens")
    bench.add_argument("--batches", default="1", help="batch sizes")
    bench.add_argument("--decode-steps", type=int, default=16)
    bench.add_argument("--prefill-chunk", type=int, default=None, help="prefill in chunks of this many tokens")
    bench.add_argument("--no-compile", action="store_true", help="skip the compiled static-cache decode")
    bench.add_argument("--largest-batch", default=None,
                       help="contexts at which to search the baseline's largest batch and decode both models there")
    bench.add_argument("--eager-max-context", type=int, default=None,
                       help="skip the eager generate decode above this many tokens")
    bench.add_argument("--max-batch", type=int, default=256, help="where the largest-batch search stops")
    bench.add_argument("--breakdown", type=int, default=None, metavar="CONTEXT",
                       help="profile one prefill and one compiled decode step of the model (the hybrid) at CONTEXT")
    bench.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    bench.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                       help="default: bfloat16 on CUDA, float32 on CPU")
    bench.add_argument("--merge", nargs="+", default=None, metavar="RUN",
                       help="instead of measuring: one report from the efficiency.json of runs of one setting that "
                            "measured different contexts (a sweep split to fit a time limit)")
    bench.add_argument("--output", required=True, help="folder for efficiency.json, efficiency.md and the plots")
    bench.set_defaults(func=cmd_bench)

    generate = sub.add_parser("generate", help="greedy generation from a checkpoint")
    generate.add_argument("model", help="checkpoint folder or hub id")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.set_defaults(func=cmd_generate)

    info = sub.add_parser("info", help="print a checkpoint's layer layout")
    info.add_argument("model", help="checkpoint folder or hub id")
    info.set_defaults(func=cmd_info)

    tune = sub.add_parser("finetune", help="train a LoRA adapter for a hybrid on a JSONL file (resumable)")
    tune.add_argument("model", help="hybrid checkpoint folder (from `hf-effattn convert`)")
    tune.add_argument("--data", required=True,
                      help='JSONL, one {"messages": [{"role": ..., "content": ...}, ...]} or {"text": ...} per line')
    tune.add_argument("--output", required=True, help="folder for the adapter")
    tune.add_argument("--eval-data", default=None, help="JSONL evaluation file (default: split from --data)")
    tune.add_argument("--eval-share", type=float, default=0.0, help="share of --data held out for evaluation")
    tune.add_argument("--eval-every", type=int, default=0, help="evaluation interval in steps (0: start and end)")
    tune.add_argument("--max-length", type=int, default=1024, help="tokens per example (longer ones are cut)")
    tune.add_argument("--packing", action="store_true", help="concatenate examples into blocks of --max-length")
    tune.add_argument("--epochs", type=float, default=1.0)
    tune.add_argument("--max-steps", type=int, default=0, help="optimizer steps; overrides --epochs (0: unused)")
    tune.add_argument("--batch-size", type=int, default=4, help="examples per process and micro-batch")
    tune.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    tune.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (warmup, then cosine to 10%%)")
    tune.add_argument("--warmup-share", type=float, default=0.03)
    tune.add_argument("--weight-decay", type=float, default=0.0)
    tune.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm")
    tune.add_argument("--lora-r", type=int, default=16)
    tune.add_argument("--lora-alpha", type=int, default=None, help="LoRA alpha (default: 2 x rank)")
    tune.add_argument("--lora-dropout", type=float, default=0.0)
    tune.add_argument("--target-modules", default=None,
                      help="comma-separated LoRA targets (default: every linear layer of every mixer kind)")
    tune.add_argument("--include-mlp", action="store_true", help="also put LoRA on the MLP projections")
    tune.add_argument("--train-mixer-params", action="store_true",
                      help="train gates, decays, short convolutions and feature maps whole (modules_to_save)")
    tune.add_argument("--modules-to-save", default=None, help="comma-separated modules trained whole and saved")
    tune.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                      help="auto: bf16 autocast on CUDA, fp32 on CPU")
    tune.add_argument("--gradient-checkpointing", action="store_true")
    tune.add_argument("--save-every", type=int, default=50, help="checkpoint interval in steps")
    tune.add_argument("--seed", type=int, default=0)
    tune.add_argument("--base-repo-id", default=None,
                      help="hub id of the base model, recorded for publishing (the adapter keeps the local path)")
    tune.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    tune.add_argument("--keep-work", action="store_true", help="keep the work folder (checkpoints) at the end")
    tune.set_defaults(func=cmd_finetune)

    merge = sub.add_parser("merge", help="merge a LoRA adapter into its base: a standalone remote-code checkpoint")
    merge.add_argument("adapter", help="adapter folder (from `hf-effattn finetune`)")
    merge.add_argument("--output", required=True, help="folder for the merged checkpoint")
    merge.add_argument("--base", default=None, help="base checkpoint folder (default: the one the adapter names)")
    merge.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                       help="saved precision (auto: the base's); the merge itself runs in fp32")
    merge.add_argument("--overwrite", action="store_true")
    merge.set_defaults(func=cmd_merge)

    card = sub.add_parser("card", help="render a model card from result files (conversion report, evaluation, "
                                       "efficiency)")
    card.add_argument("results", help="a conversion output folder or a results folder holding conversion_report.json "
                                      "(and evaluation.json, efficiency*.json when present)")
    card.add_argument("--output", default=None, help="card file (default: RESULTS/README.md)")
    card.add_argument("--name", default=None, help="model name (default: the folder's name)")
    card.add_argument("--repo-id", default=None, help="hub repository the snippets load (default: a placeholder)")
    card.add_argument("--revision", default=None, help="commit the snippets pin (default: main, with a note to pin)")
    card.add_argument("--base-model", default=None, help="the teacher's hub id, when the report records none")
    card.add_argument("--license", default=None, help="license id, when the teacher's is not recorded")
    card.add_argument("--evaluation", default=None, help="evaluation.json from `hf-effattn eval` (default: in RESULTS)")
    card.add_argument("--efficiency", action="append", default=None,
                      help="efficiency.json from `hf-effattn bench`, repeatable (default: RESULTS/efficiency*.json)")
    card.set_defaults(func=cmd_card)

    catalogue = sub.add_parser("catalogue", help="regenerate the catalogue's cards and index from "
                                                 "model_cards/results/*")
    catalogue.add_argument("--root", default=None, help="catalogue folder holding results/ (default: model_cards/)")
    catalogue.set_defaults(func=cmd_catalogue)

    publish = sub.add_parser("publish", help="check a checkpoint or adapter folder, then upload it to the Hub")
    publish.add_argument("folder", help="checkpoint folder (convert, merge) or adapter folder (finetune)")
    publish.add_argument("--repo-id", required=True, help="target hub repository, ORG/NAME")
    publish.add_argument("--dry-run", action="store_true", help="run every check and list the files; upload nothing")
    publish.add_argument("--revision", default=None, help="branch to commit to (default: main)")
    publish.add_argument("--commit-message", default=None)
    publish.add_argument("--private", action="store_true", help="create the repository as private")
    publish.add_argument("--base-repo-id", default=None,
                         help="adapters: rewrite the local base path in the adapter's metadata to this hub id first")
    publish.set_defaults(func=cmd_publish)
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
