"""Turning existing checkpoints into hf_effattn hybrids (installed as `hf_effattn.conversion`)."""

from .teachers import EMBEDDED_TEACHER, SUPPORTED_FAMILIES, load_teacher
from .weight_map import config_from_teacher, effattn_from_teacher, map_teacher_state_dict, select_full_layers

__all__ = [
    "EMBEDDED_TEACHER",
    "SUPPORTED_FAMILIES",
    "config_from_teacher",
    "effattn_from_teacher",
    "load_teacher",
    "map_teacher_state_dict",
    "select_full_layers",
]
