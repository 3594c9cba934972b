"""`finetune()`: a hybrid checkpoint and a JSONL file in, a PEFT LoRA adapter out.

Training runs through `accelerate`, as conversion does: one process on CPU or one GPU; several GPUs with
`accelerate launch -m hf_effattn.cli finetune ...` (DDP; each process takes its own batches and the loss is
normalised by the target tokens of all processes, so the gradient does not depend on the number of processes).
Batches are a function of the step number, and every `save_every` steps the trainable weights, the optimizer and
the random state are written atomically to a work folder next to the output (`.NAME.work`): rerunning the same
command after an interruption resumes there and ends with the same adapter as an uninterrupted run. The adapter
folder appears only when complete.
"""

import contextlib
import dataclasses
import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hf_effattn.checkpoint import atomic_folder, check_remote_code, write_extra_files
from hf_effattn.conversion.distill import learning_rate, load_trainable_state, trainable_state
from hf_effattn.conversion.workdir import WorkDir

from .data import (
    IGNORE_INDEX,
    collate,
    count_targets,
    file_digest,
    pack_examples,
    read_jsonl,
    split_examples,
    tokenize_records,
    truncate_examples,
)
from .lora import lora_config, unreachable_mixer_parameters

REPORT_NAME = "finetune_report.json"
CHECKPOINT_NAME = "checkpoint.pt"
# FinetuneConfig fields passed to lora_config as they are
LORA_CHOICES = ("target_modules", "include_mlp", "train_mixer_params", "modules_to_save")


class FinetuneError(ValueError):
    pass


@dataclass
class FinetuneConfig:
    # data
    max_length: int = 1024
    packing: bool = False
    eval_share: float = 0.0  # share of the examples held out for evaluation (ignored with eval_data)
    eval_data: str | None = None
    # schedule
    epochs: float = 1.0
    max_steps: int = 0  # > 0 overrides epochs
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    warmup_share: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # LoRA
    lora_r: int = 16
    lora_alpha: int | None = None  # None: twice the rank
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)  # empty: every mixer projection (see lora.py)
    include_mlp: bool = False
    train_mixer_params: bool = False
    modules_to_save: list[str] = field(default_factory=list)
    # runtime
    precision: str = "auto"  # "auto": bf16 on CUDA, fp32 on CPU
    gradient_checkpointing: bool = False
    save_every: int = 50
    eval_every: int = 0  # 0: evaluate before and after training only
    seed: int = 0
    # the base model's hub id, recorded for publishing (the adapter keeps pointing at the local folder)
    base_repo_id: str | None = None

    def validate(self) -> None:
        for name in ("max_length", "batch_size", "grad_accum", "save_every", "lora_r", "lora_alpha"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise FinetuneError(f"{name} = {getattr(self, name)}: expected a positive integer.")
        if self.max_length < 2:
            raise FinetuneError(f"max_length = {self.max_length}: expected at least 2 tokens.")
        for name in ("max_steps", "eval_every"):
            if getattr(self, name) < 0:
                raise FinetuneError(f"{name} = {getattr(self, name)}: expected a count >= 0 (0: {name} unused).")
        if self.epochs <= 0 and self.max_steps == 0:
            raise FinetuneError(f"epochs = {self.epochs}: expected a positive number (or set max_steps).")
        if not 0.0 <= self.eval_share < 1.0:
            raise FinetuneError(f"eval_share = {self.eval_share}: expected a share within [0, 1).")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise FinetuneError(f"lora_dropout = {self.lora_dropout}: expected a probability within [0, 1).")
        if self.lr <= 0 or self.max_grad_norm <= 0 or not 0.0 <= self.warmup_share < 1.0:
            raise FinetuneError(f"lr = {self.lr}, max_grad_norm = {self.max_grad_norm}, warmup_share = "
                                f"{self.warmup_share}: expected positive lr and norm, and a share within [0, 1).")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise FinetuneError(f"precision = {self.precision!r}: expected 'auto', 'fp32' or 'bf16'.")
        if self.base_repo_id is not None:
            from huggingface_hub.utils import HFValidationError, validate_repo_id

            try:
                validate_repo_id(self.base_repo_id)
            except HFValidationError as error:
                raise FinetuneError(f"base_repo_id = {self.base_repo_id!r} is not a hub id ({error}).") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_model_dir(model_dir) -> Path:
    """The hybrid checkpoint folder, resolved; raises FinetuneError with the fix when it is not one."""
    folder = Path(model_dir).resolve()
    if not (folder / "config.json").is_file():
        raise FinetuneError(
            f"{model_dir} is not a model folder (no config.json): pass a hybrid checkpoint folder written by "
            "`hf-effattn convert` or hf_effattn.checkpoint.save_checkpoint."
        )
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    if model_type != "effattn":
        raise FinetuneError(
            f"{model_dir} holds a {model_type!r} model, not an hf_effattn hybrid: convert it first with "
            "`hf-effattn convert --teacher ...`."
        )
    try:
        check_remote_code(folder)
    except RuntimeError as error:
        raise FinetuneError(
            f"{error} Adapters must load where hf_effattn is not installed: resave the model with "
            "hf_effattn.checkpoint.save_checkpoint."
        ) from None
    return folder


def make_accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available())


