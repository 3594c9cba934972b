"""Checking the kernels against naive references (tests and the GPU scripts in scripts/).

The linear-attention kernels are checked against the fp64 naive recurrence, the sliding-window kernels against
`naive_sliding_window_attention`. The metric is fla's: relative RMS error rms(kernel - reference) / rms(reference),
for the output, the final state and every gradient (dq, dk, dv, dg, dbeta, dh0).

Not part of the remote code that checkpoints carry: the models never import this file.
"""

import itertools
import math

import torch
import torch.nn.functional as F

from hf_effattn.ops_reference import naive_linear_attention, recurrent_linear_attention

from .linear_attn import chunk_linear_attention, fused_recurrent_linear_attention, l2_normalize

VARIANTS = ("gdn", "deltanet", "gla", "kda")
# (output and state, gradients): bf16/fp16 as specified for the kernels; fp32 inputs get the same bounds because GPUs
# run the fp32 dots in tf32 (measured on an H100: up to 2.5e-3); Triton's CPU interpreter computes them exactly
TOLERANCE = {torch.bfloat16: (0.005, 0.01), torch.float16: (0.005, 0.01), torch.float32: (0.005, 0.01)}
EXACT_FP32_TOLERANCE = (1e-4, 1e-4)
GRADIENTS = ("dq", "dk", "dv", "dg", "dbeta", "dh0")


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt().clamp_min(1e-300)).item()


