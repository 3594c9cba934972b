"""`convert()`: teacher in, distilled remote-code checkpoint out, with a report, loss curves and a model card."""

import io
import json
import platform
import time
from pathlib import Path

import torch

from hf_effattn.checkpoint import save_checkpoint
from hf_effattn.model_cards.render import Results, render_card

from .data import (
    TEACHER_SOURCE,
    DataError,
    data_sources,
    heldout_documents,
    load_documents,
    pack,
    training_blocks,
    training_blocks_with_answers,
)
from .distill import (
    LORA_TARGETS,
    AttentionTransferLoss,
    ConversionError,
    DistillationLoss,
    _decoder,
    capture_attention,
    choose_full_layers,
    layer_index,
    load_trainable_state,
    mixer_options_for,
    rank_layers,
    run_stage,
    stage1_layer_blocks,
    trainable_state,
)
from .teacher_text import GENERATION_BATCH, teacher_documents
from .teachers import load_teacher
from .weight_map import effattn_from_teacher
from .workdir import WorkDir

REPORT_NAME = "conversion_report.json"


def _accelerator(recipe):
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    if recipe.precision == "bf16" or (recipe.precision == "auto" and cuda):
        mixed = "bf16"
    else:
        mixed = "no"
    return Accelerator(cpu=not cuda, mixed_precision=mixed)


def _rank_batches(blocks: torch.Tensor, batch_size: int, accelerator, weights: torch.Tensor | None = None):
    """This process's batch of each step: `[batch_size, T]` token ids, or `{"input_ids", "weights"}` with weights."""
    world, rank = accelerator.num_processes, accelerator.process_index

    def batch(step: int):
        start = (step * world + rank) * batch_size
        ids = blocks[start : start + batch_size].to(accelerator.device)
        if weights is None:
            return ids
        return {"input_ids": ids, "weights": weights[start : start + batch_size].to(accelerator.device)}

    return batch


def _layer_errors(student, teacher, replaced, blocks, device) -> dict:
    """Relative attention-output error of every replaced layer, averaged over `blocks` (no training)."""
    if not replaced:
        return {}
    loss = AttentionTransferLoss(student, replaced)
    totals = torch.zeros(len(replaced))
    with torch.no_grad():
        for row in blocks:
            records, rotary = capture_attention(teacher, replaced, row[None].to(device))
            totals += loss(records, rotary)[1].float().cpu()
    return {int(i): float(e) for i, e in zip(replaced, totals / len(blocks))}


def _attention_transfer(student, teacher, tokenizer, documents, replaced, new_parameters, recipe, accelerator,
                        workdir, log) -> dict:
    """Stage 1 in blocks of `recipe.stage1_layer_block` replaced layers (default: one block of all of them).

    Each block trains only its own layers' new parameters, `stage1_steps` steps on the same samples, with its own
    checkpoints; the teacher runs only up to the block's last layer, and every layer of the block takes the
    teacher's hidden states as its input. A finished block is kept in the work folder, so a killed run resumes in
    the block it was in. Returns the trained parameters, the joined history and the errors per layer and block."""
    main, device = accelerator.is_main_process, accelerator.device
    probe = pack(tokenizer, documents, recipe.stage1_seq_len, 2, seed=recipe.seed + 7)
    # the errors go into the report, which the main process writes
    errors_before = _layer_errors(student, teacher, replaced, probe, device) if main else {}
    samples = training_blocks(tokenizer, documents, recipe.stage1_seq_len,
                              max(recipe.stage1_steps, 1) * accelerator.num_processes * recipe.batch_size,
                              recipe.retrieval_share, recipe.seed + 10)
    batches = _rank_batches(samples, recipe.batch_size, accelerator)
    layer_blocks = stage1_layer_blocks(replaced, recipe.stage1_layer_block)
    histories = []
    for k, layers in enumerate(layer_blocks):
        # a single block is the stage as a whole, under the stage's own names
        name = "stage1" if len(layer_blocks) == 1 else f"stage1-block{k}"
        done = workdir.load(f"{name}.pt") if len(layer_blocks) > 1 else None
        if done is not None:
            log(f"{name}: done in an earlier run (layers {layers}), reusing its result")
            load_trainable_state(student, done["trainable"])
            histories.append(done["history"])
            continue
        if len(layer_blocks) > 1:
            log(f"{name}: layers {layers} ({k + 1} of {len(layer_blocks)} blocks)")
        for parameter_name, p in student.named_parameters():
            p.requires_grad_(parameter_name in new_parameters and layer_index(parameter_name) in layers)

        def stage1_loss(module, batch, layers=layers):
            records, rotary = capture_attention(teacher, layers, batch)
            return module(records, rotary)

        history = run_stage(name, AttentionTransferLoss(student, layers), batches, recipe.stage1_steps,
                            recipe.stage1_lr, recipe, accelerator, workdir, stage1_loss, log)
        if len(layer_blocks) > 1 and main:
            workdir.save(f"{name}.pt", {"trainable": trainable_state(student), "history": history})
        histories.append(history)
    for parameter_name, p in student.named_parameters():
        p.requires_grad_(parameter_name in new_parameters)
    errors_after = _layer_errors(student, teacher, replaced, probe, device) if main else {}

    def mean_error(errors, layers):
        return sum(errors[i] for i in layers) / len(layers) if errors and layers else None

    blocks = [
        {
            "layers": layers,
            "steps": len(history["losses"]),
            "tokens": history["tokens"],
            "seconds": history["seconds"],
            "loss_first": history["losses"][0] if history["losses"] else None,
            "loss_last": history["losses"][-1] if history["losses"] else None,
            "error_before": mean_error(errors_before, layers),
            "error_after": mean_error(errors_after, layers),
        }
        for layers, history in zip(layer_blocks, histories)
    ]
    history = {key: [value for h in histories for value in h[key]] for key in ("losses", "metrics")}
    history.update(seconds=sum(h["seconds"] for h in histories), tokens=sum(h["tokens"] for h in histories))
    return {"trainable": trainable_state(student), "history": history, "errors_before": errors_before,
            "errors_after": errors_after, "blocks": blocks}


