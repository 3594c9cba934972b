"""The conversion pipeline: layout, stage 0 (initialisation), stage 1 (attention transfer), stage 2 (distillation).

- Layout: which layers keep full attention. `auto` ranks layers by the loss increase when that layer alone is
  replaced by its freshly initialised efficient mixer, on held-in text and on synthetic retrieval samples (the
  answer tokens only), and keeps the most sensitive ones.
- Stage 0: `effattn_from_teacher` copies every teacher weight; new mixer parameters start where the mixer is closest
  to the teacher (a windowed linear layer starts as the teacher's attention over its window and sinks).
- Stage 1: only the new mixer parameters train, so that each replaced layer's output matches the teacher's attention
  output on the teacher's own layer inputs (relative MSE); teacher outputs are computed on the fly with hooks.
- Stage 2: KL to the teacher's logits (plus optional cross-entropy), with PEFT LoRA on q/k/v/o (merged at the end)
  or full fine-tuning; the new mixer parameters keep training.

Training runs through `accelerate` (one process on CPU or one GPU; several GPUs with `accelerate launch`), every
`save_every` steps a checkpoint is written atomically to the work folder, and a rerun resumes from it.
"""

import copy
import math
import random
import re
import time

import torch
import torch.nn.functional as F
from torch import nn

from hf_effattn.configuration_effattn import LINEAR_KINDS, resolve_mixer_options
from hf_effattn.modeling_effattn import MIXER_CLASSES

from .data import pack, retrieval_sample
from .weight_map import effattn_from_teacher, select_full_layers

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
KL_CHUNK = 1024  # positions per chunk of the vocabulary-sized KL


class ConversionError(RuntimeError):
    pass


def mixer_options_for(recipe) -> dict:
    """The hybrid's `mixer_options` for a recipe (the window and sinks of the replacement mixer)."""
    if recipe.mixer in LINEAR_KINDS:
        return {recipe.mixer: {"window": recipe.window, "sink_tokens": recipe.sink_tokens if recipe.window else 0}}
    if recipe.mixer == "sliding":
        return {"sliding": {"window": recipe.window, "sink_tokens": recipe.sink_tokens}}
    if recipe.mixer == "block_topk":
        return {}  # the kind's defaults: blocks of 64 tokens, the top 16 plus the first and the local block
    return {"hedgehog": {"window": recipe.window}}


def _decoder(model):
    """The decoder stack (`.layers`, `.embed_tokens`) of a transformers causal LM."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model.model


# ---------------------------------------------------------------------------------------------------------- layout


def fresh_mixer(model, layer_idx: int, kind: str, mixer_options: dict) -> nn.Module:
    """Layer `layer_idx`'s mixer rebuilt as `kind`, initialised as in stage 0 (teacher projections copied)."""
    config = copy.deepcopy(model.config)
    config.mixer_types = list(config.mixer_types)
    config.mixer_types[layer_idx] = kind
    merged = {k: dict(v) for k, v in config.mixer_options.items()}
    for name, values in mixer_options.items():
        merged[name].update(values)
    config.mixer_options = resolve_mixer_options(merged)
    mixer = MIXER_CLASSES[kind](config, layer_idx)
    mixer.apply(model._init_weights)
    source = model.model.layers[layer_idx].self_attn.state_dict()
    result = mixer.load_state_dict(source, strict=False)
    if result.unexpected_keys:
        raise ConversionError(f"Layer {layer_idx}: {kind} has no place for {result.unexpected_keys}.")
    reference = next(model.parameters())
    return mixer.to(device=reference.device, dtype=reference.dtype)


