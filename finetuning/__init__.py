"""LoRA fine-tuning of hybrids with PEFT (installed as `hf_effattn.finetuning`).

    hf-effattn finetune runs/my-hybrid --data chats.jsonl --output runs/my-adapter
    hf-effattn merge runs/my-adapter --output runs/my-hybrid-tuned
"""

from .data import FinetuneDataError, read_jsonl, tokenize_records
from .lora import (
    AdapterError,
    default_target_modules,
    load_adapter_model,
    lora_config,
    merge_adapter,
    mixer_modules_to_save,
    rewrite_adapter_base,
)
from .trainer import FinetuneConfig, FinetuneError, finetune

__all__ = [
    "AdapterError",
    "FinetuneConfig",
    "FinetuneDataError",
    "FinetuneError",
    "default_target_modules",
    "finetune",
    "load_adapter_model",
    "lora_config",
    "merge_adapter",
    "mixer_modules_to_save",
    "read_jsonl",
    "rewrite_adapter_base",
    "tokenize_records",
]