def autocast(precision: str, device: torch.device):
    """bf16 autocast for `precision` "bf16" (or "auto" on CUDA), fp32 weights kept; a no-op otherwise.

    Not accelerate's mixed precision: its process-wide state could not change between two runs in one process.
    """
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


def enable_activation_checkpointing(model) -> None:
    # transformers 5.23 renamed gradient checkpointing to activation checkpointing
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class CausalLMLoss(nn.Module):
    """Summed next-token cross-entropy over the target positions; the LM head runs only there."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels):
        lm = self.model.get_base_model()
        hidden = lm.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        logits = lm.lm_head(hidden[:, :-1][keep]).float()
        return F.cross_entropy(logits, targets[keep], reduction="sum")


class BatchSchedule:
    """Micro-batch `j` holds examples `j * batch_size ...` of an endless sequence of seeded per-epoch shuffles.

    Step `s`, accumulation `a`, process `r` of `world` takes micro-batch `(s * grad_accum + a) * world + r`.
    """

    def __init__(self, num_examples: int, batch_size: int, grad_accum: int, world: int, seed: int):
        self.num_examples, self.batch_size, self.grad_accum, self.world = num_examples, batch_size, grad_accum, world
        self.seed = seed
        self._orders = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._orders[epoch] = torch.randperm(self.num_examples, generator=generator).tolist()
        return self._orders[epoch]

    def indices(self, step: int, accumulation: int, rank: int) -> list[int]:
        micro_batch = (step * self.grad_accum + accumulation) * self.world + rank
        positions = range(micro_batch * self.batch_size, (micro_batch + 1) * self.batch_size)
        return [self._order(p // self.num_examples)[p % self.num_examples] for p in positions]

    def steps_for(self, epochs: float) -> int:
        per_step = self.batch_size * self.grad_accum * self.world
        return max(1, math.ceil(epochs * self.num_examples / per_step))


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@torch.no_grad()
def evaluate(loss_module, examples, batch_size: int, pad_token_id: int, accelerator, precision: str) -> float:
    """Token-mean cross-entropy on the target tokens of `examples` (each process takes every world-th batch)."""
    was_training = loss_module.training
    loss_module.eval()
    world, rank = accelerator.num_processes, accelerator.process_index
    totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    batches = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
    for batch in batches[rank::world]:
        tensors = {k: v.to(accelerator.device) for k, v in collate(batch, pad_token_id).items()}
        with autocast(precision, accelerator.device):
            totals[0] += loss_module(**tensors).double()
        totals[1] += count_targets(tensors["labels"])
    totals = accelerator.reduce(totals, reduction="sum")
    loss_module.train(was_training)
    return float(totals[0] / totals[1].clamp_min(1))


def train(peft_model, train_examples, eval_examples, config: FinetuneConfig, accelerator, workdir, pad_token_id: int,
          log=print) -> dict:
    """Trains the adapter of `peft_model` in place; resumes from `workdir`'s checkpoint when there is one.

    Returns the history: per-step training loss, evaluation losses by step, tokens, seconds.
    """
    from tqdm.auto import tqdm

    world = accelerator.num_processes
    schedule = BatchSchedule(len(train_examples), config.batch_size, config.grad_accum, world, config.seed)
    total_steps = config.max_steps or schedule.steps_for(config.epochs)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.999), weight_decay=config.weight_decay)
    module, optimizer = accelerator.prepare(CausalLMLoss(peft_model), optimizer)
    unwrapped = accelerator.unwrap_model(module).model

    def run_eval(step: int, history: dict) -> None:
        if eval_examples:
            loss = evaluate(module, eval_examples, config.batch_size, pad_token_id, accelerator, config.precision)
            history["eval"].append({"step": step, "loss": loss})
            log(f"eval loss at step {step}: {loss:.4f}")

    history = {"losses": [], "eval": [], "tokens": 0, "target_tokens": 0, "seconds": 0.0, "steps": total_steps}
    start_step = 0
    saved = workdir.load(CHECKPOINT_NAME)
    if saved is not None:
        load_trainable_state(unwrapped, saved["trainable"])
        optimizer.load_state_dict(saved["optimizer"])
        _set_rng_state(saved["rng"])
        history, start_step = saved["history"], saved["step"]
        log(f"resuming at step {start_step} of {total_steps}")
    else:
        run_eval(0, history)
    module.train()
    bar = tqdm(total=total_steps, initial=start_step, desc="finetune", disable=not accelerator.is_local_main_process)
    started = time.time() - history["seconds"]
    for step in range(start_step, total_steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config.lr, step, total_steps, config.warmup_share)
        micro_batches = [collate([train_examples[i] for i in schedule.indices(step, a, accelerator.process_index)],
                                 pad_token_id) for a in range(config.grad_accum)]
        # [target tokens, input tokens] of the step, over all processes
        counts = torch.tensor([[count_targets(b["labels"]), int(b["attention_mask"].sum())] for b in micro_batches],
                              dtype=torch.float64, device=accelerator.device).sum(0)
        targets, tokens = accelerator.reduce(counts, reduction="sum")
        # DDP averages gradients over processes: scale so that the result is the mean over all target tokens
        scale = world / targets.clamp_min(1.0)
        step_loss = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        for a, batch in enumerate(micro_batches):
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            last = a == config.grad_accum - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(module):
                with autocast(config.precision, accelerator.device):
                    loss_sum = module(**batch)
                accelerator.backward(loss_sum * scale)
            step_loss += loss_sum.detach().double()
        step_loss = float(accelerator.reduce(step_loss, reduction="sum") / targets.clamp_min(1.0))
        if not math.isfinite(step_loss):
            raise FinetuneError(
                f"The training loss became {step_loss} at step {step}; the last checkpoint is kept in "
                f"{workdir.root}. Lower --lr or use --precision fp32, then rerun."
            )
        accelerator.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history["losses"].append(step_loss)
        history["target_tokens"] += int(targets)
        history["tokens"] += int(tokens)
        history["seconds"] = time.time() - started
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}")
        done = step + 1
        if config.eval_every and done % config.eval_every == 0 and done != total_steps:
            run_eval(done, history)
        if done == total_steps:
            run_eval(done, history)
        if done % config.save_every == 0 or done == total_steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                workdir.save(CHECKPOINT_NAME, {"step": done, "trainable": trainable_state(unwrapped),
                                               "optimizer": optimizer.state_dict(), "rng": _rng_state(),
                                               "history": history})
    bar.close()
    module.eval()
    return history


def prepare_model(model_dir: Path, config: FinetuneConfig, device):
    """The base hybrid (fp32 weights, frozen) wrapped in a PEFT LoRA model per `config`."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    # an absolute path: the adapter records it as its base
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), trust_remote_code=True, dtype=torch.float32)
    model = model.to(device)
    choices = {name: getattr(config, name) for name in LORA_CHOICES}
    alpha = config.lora_alpha or 2 * config.lora_r
    lora = lora_config(model, r=config.lora_r, alpha=alpha, dropout=config.lora_dropout, **choices)
    torch.manual_seed(config.seed)
    peft_model = get_peft_model(model, lora)
    if config.gradient_checkpointing:
        enable_activation_checkpointing(peft_model.get_base_model())
    return peft_model


