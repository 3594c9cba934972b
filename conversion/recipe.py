"""Conversion recipes: every knob of a conversion in one dataclass, with named presets.

`cpu` is the default: it fits in under 30 minutes on a 2-core CPU for a 135M teacher. `gpu` is the longer recipe
for one GPU (bf16, 1k-2k-token sequences, about 20x the tokens).
"""

import dataclasses
from dataclasses import dataclass, field

from .data import TEACHER_SOURCE, data_sources

EFFICIENT_MIXERS = ("gdn", "deltanet", "gla", "kda", "hedgehog", "sliding", "block_topk")


class RecipeError(ValueError):
    pass


@dataclass
class Recipe:
    # layout
    mixer: str = "gdn"
    full_share: float = 0.25
    full_layers: str | list[int] = "auto"  # "auto", "uniform" or explicit indices
    window: int = 64  # softmax window inside linear layers (0: pure linear); the window of `sliding`
    sink_tokens: int = 4
    # data
    data: str = "stdlib"
    retrieval_share: float = 0.5
    answer_weight: float = 20.0  # stage-2 KL weight of the positions that predict a retrieval answer (text: 1)
    # documents the teacher writes when `data` includes `teacher` (e.g. "stdlib+teacher"), and their length
    teacher_documents: int = 64
    teacher_document_tokens: int = 256
    # layer ranking for full_layers="auto": loss increase when one layer alone is replaced
    sensitivity_samples: int = 4
    sensitivity_seq_len: int = 512
    # stage 1: attention transfer (new mixer parameters only, attention-output MSE)
    stage1_steps: int = 40
    stage1_lr: float = 1e-2
    stage1_seq_len: int = 512
    stage1_layer_block: int = 0  # replaced layers trained together, block after block (0: all at once)
    # stage 2: end-to-end logit distillation
    stage2_steps: int = 140
    stage2_lr: float = 1e-3
    stage2_seq_lens: list[int] = field(default_factory=lambda: [512, 1024])
    lora_r: int = 8  # 0: full fine-tuning
    lora_alpha: int = 16
    kl_temperature: float = 1.0
    ce_weight: float = 0.0
    batch_size: int = 1
    warmup_share: float = 0.1
    gradient_checkpointing: bool = False
    # runtime
    save_every: int = 20
    seed: int = 0
    precision: str = "auto"  # "auto": bf16 on CUDA, fp32 on CPU; or "fp32" / "bf16"
    # quick quality check written to the report
    eval_lengths: list[int] = field(default_factory=lambda: [1024])
    eval_samples: int = 6
    eval_ppl_blocks: int = 4
    eval_ppl_seq_len: int = 1024

    def validate(self, num_layers: int | None = None) -> None:
        if self.mixer not in EFFICIENT_MIXERS:
            raise RecipeError(f"mixer = {self.mixer!r}: expected one of {EFFICIENT_MIXERS}.")
        if not 0.0 <= self.full_share <= 1.0:
            raise RecipeError(f"full_share = {self.full_share}: expected a share within [0, 1] (0.25 keeps a quarter).")
        if isinstance(self.full_layers, str) and self.full_layers not in ("auto", "uniform"):
            raise RecipeError(f"full_layers = {self.full_layers!r}: expected 'auto', 'uniform' or a list of indices.")
        if isinstance(self.full_layers, list) and num_layers is not None:
            bad = [i for i in self.full_layers if not 0 <= i < num_layers]
            if bad:
                raise RecipeError(f"full_layers {bad} out of range: the teacher has layers 0..{num_layers - 1}.")
        if self.window == 1 or self.window < 0:
            raise RecipeError(f"window = {self.window}: expected 0 (no softmax window) or at least 2 tokens.")
        if self.mixer in ("sliding", "hedgehog") and self.window == 0:
            raise RecipeError(f"mixer {self.mixer!r} needs a window of at least 2 tokens.")
        for name in ("stage1_steps", "stage2_steps", "sensitivity_samples", "eval_samples", "eval_ppl_blocks",
                     "stage1_layer_block"):
            if getattr(self, name) < 0:
                raise RecipeError(f"{name} = {getattr(self, name)}: expected a count >= 0.")
        if TEACHER_SOURCE in data_sources(self.data) and self.teacher_documents <= 0:
            raise RecipeError(f"data = {self.data!r} asks for teacher-written text, but teacher_documents = "
                              f"{self.teacher_documents}: give a positive count (--teacher-documents).")
        for name in ("batch_size", "save_every", "stage1_seq_len", "sensitivity_seq_len", "eval_ppl_seq_len",
                     "teacher_document_tokens"):
            if getattr(self, name) <= 0:
                raise RecipeError(f"{name} = {getattr(self, name)}: expected a positive integer.")
        if not self.stage2_seq_lens or any(length < 128 for length in self.stage2_seq_lens):
            raise RecipeError(f"stage2_seq_lens = {self.stage2_seq_lens}: expected one or more lengths >= 128.")
        if self.lora_r < 0:
            raise RecipeError(f"lora_r = {self.lora_r}: expected a rank >= 0 (0: full fine-tuning).")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise RecipeError(f"precision = {self.precision!r}: expected 'auto', 'fp32' or 'bf16'.")
        if self.answer_weight < 0:
            raise RecipeError(f"answer_weight = {self.answer_weight}: expected a weight >= 0 (1: like any token).")
        if not 0.0 <= self.retrieval_share <= 1.0:
            raise RecipeError(f"retrieval_share = {self.retrieval_share}: expected a fraction within [0, 1].")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS = {
    "cpu": {},
    # measured on one H100 with the embedded teacher: 5.6 min, held-out perplexity 1.036x, passkey (lm-eval, 64 samples)
    # 98.4% / 100% / 100% at 1k / 2k / 4k; with no full layer (--full-share 0): 2.50x and passkey 1/16 at each length
    "gpu": dict(
        sensitivity_samples=8,
        sensitivity_seq_len=1024,
        stage1_steps=100,
        stage1_seq_len=1024,
        stage2_steps=300,
        stage2_lr=5e-4,
        stage2_seq_lens=[1024, 2048],
        batch_size=4,
        save_every=50,
        gradient_checkpointing=True,
        eval_lengths=[1024, 2048, 4096],
        eval_samples=16,
        eval_ppl_blocks=16,
    ),
    # a few steps of everything: checks the pipeline end to end
    "smoke": dict(
        sensitivity_samples=1,
        sensitivity_seq_len=256,
        stage1_steps=2,
        stage1_seq_len=256,
        stage2_steps=2,
        stage2_seq_lens=[256],
        save_every=1,
        eval_lengths=[256],
        eval_samples=1,
        eval_ppl_blocks=1,
        eval_ppl_seq_len=256,
    ),
}


def make_recipe(preset: str = "cpu", **overrides) -> Recipe:
    if preset not in PRESETS:
        raise RecipeError(f"Unknown recipe preset {preset!r}; presets: {sorted(PRESETS)}.")
    fields = {f.name for f in dataclasses.fields(Recipe)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise RecipeError(f"Unknown recipe fields {unknown}; fields: {sorted(fields)}.")
    values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    return Recipe(**values)
