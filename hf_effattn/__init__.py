"""hf_effattn: efficient-attention hybrid causal LMs for transformers.

Importing the package registers `EffAttnConfig` and its models with transformers' Auto classes.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_effattn import MIXER_DEFAULTS, MIXER_LAYER_TYPES, EffAttnConfig
from .modeling_effattn import EffAttnForCausalLM, EffAttnModel, EffAttnPreTrainedModel

__version__ = "0.1.0"

AutoConfig.register(EffAttnConfig.model_type, EffAttnConfig, exist_ok=True)
AutoModel.register(EffAttnConfig, EffAttnModel, exist_ok=True)
AutoModelForCausalLM.register(EffAttnConfig, EffAttnForCausalLM, exist_ok=True)
# save_pretrained then writes `auto_map` and copies the flat model files: every checkpoint is remote code
EffAttnConfig.register_for_auto_class()
EffAttnModel.register_for_auto_class("AutoModel")
EffAttnForCausalLM.register_for_auto_class("AutoModelForCausalLM")

MIXER_KINDS = tuple(MIXER_LAYER_TYPES)

__all__ = [
    "MIXER_DEFAULTS",
    "MIXER_KINDS",
    "EffAttnConfig",
    "EffAttnForCausalLM",
    "EffAttnModel",
    "EffAttnPreTrainedModel",
]