class _LayerInputs:
    """Records what every decoder layer receives during one forward pass (hidden states and keyword arguments)."""

    def __init__(self, model):
        self.inputs = {}
        self.handles = [
            layer.register_forward_pre_hook(self._hook(i), with_kwargs=True) for i, layer in enumerate(model.model.layers)
        ]

    def _hook(self, i):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            self.inputs[i] = (hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"})

        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def _probe_losses(model, hidden, num_text: int, targets: torch.Tensor, answer_tokens: int) -> tuple[float, float]:
    """(text loss, retrieval-answer loss) from final hidden states of `[text rows; retrieval rows]`."""
    hidden = model.model.norm(hidden)
    text_logits = model.lm_head(hidden[:num_text, :-1]).float()
    text_loss = F.cross_entropy(text_logits.reshape(-1, text_logits.shape[-1]), targets[:num_text, 1:].reshape(-1))
    answer_logits = model.lm_head(hidden[num_text:, -answer_tokens - 1 : -1]).float()
    answer = targets[num_text:, -answer_tokens:]
    retrieval_loss = F.cross_entropy(answer_logits.reshape(-1, answer_logits.shape[-1]), answer.reshape(-1))
    return text_loss.item(), retrieval_loss.item()


@torch.no_grad()
def rank_layers(teacher, tokenizer, recipe, documents, progress=None) -> list[dict]:
    """Per-layer sensitivity: loss increase (text + retrieval answers) when that layer alone is replaced by its
    stage-0 mixer. Layers before the replaced one are unchanged, so each probe reruns only the layers after it."""
    probe, _ = effattn_from_teacher(teacher)
    probe = probe.to(next(teacher.parameters()).device).eval()
    seq_len, count = recipe.sensitivity_seq_len, max(recipe.sensitivity_samples, 1)
    text = pack(tokenizer, documents, seq_len, max(count // 4, 1), seed=recipe.seed + 1)
    rng = random.Random(f"sensitivity-{recipe.seed}")
    retrieval = torch.tensor([retrieval_sample(tokenizer, documents, seq_len, rng) for _ in range(count)])
    batch = torch.cat([text, retrieval]).to(probe.device)
    # the answer: the number and its full stop at the end of each retrieval sample
    answer_tokens = 4
    recorder = _LayerInputs(probe)
    try:
        probe.model(input_ids=batch, use_cache=False)
    finally:
        recorder.remove()
    layers = probe.model.layers

    def losses_from(start: int):
        # the last layer's output (before the final norm, which _probe_losses applies)
        hidden = recorder.inputs[start][0]
        for j in range(start, len(layers)):
            hidden = layers[j](hidden, **recorder.inputs[j][1])
        return _probe_losses(probe, hidden, text.shape[0], batch, answer_tokens)

    base_text, base_retrieval = losses_from(0)
    options = mixer_options_for(recipe)
    scores = []
    for i in range(len(layers)):
        original = layers[i].self_attn
        layers[i].self_attn = fresh_mixer(probe, i, recipe.mixer, options)
        text_loss, retrieval_loss = losses_from(i)
        layers[i].self_attn = original
        scores.append(
            {
                "layer": i,
                "text_loss_increase": text_loss - base_text,
                "retrieval_loss_increase": retrieval_loss - base_retrieval,
                "score": (text_loss - base_text) + (retrieval_loss - base_retrieval),
            }
        )
        if progress is not None:
            progress.update(1)
    return scores


def choose_full_layers(recipe, num_layers: int, scores: list[dict] | None) -> list[int]:
    if isinstance(recipe.full_layers, list):
        return sorted(set(recipe.full_layers))
    if recipe.full_layers == "uniform" or recipe.full_share == 0.0:
        return select_full_layers(num_layers, recipe.full_share)
    count = round(recipe.full_share * num_layers)
    ranked = sorted(scores, key=lambda s: s["score"], reverse=True)
    return sorted(s["layer"] for s in ranked[:count])


# --------------------------------------------------------------------------------------------------------- stage 1


def layer_index(name: str) -> int | None:
    """The decoder layer a parameter name belongs to (`model.layers.3.self_attn...` -> 3), None outside layers."""
    match = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def stage1_layer_blocks(replaced: list[int], size: int) -> list[list[int]]:
    """The replaced layers in the blocks that stage 1 trains one after another, `size` layers each (0: one block)."""
    if size <= 0 or not replaced:
        return [list(replaced)]
    return [list(replaced[k : k + size]) for k in range(0, len(replaced), size)]


class _EnoughLayers(Exception):
    """Raised from a hook to stop the teacher's forward pass once the last layer needed has run."""


def capture_attention(teacher, layer_indices, input_ids):
    """Runs the teacher up to the attention of the last of `layer_indices` (the layers after it are not run);
    returns {layer: (attention input, attention output)} and the rotary embeddings."""
    records, rotary = {}, {}
    hooks = []
    layers = _decoder(teacher).layers
    last = max(layer_indices)

    def make_hook(i):
        def hook(module, args, kwargs, output):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            records[i] = (hidden.detach(), (output[0] if isinstance(output, tuple) else output).detach())
            rotary["value"] = kwargs.get("position_embeddings")
            if i == last:
                raise _EnoughLayers

        return hook

    for i in layer_indices:
        hooks.append(layers[i].self_attn.register_forward_hook(make_hook(i), with_kwargs=True))
    try:
        with torch.no_grad():
            _decoder(teacher)(input_ids=input_ids, use_cache=False)
    except _EnoughLayers:
        pass
    finally:
        for handle in hooks:
            handle.remove()
    return records, rotary["value"]


class AttentionTransferLoss(nn.Module):
    """Mean over replaced layers and samples of ||mixer(x) - teacher_attention(x)||^2 / ||teacher_attention(x)||^2.

    Each sample's error is relative to its own target, so a batch split over several processes (each averaging its
    share) gives the same loss and gradients as the whole batch in one process."""

    def __init__(self, student, layer_indices):
        super().__init__()
        self.student = student
        self.layer_indices = list(layer_indices)

    def forward(self, records, position_embeddings):
        errors = []
        layers = self.student.model.layers
        dtype = next(self.student.parameters()).dtype
        # the teacher may run in another precision than the student's weights
        position_embeddings = tuple(x.to(dtype) for x in position_embeddings)
        for i in self.layer_indices:
            hidden, target = records[i]
            output = layers[i].self_attn(hidden_states=hidden.to(dtype), position_embeddings=position_embeddings)
            # [B, T, D] -> [B]
            target = target.float().flatten(1)
            per_sample = (output.float().flatten(1) - target).pow(2).mean(1) / target.pow(2).mean(1).clamp_min(1e-12)
            errors.append(per_sample.mean())
        errors = torch.stack(errors)
        return errors.mean(), errors.detach()


# --------------------------------------------------------------------------------------------------------- stage 2


def chunked_kl(student_hidden, student_head, teacher_logits_fn, temperature: float, labels=None, ce_weight=0.0,
               weights=None):
    """Token-mean KL(teacher || student) over the vocabulary, `KL_CHUNK` positions at a time (logits are never
    materialised for the whole sequence; each student chunk is recomputed in the backward pass).

    `weights` (`[B, T]`, optional) scales each position's KL; the mean still divides by the number of positions,
    so weights above 1 add emphasis rather than renormalising it away."""
    total_kl, total_ce, count = 0.0, 0.0, 0
    seq_len = student_hidden.shape[1]
    for start in range(0, seq_len, KL_CHUNK):
        stop = min(start + KL_CHUNK, seq_len)
        with torch.no_grad():
            teacher_log_probs = F.log_softmax(teacher_logits_fn(start, stop).float() / temperature, dim=-1)

        def piece(hidden, teacher_log_probs=teacher_log_probs, start=start, stop=stop):
            student_logits = student_head(hidden).float()
            log_probs = F.log_softmax(student_logits / temperature, dim=-1)
            kl = (teacher_log_probs.exp() * (teacher_log_probs - log_probs)).sum(-1)
            kl = (kl * weights[:, start:stop]).sum() if weights is not None else kl.sum()
            ce = torch.zeros((), device=hidden.device)
            if ce_weight and labels is not None:
                shifted = labels[:, start + 1 : stop + 1]
                ce = F.cross_entropy(
                    student_logits[:, : shifted.shape[1]].reshape(-1, student_logits.shape[-1]),
                    shifted.reshape(-1),
                    reduction="sum",
                )
            return kl, ce

        hidden = student_hidden[:, start:stop]
        if torch.is_grad_enabled() and hidden.requires_grad:
            kl, ce = torch.utils.checkpoint.checkpoint(piece, hidden, use_reentrant=False)
        else:
            kl, ce = piece(hidden)
        total_kl = total_kl + kl
        total_ce = total_ce + ce
        count += hidden.shape[0] * hidden.shape[1]
    kl = total_kl * temperature**2 / count
    return kl, (total_ce / max(count - student_hidden.shape[0], 1)) if ce_weight else None


class DistillationLoss(nn.Module):
    """KL(teacher || student) on the logits (+ `ce_weight` x next-token cross-entropy)."""

    def __init__(self, student, temperature: float, ce_weight: float):
        super().__init__()
        self.student = student
        self.temperature = temperature
        self.ce_weight = ce_weight

    def causal_lm(self):
        model = self.student
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def forward(self, input_ids, teacher_hidden, teacher_head, weights=None):
        lm = self.causal_lm()
        hidden = lm.model(input_ids=input_ids, use_cache=False).last_hidden_state
        kl, ce = chunked_kl(
            hidden,
            lm.lm_head,
            lambda start, stop: teacher_head(teacher_hidden[:, start:stop]),
            self.temperature,
            labels=input_ids,
            ce_weight=self.ce_weight,
            weights=weights,
        )
        loss = kl if ce is None else kl + self.ce_weight * ce
        return loss, kl.detach()


# ----------------------------------------------------------------------------------------------------- training loop


def learning_rate(base: float, step: int, total: int, warmup_share: float) -> float:
    """Linear warmup, then cosine decay to a tenth of `base`."""
    warmup = max(int(total * warmup_share), 1)
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return base * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def trainable_state(model) -> dict:
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, state: dict) -> None:
    params = dict(model.named_parameters())
    missing = [name for name in state if name not in params]
    if missing:
        raise ConversionError(f"A saved checkpoint has parameters this model lacks: {missing[:5]}.")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def run_stage(
    name: str,
    loss_module: nn.Module,
    batches,
    num_steps: int,
    lr: float,
    recipe,
    accelerator,
    workdir,
    loss_fn,
    log,
):
    """The shared loop of stages 1 and 2: AdamW with warmup+cosine, gradient clipping, atomic checkpoints every
    `save_every` steps, resume from the last one. `loss_fn(module, batch) -> (loss, metrics tensor)`.
    Returns {"losses": [...], "metrics": [...], "seconds": float, "tokens": int}."""
    from tqdm.auto import tqdm

    params = [p for p in loss_module.parameters() if p.requires_grad]
    if not params or num_steps == 0:
        return {"losses": [], "metrics": [], "seconds": 0.0, "tokens": 0, "skipped": True}
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    module, optimizer = accelerator.prepare(loss_module, optimizer)
    unwrapped = accelerator.unwrap_model(module)
    history = {"losses": [], "metrics": [], "seconds": 0.0, "tokens": 0}
    start_step = 0
    saved = workdir.load(f"{name}-checkpoint.pt")
    if saved is not None:
        load_trainable_state(unwrapped, saved["trainable"])
        optimizer.load_state_dict(saved["optimizer"])
        history = saved["history"]
        start_step = saved["step"]
        log(f"{name}: resuming at step {start_step} of {num_steps}")
    module.train()
    bar = tqdm(total=num_steps, initial=start_step, desc=name, disable=not accelerator.is_local_main_process)
    started = time.time() - history["seconds"]
    for step in range(start_step, num_steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(lr, step, num_steps, recipe.warmup_share)
        batch = batches(step)
        with accelerator.autocast():
            loss, metrics = loss_fn(module, batch)
        if not torch.isfinite(loss):
            raise ConversionError(
                f"{name}: the loss became {loss.item()} at step {step}. The last checkpoint (step "
                f"{start_step if saved is None else saved['step']}) is kept in {workdir.root}; lower the learning "
                "rate or use --precision fp32, then rerun."
            )
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history["losses"].append(accelerator.gather(loss.detach()[None]).mean().item())
        history["metrics"].append(metrics.float().cpu().tolist() if metrics.dim() else float(metrics))
        history["tokens"] += batch_tokens(batch) * accelerator.num_processes
        history["seconds"] = time.time() - started
        bar.update(1)
        bar.set_postfix(loss=f"{history['losses'][-1]:.4f}")
        done = step + 1
        if done % recipe.save_every == 0 or done == num_steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                saved = {"step": done, "trainable": trainable_state(unwrapped), "optimizer": optimizer.state_dict(),
                         "history": history}
                workdir.save(f"{name}-checkpoint.pt", saved)
    bar.close()
    module.eval()
    return history


def batch_tokens(batch) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.numel()
    if "input_ids" in batch:
        return batch["input_ids"].numel()
    return int(batch["tokens"])
