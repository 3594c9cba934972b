"""Loaded before tests/conftest.py: on a machine without a GPU, Triton kernels run through Triton's interpreter.

The choice is made when triton is first imported (transformers imports it), hence this file at the root.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
