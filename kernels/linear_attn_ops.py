"""The fused recurrent linear-attention op registered as a torch custom op, for compiled decode.

`torch.compile` cannot trace a Triton launch from Python (`fused_recurrent_linear_attention` is excluded from
compilation), so a compiled decode step used to trace the torch reference step instead. As a custom op with a
shape-only fake implementation, the kernel stays one opaque node of the compiled graph and CUDA graphs capture its
launch: the compiled decode runs the kernel.
"""

import torch

from .linear_attn import fused_recurrent_linear_attention

RECURRENT_OP_NAME = "hf_effattn::fused_recurrent_linear_attention"


def _registered_op(qualified_name: str):
    namespace, name = qualified_name.split("::")
    try:
        return getattr(getattr(torch.ops, namespace), name)
    except (AttributeError, RuntimeError):
        return None


def _recurrent_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    beta: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return fused_recurrent_linear_attention(q, k, v, g, beta, scale, initial_state, True)


def _recurrent_fake(q, k, v, g, beta, initial_state, scale):
    # o [B, T, HV, V] in q's dtype; final state [B, HV, K, V] in fp32
    o = v.new_empty(v.shape, dtype=q.dtype)
    return o, q.new_empty(q.shape[0], v.shape[2], q.shape[3], v.shape[3], dtype=torch.float32)


def _register():
    # this file is imported under two module names (the kernels package, and the flat copy beside the model that
    # checkpoints carry): the first import registers the op, later ones reuse it
    op = _registered_op(RECURRENT_OP_NAME)
    if op is None:
        torch.library.custom_op(RECURRENT_OP_NAME, _recurrent_impl, mutates_args=()).register_fake(_recurrent_fake)
        op = _registered_op(RECURRENT_OP_NAME)
    return op


_recurrent_op = _register()


def fused_recurrent_linear_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
):
    """`fused_recurrent_linear_attention` through the registered custom op (forward only, no `cu_seqlens`): the form
    that runs inside `torch.compile` graphs and CUDA-graph replays. Same arguments and results.

    Args:
        q, k: `[B, T, H, K]`. v: `[B, T, HV, V]`, HV a multiple of H.
        g: log decay `[B, T, HV]` or `[B, T, HV, K]`; None = no decay. beta: `[B, T, HV]`; None = additive write.
        initial_state: `[B, HV, K, V]`.
    Returns:
        o `[B, T, HV, V]` in q's dtype, and the fp32 final state `[B, HV, K, V]` (None unless `output_final_state`).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    o, ht = _recurrent_op(q, k, v, g, beta, initial_state, scale)
    return o, (ht if output_final_state else None)