def _loss_plot(stage1: dict, stage2: dict) -> bytes | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for axis, history, title, label in (
        (axes[0], stage1, "stage 1: attention transfer", "relative MSE (mean over layers)"),
        (axes[1], stage2, "stage 2: logit distillation", "KL(teacher || student) per token"),
    ):
        losses = history.get("losses", [])
        axis.plot(range(1, len(losses) + 1), losses, linewidth=1)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.set_ylabel(label)
        if losses and min(losses) > 0:
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def quality_check(model, teacher, tokenizer, recipe, device) -> dict:
    """Held-out perplexity of both models and passkey accuracy at `recipe.eval_lengths`."""
    from hf_effattn.evaluation.direct import passkey_accuracy, perplexity

    result = {}
    if recipe.eval_ppl_blocks:
        documents, source = heldout_documents(recipe.data)
        blocks = pack(tokenizer, documents, recipe.eval_ppl_seq_len, recipe.eval_ppl_blocks, seed=12345)
        teacher_ppl, student_ppl = perplexity(teacher, blocks), perplexity(model, blocks)
        result["perplexity"] = {
            "source": source,
            "blocks": int(blocks.shape[0]),
            "seq_len": int(blocks.shape[1]),
            "teacher": teacher_ppl,
            "hybrid": student_ppl,
            "ratio": student_ppl / teacher_ppl,
        }
    if recipe.eval_lengths and recipe.eval_samples:
        result["passkey"] = {
            "samples_per_length": recipe.eval_samples,
            "teacher": passkey_accuracy(teacher, tokenizer, recipe.eval_lengths, recipe.eval_samples),
            "hybrid": passkey_accuracy(model, tokenizer, recipe.eval_lengths, recipe.eval_samples),
        }
    return result