def linear_inputs(
    variant,
    batch,
    seq_len,
    heads,
    v_heads,
    key_dim,
    value_dim,
    dtype,
    device,
    strong_decay=False,
    num_states=None,
    seed=0,
):
    """[q, k, v, g, beta, initial_state]: q, k `[B, T, H, K]` and v `[B, T, HV, V]` in `dtype`; g (`[B, T, HV]`
    for gdn, `[B, T, HV, K]` for gla/kda) and beta `[B, T, HV]` in fp32 where the variant uses them; an fp32
    initial state `[N, HV, K, V]` (N = `num_states` or B)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_len, heads, key_dim, generator=gen)
    k = torch.randn(batch, seq_len, heads, key_dim, generator=gen)
    v = torch.randn(batch, seq_len, v_heads, value_dim, generator=gen)
    g = beta = None
    if variant in ("gdn", "deltanet", "kda"):
        # the delta rule is used with unit-norm keys
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        beta = torch.rand(batch, seq_len, v_heads, generator=gen)
    else:
        # additive writes: keep the state's scale moderate
        k = k * key_dim**-0.5
    if variant in ("gdn", "gla", "kda"):
        shape = (batch, seq_len, v_heads) if variant == "gdn" else (batch, seq_len, v_heads, key_dim)
        if strong_decay:
            # Mamba2-like decays down to ~ -50 per step: exp(+cumulative decay) would overflow
            g = -torch.empty(shape).uniform_(0.0, 16.0, generator=gen) * F.softplus(torch.randn(shape, generator=gen))
        else:
            g = F.logsigmoid(torch.randn(shape, generator=gen) + 2.0)
    initial_state = 0.5 * torch.randn(num_states or batch, v_heads, key_dim, value_dim, generator=gen)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    return [None if x is None else x.to(device) for x in (q, k, v, g, beta, initial_state)]


# the naive additive-write form materialises [B, HV, T, T, K]: above this many elements use the fp32 recurrence
NAIVE_MAX_ELEMENTS = 2**27


def _reference_op(q, v, beta):
    batch, seq_len, _, key_dim = q.shape
    if beta is None and batch * v.shape[2] * seq_len * seq_len * key_dim > NAIVE_MAX_ELEMENTS:
        return recurrent_linear_attention
    return naive_linear_attention


def naive_reference(q, k, v, g, beta, initial_state, cu_seqlens=None):
    """The fp64 naive op (the fp32 token-by-token recurrence for long additive-write inputs), one packed segment
    at a time: (o, final state)."""
    if cu_seqlens is None:
        op = _reference_op(q, v, beta)
        return op(q, k, v, g=g, beta=beta, initial_state=initial_state, output_final_state=True)
    outputs, states = [], []
    for n, (lo, hi) in enumerate(itertools.pairwise(cu_seqlens.tolist())):

        def piece(x, lo=lo, hi=hi):
            return None if x is None else x[:, lo:hi]

        op = _reference_op(piece(q), piece(v), beta)
        o, s = op(
            piece(q),
            piece(k),
            piece(v),
            g=piece(g),
            beta=piece(beta),
            initial_state=None if initial_state is None else initial_state[n : n + 1],
            output_final_state=True,
        )
        outputs.append(o)
        states.append(s)
    return torch.cat(outputs, dim=1), torch.cat(states)


def check_chunk(
    variant,
    batch,
    seq_len,
    heads,
    v_heads,
    key_dim,
    value_dim,
    dtype,
    device,
    strong_decay=False,
    cu_seqlens=None,
    seed=0,
    backward=True,
    initial_state=True,
):
    """Forward and backward of `chunk_linear_attention` (initial state in, final state out, random output and
    final-state gradients) against the fp64 reference: {name: relative RMS error}. `backward=False`: the forward
    alone, without gradients (the path that keeps nothing for a backward): {"o": error, "state": error}.
    `initial_state=False`: the sequences start from a zero state, which is not passed."""
    if cu_seqlens is not None:
        cu_seqlens = torch.tensor(cu_seqlens, device=device)
    num_states = None if cu_seqlens is None else len(cu_seqlens) - 1
    inputs = linear_inputs(
        variant, batch, seq_len, heads, v_heads, key_dim, value_dim, dtype, device, strong_decay, num_states, seed
    )
    if not initial_state:
        inputs = (*inputs[:5], None)
    tri = [None if x is None else x.clone().requires_grad_(backward) for x in inputs]
    ref = [None if x is None else x.detach().double().requires_grad_(backward) for x in inputs]
    with torch.set_grad_enabled(backward):
        o, state = chunk_linear_attention(
            *tri[:5], initial_state=tri[5], output_final_state=True, cu_seqlens=cu_seqlens
        )
    o_ref, state_ref = naive_reference(*ref, cu_seqlens)
    if o.dtype != dtype or o.shape != o_ref.shape or state.dtype != torch.float32 or state.shape != state_ref.shape:
        raise AssertionError(f"o {o.dtype} {tuple(o.shape)}, state {state.dtype} {tuple(state.shape)}")
    if not backward:
        return {"o": rel_rms(o, o_ref), "state": rel_rms(state, state_ref)}
    gen = torch.Generator().manual_seed(seed + 1)
    do = torch.randn(o_ref.shape, generator=gen).to(device)
    dstate = torch.randn(state_ref.shape, generator=gen).to(device)
    ((o.float() * do).sum() + (state * dstate).sum()).backward()
    ((o_ref * do.double()).sum() + (state_ref * dstate.double()).sum()).backward()
    errors = {"o": rel_rms(o, o_ref), "state": rel_rms(state, state_ref)}
    for name, a, b in zip(GRADIENTS, tri, ref, strict=True):
        if a is None:
            continue
        if a.grad is None or a.grad.shape != a.shape or a.grad.dtype != a.dtype:
            raise AssertionError(f"{name}: missing or malformed gradient")
        errors[name] = rel_rms(a.grad, b.grad)
    return errors


def check_fused_recurrent(
    variant,
    batch,
    seq_len,
    heads,
    v_heads,
    key_dim,
    value_dim,
    dtype,
    device,
    cu_seqlens=None,
    use_qk_l2norm_in_kernel=False,
    seed=0,
):
    """`fused_recurrent_linear_attention` against the fp64 reference: {"o": error, "state": error}."""
    if cu_seqlens is not None:
        cu_seqlens = torch.tensor(cu_seqlens, device=device)
    num_states = None if cu_seqlens is None else len(cu_seqlens) - 1
    q, k, v, g, beta, initial_state = linear_inputs(
        variant, batch, seq_len, heads, v_heads, key_dim, value_dim, dtype, device, num_states=num_states, seed=seed
    )
    with torch.no_grad():
        o, state = fused_recurrent_linear_attention(
            q,
            k,
            v,
            g,
            beta,
            initial_state=initial_state,
            output_final_state=True,
            cu_seqlens=cu_seqlens,
            use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
        )
    if use_qk_l2norm_in_kernel:
        q, k = l2_normalize(q.double()), l2_normalize(k.double())
    o_ref, state_ref = naive_reference(q.double(), k.double(), v.double(), g, beta, initial_state, cu_seqlens)
    return {"o": rel_rms(o, o_ref), "state": rel_rms(state, state_ref)}


def failures(errors: dict, dtype, exact_fp32: bool = False) -> list[str]:
    """The entries of `errors` over the tolerance for `dtype` (non-finite errors always fail); `exact_fp32`: fp32
    dots are exact (the interpreter), so fp32 inputs must match to 1e-4."""
    output_tol, grad_tol = EXACT_FP32_TOLERANCE if exact_fp32 and dtype == torch.float32 else TOLERANCE[dtype]
    bad = []
    for name, error in errors.items():
        tol = output_tol if name in ("o", "state") else grad_tol
        if not (math.isfinite(error) and error <= tol):
            bad.append(f"{name}: relative RMS error {error:.2e} > {tol:.0e}")
    return bad


def naive_sliding_window_attention(
    q, k, v, window, num_sink_tokens=0, sink_logits=None, scale=None, cu_seqlens=None, key_bounds=None
):
    """`sliding_window.sliding_window_attention` by its definition, materialising `[B, H, T, T]`, in the inputs'
    dtype."""
    batch, seq_len, num_heads, head_dim = q.shape
    scale = head_dim**-0.5 if scale is None else scale
    index = torch.arange(seq_len, device=q.device)
    # [B, T] first and end of each key's sequence (packed) or row (padding)
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(q.device)
        seq = torch.bucketize(index, cu_seqlens[1:], right=True)
        first, end = cu_seqlens[seq][None], cu_seqlens[seq + 1][None]
    elif key_bounds is not None:
        first = key_bounds[:, :1].to(q.device).expand(batch, seq_len)
        end = key_bounds[:, 1:].to(q.device).expand(batch, seq_len)
    else:
        first, end = index.new_zeros(1, seq_len), index.new_full((1, seq_len), seq_len)
    distance = index[:, None] - index[None, :]
    key_valid = (index >= first) & (index < end)
    sink = (index - first) < num_sink_tokens
    # [B, Tq, Tk]; packed sequences never see each other's keys
    visible = (distance >= 0) & ((distance < window)[None] | sink[:, None, :]) & key_valid[:, None, :]
    if cu_seqlens is not None:
        visible = visible & (seq[:, None] == seq[None, :])
    groups = num_heads // k.shape[2]
    k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) * scale
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    if sink_logits is not None:
        sink_column = sink_logits.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        scores = torch.cat([scores, sink_column], dim=-1)
    peak = scores.amax(-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).min)
    weights = (scores - peak).exp()
    weights = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)
    return torch.einsum("bhts,bshd->bthd", weights[..., :seq_len], v)
