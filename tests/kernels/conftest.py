"""Kernel tests run on the GPU when there is one, else on the CPU through Triton's interpreter."""

import os

import numpy as np
import pytest
import torch

# the conftest.py at the repository root sets TRITON_INTERPRET=1 on machines without a GPU
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _patch_interpreter_loop_bounds():
    """Triton's interpreter (3.6) turns a tensor loop bound into an int with `int(array)` on a shape-(1,) array,
    which numpy >= 2.4 refuses; give it the element instead."""
    try:
        int(np.zeros(1))
        return
    except TypeError:
        pass
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_patched_index", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._patched_index = True
    interpreter._patch_lang_tensor = patched


def _patch_interpreter_bf16_dot():
    """Triton's interpreter (3.6 to 3.9) multiplies the raw uint16 bits of bf16 dot operands; widen them to fp32
    first, as the GPU's bf16 tensor-core dot does (exact products, fp32 accumulation)."""
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    original = builder.create_dot
    if getattr(original, "_widens_bf16", False):
        return

    def widen(handle):
        if handle.dtype != tl.bfloat16:
            return handle
        data = (handle.data.astype(np.uint32) << 16).view(np.float32)
        return interpreter.TensorHandle(data, tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    create_dot._widens_bf16 = True
    builder.create_dot = create_dot


def _patch_interpreter_bf16_rounding():
    """Triton's interpreter truncates fp32 to bf16 (twice the GPU's error, which rounds to nearest even); round."""
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    original = builder.cast_impl
    if getattr(original, "_rounds_bf16", False):
        return

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            data = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16).view(torch.int16).numpy()
            return interpreter.TensorHandle(data.view(np.uint16), tl.bfloat16)
        return original(self, src, dst_type)

    cast_impl._rounds_bf16 = True
    builder.cast_impl = cast_impl


if INTERPRETED:
    pytest.importorskip("triton")
    _patch_interpreter_loop_bounds()
    _patch_interpreter_bf16_dot()
    _patch_interpreter_bf16_rounding()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