def _written_by_teacher(teacher, tokenizer, recipe, workdir, accelerator) -> tuple[list[str], float]:
    """(the teacher-written documents of a `...+teacher` data spec, or [], and the seconds it took)."""
    if TEACHER_SOURCE not in data_sources(recipe.data):
        return [], 0.0
    from tqdm.auto import tqdm

    t0 = time.time()
    batches = -(-recipe.teacher_documents // GENERATION_BATCH)
    with tqdm(total=batches, desc="teacher writes", disable=not accelerator.is_main_process) as bar:
        written = teacher_documents(teacher, tokenizer, recipe.teacher_documents, recipe.teacher_document_tokens,
                                    recipe.seed, workdir, accelerator, progress=bar)
    return written, time.time() - t0


def _silent(*args, **kwargs) -> None:
    pass


def convert(teacher_spec, output_dir, recipe, overwrite: bool = False, keep_work: bool = False,
            log=print) -> Path | None:
    """Runs the whole conversion; resumes from the work folder when one exists. Returns the checkpoint folder in
    the main process, None in the others of a multi-process run (only the main process logs and writes)."""
    from hf_effattn import __version__

    output = Path(output_dir).resolve()
    if (output / REPORT_NAME).exists() and not overwrite:
        raise ConversionError(f"{output} already holds a finished conversion: pass --overwrite to replace it.")
    recipe.validate()
    started = time.time()
    accelerator = _accelerator(recipe)
    main = accelerator.is_main_process
    if not main:
        log = _silent
    documents = load_documents(recipe.data, "train")
    log(f"data: {len(documents)} documents from {recipe.data}")

    log(f"loading teacher: {teacher_spec or 'embedded SmolLM2-135M-Instruct'}")
    teacher, tokenizer, hub_id = load_teacher(teacher_spec)
    num_layers = teacher.config.num_hidden_layers
    recipe.validate(num_layers)
    device = accelerator.device
    dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32
    teacher = teacher.to(device=device, dtype=dtype).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    workdir = WorkDir(output)
    # the batches of a step depend on the number of processes: a run resumes only with as many as it started with
    identity = {"teacher": str(teacher_spec or "embedded"), "recipe": recipe.to_dict(), "hf_effattn": __version__,
                "processes": accelerator.num_processes}
    # the main process creates the work folder (and below, the layout); the others then check that it is theirs
    with accelerator.main_process_first():
        resuming = workdir.open(identity)
    if resuming:
        log(f"resuming the unfinished conversion in {workdir.root}")
    written, text_seconds = _written_by_teacher(teacher, tokenizer, recipe, workdir, accelerator)
    if written:
        documents = documents + written
        log(f"data: {len(written)} documents written by the teacher, {len(documents)} in all")
    with accelerator.main_process_first():
        timings = workdir.read_json("timings.json") or {}
        # the first run that generated them records the time (a rerun reads them from the work folder)
        if written and main and "teacher_text_seconds" not in timings:
            timings["teacher_text_seconds"] = text_seconds
            workdir.write_json("timings.json", timings)
        layout = workdir.read_json("layout.json")
        if layout is None:
            t0 = time.time()
            scores = None
            if recipe.full_layers == "auto" and recipe.full_share > 0:
                from tqdm.auto import tqdm

                with tqdm(total=num_layers, desc="ranking layers") as bar:
                    scores = rank_layers(teacher, tokenizer, recipe, documents, progress=bar)
            full_layers = choose_full_layers(recipe, num_layers, scores)
            layout = {
                "full_layers": full_layers,
                "mixer_types": ["full" if i in full_layers else recipe.mixer for i in range(num_layers)],
                "selection": recipe.full_layers if isinstance(recipe.full_layers, str) else "explicit",
                "sensitivity": scores,
            }
            workdir.write_json("layout.json", layout)
            timings["layout_seconds"] = time.time() - t0
            workdir.write_json("timings.json", timings)
    mixer_types, full_layers = layout["mixer_types"], layout["full_layers"]
    replaced = [i for i, kind in enumerate(mixer_types) if kind != "full"]
    log(f"layout ({num_layers} layers): " + " ".join("F" if k == "full" else k[0].upper() for k in mixer_types))
    log(f"full attention in layers {full_layers} ({layout['selection']}); {recipe.mixer} in {len(replaced)} layers")

    # stage 0
    torch.manual_seed(recipe.seed)
    options = mixer_options_for(recipe)
    student, new_parameters = effattn_from_teacher(teacher, mixer_types=mixer_types, mixer_options=options)
    student = student.to(device=device, dtype=torch.float32)
    world = accelerator.num_processes

    # stage 1
    stage1 = workdir.load("stage1.pt")
    if stage1 is None:
        stage1 = _attention_transfer(student, teacher, tokenizer, documents, replaced, new_parameters, recipe,
                                     accelerator, workdir, log)
        if main:
            workdir.save("stage1.pt", stage1)
    else:
        log("stage1: done in an earlier run, reusing its result")
        load_trainable_state(student, stage1["trainable"])
    for p in student.parameters():
        p.requires_grad_(False)

    # stage 2
    stage2 = workdir.load("stage2.pt")
    if recipe.lora_r:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=0.0, target_modules=LORA_TARGETS)
        trained = get_peft_model(student, lora)
        for name, p in trained.named_parameters():
            if name.split("base_model.model.", 1)[-1] in new_parameters:
                p.requires_grad_(True)
    else:
        trained = student
        for p in trained.parameters():
            p.requires_grad_(True)
    if stage2 is None:
        if recipe.gradient_checkpointing:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lengths = recipe.stage2_seq_lens
        per_length = [recipe.stage2_steps * (k + 1) // len(lengths) - recipe.stage2_steps * k // len(lengths)
                      for k in range(len(lengths))]
        schedule = []  # (length, blocks) per segment of steps
        for k, (length, steps) in enumerate(zip(lengths, per_length)):
            if steps:
                blocks, answers = training_blocks_with_answers(
                    tokenizer, documents, length, steps * world * recipe.batch_size, recipe.retrieval_share,
                    recipe.seed + 100 + k)
                # answer positions of the retrieval samples weigh `answer_weight` times a text position
                weights = 1.0 + (recipe.answer_weight - 1.0) * answers.float() if recipe.answer_weight != 1 else None
                schedule.append((steps, _rank_batches(blocks, recipe.batch_size, accelerator, weights)))

        def batches(step):
            for steps, batch in schedule:
                if step < steps:
                    return batch(step)
                step -= steps
            raise IndexError(step)

        teacher_head = teacher.get_output_embeddings()

        def stage2_loss(module, batch):
            ids, weights = (batch["input_ids"], batch["weights"]) if isinstance(batch, dict) else (batch, None)
            with torch.no_grad():
                teacher_hidden = _decoder(teacher)(input_ids=ids, use_cache=False).last_hidden_state
            return module(ids, teacher_hidden, teacher_head, weights)

        history = run_stage("stage2", DistillationLoss(trained, recipe.kl_temperature, recipe.ce_weight), batches,
                            recipe.stage2_steps, recipe.stage2_lr, recipe, accelerator, workdir, stage2_loss, log)
        if recipe.gradient_checkpointing:
            student.gradient_checkpointing_disable()
        stage2 = {"trainable": trainable_state(trained), "history": history}
        if main:
            workdir.save("stage2.pt", stage2)
    else:
        log("stage2: done in an earlier run, reusing its result")
        load_trainable_state(trained, stage2["trainable"])
    model = trained.merge_and_unload() if recipe.lora_r else trained
    model = model.eval()
    for p in model.parameters():
        p.requires_grad_(False)

    if not main:
        _end(accelerator)
        return None
    quality = workdir.read_json("quality.json")
    if quality is None:
        t0 = time.time()
        log("quality check: held-out perplexity and passkey, teacher vs hybrid")
        quality = quality_check(model, teacher, tokenizer, recipe, device)
        quality["seconds"] = time.time() - t0
        workdir.write_json("quality.json", quality)

    stage1_history, stage2_history = stage1["history"], stage2["history"]
    report = {
        "teacher": hub_id,
        # a local path is recorded by its last component: the report travels into model cards
        "teacher_spec": Path(teacher_spec).name if teacher_spec and Path(teacher_spec).exists() else str(teacher_spec or "embedded"),
        "hf_effattn": __version__,
        "torch": torch.__version__,
        "device": str(device) + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else
                                 f" ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"),
        "processes": world,
        "recipe": recipe.to_dict(),
        "data": {"source": recipe.data, "documents": len(documents), "teacher_documents": len(written)},
        "layout": layout,
        "stage1": {
            "steps": len(stage1_history["losses"]),
            "tokens": stage1_history["tokens"],
            "seconds": stage1_history["seconds"],
            "losses": stage1_history["losses"],
            "layer_errors_before": stage1["errors_before"],
            "layer_errors_after": stage1["errors_after"],
            "blocks": stage1.get("blocks", []),
        },
        "stage2": {
            "steps": len(stage2_history["losses"]),
            "tokens": stage2_history["tokens"],
            "seconds": stage2_history["seconds"],
            "losses": stage2_history["losses"],
            "lora_rank": recipe.lora_r,
        },
        "timings": {**timings, "total_seconds": None},
        "quality": quality,
        "new_parameters": new_parameters,
        "distilled": True,
    }
    files = {}
    plot = _loss_plot(stage1_history, stage2_history)
    if plot is not None:
        files["loss_curves.png"] = plot
    # a resumed run only saw part of the work: the stage times (kept across resumes) bound the total from below
    stage_seconds = sum(timings.get(key) or 0 for key in ("layout_seconds", "teacher_text_seconds")) + (
        stage1_history["seconds"] + stage2_history["seconds"] + (quality.get("seconds") or 0))
    report["timings"]["total_seconds"] = max(time.time() - started, stage_seconds)
    files[REPORT_NAME] = json.dumps(report, indent=2) + "\n"
    files["README.md"] = render_card(Results(report), output.name)
    path = save_checkpoint(model, output, tokenizer, files)
    if not keep_work:
        workdir.remove()
    log(f"saved {path} ({report['timings']['total_seconds'] / 60:.1f} min in this run)")
    _end(accelerator)
    return path


def _end(accelerator):
    """Closes the process group of a multi-process run (NCCL warns of leaked resources otherwise); what is left of a
    process's work needs no communication."""
    if accelerator.num_processes > 1:
        accelerator.end_training()


__all__ = ["REPORT_NAME", "ConversionError", "DataError", "convert"]