def load_examples(tokenizer, data, config: FinetuneConfig) -> tuple[list, list, dict]:
    """(train, eval, counts) for `config`: records read and checked, tokenized, split or read from eval_data."""
    # packed examples run on from one block into the next: only evaluation examples (one a row) are cut
    cut = None if config.packing else config.max_length
    train, counts = tokenize_records(tokenizer, read_jsonl(data), cut, str(data))
    if config.eval_data:
        held_out, eval_counts = tokenize_records(tokenizer, read_jsonl(config.eval_data), config.max_length,
                                                 str(config.eval_data))
        counts["eval_file"] = eval_counts
    else:
        train, held_out = split_examples(train, config.eval_share, config.seed)
        if config.packing and held_out:
            held_out, counts["eval_truncated"], counts["eval_dropped"] = truncate_examples(
                held_out, config.max_length, f"the evaluation share of {data}")
    counts["train_examples"], counts["eval_examples"] = len(train), len(held_out)
    if config.packing:
        train = pack_examples(train, config.max_length)
        counts["train_blocks"] = len(train)
    return train, held_out, counts


def _silent(*args, **kwargs) -> None:
    pass


def finetune(model_dir, data, output_dir, config: FinetuneConfig, overwrite: bool = False, keep_work: bool = False,
             log=print) -> Path:
    """Fine-tunes a LoRA adapter for the hybrid in `model_dir` on the JSONL file `data`; returns the adapter folder.

    Everything that can be checked (options, model folder, data) is checked before the model loads.
    """
    from transformers import AutoTokenizer

    from hf_effattn import __version__

    started = time.time()
    output = Path(output_dir).resolve()
    if output.exists() and not overwrite:
        raise FinetuneError(f"{output} already exists: pass --overwrite to replace it.")
    config.validate()
    model_path = check_model_dir(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_examples, eval_examples, counts = load_examples(tokenizer, data, config)
    accelerator = make_accelerator()
    if not accelerator.is_main_process:
        log = _silent
    log(f"data: {counts['train_examples']} training and {counts['eval_examples']} evaluation examples "
        f"({counts['truncated']} truncated to {config.max_length} tokens, {counts['dropped']} without targets dropped)"
        + (f", packed into {counts['train_blocks']} blocks" if config.packing else ""))

    workdir = WorkDir(output)
    identity = {
        "model": str(model_path),
        "data": file_digest(data),
        "eval_data": file_digest(config.eval_data) if config.eval_data else None,
        "config": config.to_dict(),
        "processes": accelerator.num_processes,
        "hf_effattn": __version__,
    }
    # the LoRA targets are checked on the model, before the work folder exists
    peft_model = prepare_model(model_path, config, accelerator.device)
    # the main process creates the work folder; the others then check that it is theirs
    with accelerator.main_process_first():
        resuming = workdir.open(identity)
    if resuming:
        log(f"resuming the unfinished run in {workdir.root}")
    trainable, total = peft_model.get_nb_trainable_parameters()
    log(f"LoRA r={config.lora_r} on {sorted(peft_model.peft_config['default'].target_modules)}; "
        f"{trainable:,} of {total:,} parameters train")
    frozen = unreachable_mixer_parameters(peft_model) if config.train_mixer_params else []
    if frozen:
        log(f"note: {frozen} are held directly by the mixer modules and stay frozen (see --modules-to-save)")
    history = train(peft_model, train_examples, eval_examples, config, accelerator, workdir, pad_token_id, log)
    if not accelerator.is_main_process:
        return output

    report = {
        "base_model": str(model_path),
        "base_repo_id": config.base_repo_id,
        "data": {"file": Path(data).name, "sha256": identity["data"], **counts},
        "config": config.to_dict(),
        "lora": {
            "target_modules": sorted(peft_model.peft_config["default"].target_modules),
            "modules_to_save": sorted(peft_model.peft_config["default"].modules_to_save or []),
            "trainable_parameters": trainable,
            "total_parameters": total,
        },
        "history": history,
        "device": str(accelerator.device) + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else
                                             f" ({platform.machine()}, {torch.get_num_threads()} threads)"),
        "processes": accelerator.num_processes,
        "hf_effattn": __version__,
        "total_seconds": time.time() - started,
    }
    with atomic_folder(output) as staging:
        peft_model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        write_extra_files(staging, {REPORT_NAME: json.dumps(report, indent=2) + "\n"})
    if not keep_work:
        workdir.remove()
    losses = history["losses"]
    log(f"training loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps")
    if history["eval"]:
        log(f"eval loss {history['eval'][0]['loss']:.4f} -> {history['eval'][-1]['loss']:.4f}")
    log(f"saved the adapter to {output} ({report['total_seconds']:.0f} s)")
    return output
