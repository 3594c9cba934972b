"""The reference ops agree across their chunked, recurrent and naive forms, and with explicit per-token loops."""

import pytest
import torch
import torch.nn.functional as F

from hf_effattn.ops_reference import (
    chunk_linear_attention,
    hedgehog_attention,
    naive_linear_attention,
    recurrent_linear_attention,
    sliding_window_attention,
)
from tests.numerics import rel_rms

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TOL = 1e-5


def assert_close(actual, expected, what: str, tol: float = TOL):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    error = rel_rms(actual, expected)
    assert error <= tol, f"{what}: relative RMS error {error:.3e} > {tol:.0e}"


# ---------------------------------------------------------------------------------------------------------------------
# linear attention / delta rule
# ---------------------------------------------------------------------------------------------------------------------

VARIANTS = ("gdn", "deltanet", "gla", "kda")


def linear_inputs(variant, batch, seq_len, heads, v_heads, key_dim, value_dim, seed=0, strong_decay=False):
    """q, k `[B, T, H, K]`, v `[B, T, HV, V]`, g, beta as each variant uses them, and an initial state."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_len, heads, key_dim, generator=gen)
    k = torch.randn(batch, seq_len, heads, key_dim, generator=gen)
    v = torch.randn(batch, seq_len, v_heads, value_dim, generator=gen)
    g = beta = None
    if variant in ("gdn", "deltanet", "kda"):
        # the delta rule is used with unit-norm keys (as the mixers do)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        beta = torch.rand(batch, seq_len, v_heads, generator=gen)
    gate_shape = {"gdn": (batch, seq_len, v_heads), "gla": (batch, seq_len, v_heads, key_dim)}
    gate_shape["kda"] = gate_shape["gla"]
    if variant in gate_shape:
        shape = gate_shape[variant]
        if strong_decay:
            # Mamba2-like decays: -A * softplus(dt) with A up to 16, down to ~ -50 per step
            a = torch.empty(shape).uniform_(0.0, 16.0, generator=gen)
            g = -a * F.softplus(torch.randn(shape, generator=gen) - 1.0)
        else:
            g = F.logsigmoid(torch.randn(shape, generator=gen) + 2.0)
    initial_state = 0.5 * torch.randn(batch, v_heads, key_dim, value_dim, generator=gen)
    return q, k, v, g, beta, initial_state


# (T, H, HV, K, V, chunk_size, strong_decay)
LINEAR_SHAPES = [
    ("T1-H2-HV4", (1, 2, 4, 16, 16, 16, False)),
    ("T63-H2-HV4-C16", (63, 2, 4, 16, 16, 16, False)),
    ("T63-H4-HV4-C64", (63, 4, 4, 16, 16, 64, False)),
    ("T257-H2-HV4-C64", (257, 2, 4, 16, 16, 64, False)),
    ("T257-H2-HV6-C16", (257, 2, 6, 16, 8, 16, False)),
    ("T101-H2-HV4-K13-V7-C24", (101, 2, 4, 13, 7, 24, False)),
    ("T257-H2-HV4-C64-strongdecay", (257, 2, 4, 16, 16, 64, True)),
]
LINEAR_CASES = [
    pytest.param(variant, *shape, id=f"{variant}-{name}")
    for name, shape in LINEAR_SHAPES
    for variant in VARIANTS
    # deltanet has no decay to make strong
    if not (shape[-1] and variant == "deltanet")
]


@pytest.mark.parametrize(
    "variant, seq_len, heads, v_heads, key_dim, value_dim, chunk_size, strong_decay", LINEAR_CASES
)
def test_linear_chunked_recurrent_naive_agree(
    variant, seq_len, heads, v_heads, key_dim, value_dim, chunk_size, strong_decay
):
    q, k, v, g, beta, s0 = linear_inputs(variant, 2, seq_len, heads, v_heads, key_dim, value_dim, strong_decay=strong_decay)
    args = dict(g=g, beta=beta, initial_state=s0, output_final_state=True)
    o_chunk, s_chunk = chunk_linear_attention(q, k, v, chunk_size=chunk_size, **args)
    o_rec, s_rec = recurrent_linear_attention(q, k, v, **args)
    o_naive, s_naive = naive_linear_attention(q, k, v, **args)

    assert o_naive.shape == (2, seq_len, v_heads, value_dim)
    assert s_naive.shape == (2, v_heads, key_dim, value_dim) and s_naive.dtype == torch.float32
    assert o_chunk.dtype == o_rec.dtype == q.dtype
    assert_close(o_chunk, o_naive, "chunked output vs naive")
    assert_close(o_rec, o_naive, "recurrent output vs naive")
    assert_close(o_chunk, o_rec, "chunked output vs recurrent")
    assert_close(s_chunk, s_naive, "chunked final state vs naive")
    assert_close(s_rec, s_naive, "recurrent final state vs naive")
    assert_close(s_chunk, s_rec, "chunked final state vs recurrent")
    # the initial state really is used
    o_zero, _ = recurrent_linear_attention(q, k, v, g=g, beta=beta)
    assert rel_rms(o_zero, o_naive) > 1e-2


@pytest.mark.parametrize("variant", VARIANTS)
def test_linear_no_final_state_unless_asked(variant):
    q, k, v, g, beta, s0 = linear_inputs(variant, 1, 5, 2, 4, 8, 8)
    for op in (chunk_linear_attention, recurrent_linear_attention, naive_linear_attention):
        o, state = op(q, k, v, g=g, beta=beta, initial_state=s0)
        assert state is None and o.shape == (1, 5, 4, 8)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    "seq_len, split, chunk_size",
    [
        pytest.param(63, 20, 16, id="T63-split20-C16"),
        pytest.param(257, 100, 64, id="T257-split100-C64"),
        pytest.param(101, 1, 24, id="T101-split1-C24"),
    ],
)
def test_linear_two_pieces_equal_one_pass(variant, seq_len, split, chunk_size):
    q, k, v, g, beta, s0 = linear_inputs(variant, 2, seq_len, 2, 4, 16, 12, seed=1)

    def piece(x, lo, hi):
        return None if x is None else x[:, lo:hi]

    def run(op, lo, hi, state, **kw):
        return op(
            q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], g=piece(g, lo, hi), beta=piece(beta, lo, hi),
            initial_state=state, output_final_state=True, **kw,
        )

    o_ref, s_ref = naive_linear_attention(q, k, v, g=g, beta=beta, initial_state=s0, output_final_state=True)
    for op, kw in ((chunk_linear_attention, {"chunk_size": chunk_size}), (recurrent_linear_attention, {})):
        o1, s1 = run(op, 0, split, s0, **kw)
        o2, s2 = run(op, split, seq_len, s1, **kw)
        assert_close(torch.cat([o1, o2], dim=1), o_ref, f"{op.__name__}: two pieces vs one pass (outputs)")
        assert_close(s2, s_ref, f"{op.__name__}: two pieces vs one pass (final state)")
    # mixed: chunked prefill, then recurrent decode of the rest
    o1, s1 = run(chunk_linear_attention, 0, split, s0, chunk_size=chunk_size)
    o2, s2 = run(recurrent_linear_attention, split, seq_len, s1)
    assert_close(torch.cat([o1, o2], dim=1), o_ref, "chunked prefill + recurrent decode (outputs)")
    assert_close(s2, s_ref, "chunked prefill + recurrent decode (final state)")


@pytest.mark.parametrize("variant", VARIANTS)
def test_linear_gva_equals_explicitly_repeated_heads(variant):
    """With HV = 3 H, value head j reads query/key head j // 3 (repeat_interleave, as the mixers expand GQA)."""
    q, k, v, g, beta, s0 = linear_inputs(variant, 2, 37, 2, 6, 8, 8, seed=2)
    o_gva, s_gva = chunk_linear_attention(q, k, v, g=g, beta=beta, initial_state=s0, output_final_state=True, chunk_size=16)
    q_rep, k_rep = q.repeat_interleave(3, dim=2), k.repeat_interleave(3, dim=2)
    o_rep, s_rep = recurrent_linear_attention(q_rep, k_rep, v, g=g, beta=beta, initial_state=s0, output_final_state=True)
    assert_close(o_gva, o_rep, "GVA output vs repeated heads")
    assert_close(s_gva, s_rep, "GVA state vs repeated heads")


def test_linear_rejects_bad_shapes():
    q, k, v, g, beta, s0 = linear_inputs("gdn", 1, 4, 2, 4, 8, 8)
    with pytest.raises(ValueError, match="HV"):
        recurrent_linear_attention(q, k, v[:, :, :3], g=g[:, :, :3], beta=beta[:, :, :3])
    with pytest.raises(ValueError, match="beta"):
        chunk_linear_attention(q, k, v, g=g, beta=beta[:, :, :2])
    with pytest.raises(ValueError, match="initial_state"):
        naive_linear_attention(q, k, v, g=g, beta=beta, initial_state=s0[:, :2])


# ---------------------------------------------------------------------------------------------------------------------
# sliding-window attention
# ---------------------------------------------------------------------------------------------------------------------


def left_padded_valid(batch, seq_len, pad):
    """Row 0 full, row 1 left-padded by `pad` tokens."""
    valid = torch.ones(batch, seq_len, dtype=torch.bool)
    valid[1, :pad] = False
    return valid


def first_token_sinks(k, v, key_valid, num_sinks):
    """The first `num_sinks` real tokens of each row: (sink_k, sink_v, sink_index), index -1 where absent."""
    batch, seq_len = key_valid.shape
    first = (~key_valid).long().cumsum(-1).eq(torch.arange(1, seq_len + 1)).sum(-1)  # number of leading pads
    index = first[:, None] + torch.arange(num_sinks)
    present = index < seq_len
    gather = index.clamp(max=seq_len - 1)
    sink_k = torch.stack([k[b, gather[b]] for b in range(batch)]) * present[..., None, None]
    sink_v = torch.stack([v[b, gather[b]] for b in range(batch)]) * present[..., None, None]
    return sink_k, sink_v, torch.where(present, index, torch.full_like(index, -1))


def explicit_window_softmax(q, k, v, window, scale, key_valid, sinks=None, sink_logits=None):
    """fp64, one query at a time: exp(score) over the visible keys (and sinks out of the window), plus exp(sink logit)
    in the denominator."""
    batch, seq_len, heads, dim = q.shape
    groups = heads // k.shape[2]
    q, k, v = q.double(), k.double().repeat_interleave(groups, 2), v.double().repeat_interleave(groups, 2)
    positions = torch.arange(seq_len)
    out = torch.zeros(batch, seq_len, heads, v.shape[-1], dtype=torch.float64)
    for t in range(seq_len):
        visible = (positions <= t) & (positions > t - window) & key_valid  # [B, Tk]
        scores = torch.einsum("bhd,bshd->bhs", q[:, t], k) * scale
        values = v
        visible = visible[:, None, :].expand(-1, heads, -1)
        if sinks is not None:
            sink_k, sink_v, sink_index = sinks
            sink_k = sink_k.double().repeat_interleave(groups, 2)
            sink_v = sink_v.double().repeat_interleave(groups, 2)
            sink_visible = (sink_index >= 0) & (t - sink_index >= window)
            scores = torch.cat([torch.einsum("bhd,bshd->bhs", q[:, t], sink_k) * scale, scores], dim=-1)
            values = torch.cat([sink_v, v], dim=1)
            visible = torch.cat([sink_visible[:, None, :].expand(-1, heads, -1), visible], dim=-1)
        scores = scores.masked_fill(~visible, float("-inf"))
        peak = scores.amax(-1, keepdim=True)
        if sink_logits is not None:
            peak = torch.maximum(peak, sink_logits.double().view(1, heads, 1))
        peak = torch.nan_to_num(peak, neginf=0.0)
        weights = (scores - peak).exp()
        denominator = weights.sum(-1, keepdim=True)
        if sink_logits is not None:
            denominator = denominator + (sink_logits.double().view(1, heads, 1) - peak).exp()
        o = torch.einsum("bhs,bshd->bhd", weights, values)
        out[:, t] = torch.where(denominator > 0, o / denominator.clamp_min(1e-300), torch.zeros_like(o))
    return out


# (T, H, Hkv, D, window, chunk_size, num_sinks, sink_logits)
SLIDING_CASES = [
    pytest.param(1, 4, 2, 8, 4, 4, 2, True, id="T1-H4-kv2-w4-sinks2-logits"),
    pytest.param(63, 4, 2, 8, 7, 8, 0, False, id="T63-H4-kv2-w7-c8"),
    pytest.param(63, 4, 1, 8, 7, 5, 2, False, id="T63-H4-kv1-w7-c5-sinks2"),
    pytest.param(63, 4, 2, 8, 100, 16, 3, True, id="T63-H4-kv2-w100-c16-sinks3-logits"),
    pytest.param(257, 4, 2, 8, 17, 16, 3, True, id="T257-H4-kv2-w17-c16-sinks3-logits"),
    pytest.param(257, 2, 2, 12, 64, 32, 0, True, id="T257-H2-kv2-D12-w64-c32-logits"),
    pytest.param(257, 4, 2, 8, 1, 16, 2, False, id="T257-H4-kv2-w1-c16-sinks2"),
]


def sliding_inputs(seq_len, heads, kv_heads, dim, num_sinks, use_sink_logits, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, seq_len, heads, dim, generator=gen)
    k = torch.randn(2, seq_len, kv_heads, dim, generator=gen)
    v = torch.randn(2, seq_len, kv_heads, dim, generator=gen)
    key_valid = left_padded_valid(2, seq_len, seq_len // 3)
    sinks = first_token_sinks(k, v, key_valid, num_sinks) if num_sinks else None
    sink_logits = torch.randn(heads, generator=gen) if use_sink_logits else None
    return q, k, v, key_valid, sinks, sink_logits


def sink_kwargs(sinks):
    if sinks is None:
        return {}
    return dict(sink_k=sinks[0], sink_v=sinks[1], sink_index=sinks[2])


@pytest.mark.parametrize("seq_len, heads, kv_heads, dim, window, chunk_size, num_sinks, use_sink_logits", SLIDING_CASES)
def test_sliding_window_chunked_naive_and_per_token_agree(
    seq_len, heads, kv_heads, dim, window, chunk_size, num_sinks, use_sink_logits
):
    q, k, v, key_valid, sinks, sink_logits = sliding_inputs(seq_len, heads, kv_heads, dim, num_sinks, use_sink_logits)
    scale = dim**-0.5
    common = dict(window=window, key_valid=key_valid, sink_logits=sink_logits, **sink_kwargs(sinks))
    chunked = sliding_window_attention(q, k, v, chunk_size=chunk_size, **common)
    naive = sliding_window_attention(q, k, v, naive=True, **common)
    expected = explicit_window_softmax(q, k, v, window, scale, key_valid, sinks, sink_logits)

    assert chunked.shape == (2, seq_len, heads, dim) and chunked.dtype == q.dtype
    assert_close(chunked, expected, "chunked vs explicit per-query softmax")
    assert_close(naive, expected, "naive vs explicit per-query softmax")
    assert_close(chunked, naive, "chunked vs naive")

    # decode style: each query alone at its absolute index, with only the keys its window can see
    per_token = []
    for t in range(seq_len):
        lo = max(0, t - window + 1)
        per_token.append(
            sliding_window_attention(
                q[:, t : t + 1], k[:, lo : t + 1], v[:, lo : t + 1], window=window, key_valid=key_valid[:, lo : t + 1],
                query_start=t, sink_logits=sink_logits, **sink_kwargs(sinks),
            )
        )
    assert_close(torch.cat(per_token, dim=1), expected, "per-token decode vs explicit per-query softmax")


def test_sliding_window_padded_queries_output_zero():
    q, k, v, key_valid, sinks, sink_logits = sliding_inputs(63, 4, 2, 8, 2, True)
    out = sliding_window_attention(q, k, v, window=7, key_valid=key_valid, chunk_size=8, sink_logits=sink_logits,
                                   **sink_kwargs(sinks))
    pad = 63 // 3
    assert torch.equal(out[1, :pad], torch.zeros_like(out[1, :pad]))
    assert out[1, pad:].abs().amax(-1).gt(0).all()


def test_sliding_window_sinks_and_sink_logits_change_the_output():
    """Guards the comparisons above against options that silently do nothing."""
    q, k, v, key_valid, sinks, sink_logits = sliding_inputs(63, 4, 2, 8, 3, True)
    base = sliding_window_attention(q, k, v, window=7, key_valid=key_valid)
    with_sinks = sliding_window_attention(q, k, v, window=7, key_valid=key_valid, **sink_kwargs(sinks))
    with_logits = sliding_window_attention(q, k, v, window=7, key_valid=key_valid, sink_logits=sink_logits)
    # queries still within reach of the sinks see no difference; later ones do
    assert_close(with_sinks[0, :7], base[0, :7], "queries whose window still holds the sinks")
    assert rel_rms(with_sinks[:, 10:], base[:, 10:]) > 1e-2
    assert rel_rms(with_logits, base) > 1e-2


# ---------------------------------------------------------------------------------------------------------------------
# hedgehog (LoLCATs): sliding softmax + linear attention over older keys
# ---------------------------------------------------------------------------------------------------------------------


def hedgehog_inputs(seq_len, heads, kv_heads, dim, feature_dim, pad, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, seq_len, heads, dim, generator=gen)
    k = torch.randn(2, seq_len, kv_heads, dim, generator=gen)
    v = torch.randn(2, seq_len, kv_heads, dim, generator=gen)
    # non-negative features, as the Hedgehog feature map produces
    phi_q = torch.randn(2, seq_len, heads, feature_dim, generator=gen).softmax(-1)
    phi_k = torch.randn(2, seq_len, kv_heads, feature_dim, generator=gen).softmax(-1)
    return q, k, v, phi_q, phi_k, left_padded_valid(2, seq_len, pad)


def explicit_hedgehog(q, k, v, phi_q, phi_k, window, scale, key_valid):
    """fp64 definition: o_t = (sum_win exp(s) v + sum_older phi_q.phi_k v) / (sum_win exp(s) + sum_older phi_q.phi_k)."""
    batch, seq_len, heads, _ = q.shape
    groups = heads // k.shape[2]
    q, phi_q = q.double(), phi_q.double()
    k, v, phi_k = (x.double().repeat_interleave(groups, 2) for x in (k, v, phi_k))
    positions = torch.arange(seq_len)
    out = torch.zeros(batch, seq_len, heads, v.shape[-1], dtype=torch.float64)
    for t in range(seq_len):
        in_window = ((positions <= t) & (positions > t - window) & key_valid)[:, None, :]
        older = ((positions <= t - window) & key_valid)[:, None, :]
        soft = (torch.einsum("bhd,bshd->bhs", q[:, t], k) * scale).exp() * in_window
        linear = torch.einsum("bhf,bshf->bhs", phi_q[:, t], phi_k) * older
        weights = soft + linear
        numerator = torch.einsum("bhs,bshd->bhd", weights, v)
        denominator = weights.sum(-1, keepdim=True)
        out[:, t] = torch.where(denominator > 0, numerator / denominator.clamp_min(1e-300), torch.zeros_like(numerator))
    return out


def hedgehog_token_loop(q, k, v, phi_q, phi_k, window, key_valid, keep_last):
    """Decode as HedgehogAttention does with a cache: each token with the cached raw keys (the last `keep_last`) and
    the carried state of every older key."""
    seq_len = q.shape[1]
    state, cached = None, 0
    outputs = []
    for t in range(seq_len):
        lo = t - cached
        o, state = hedgehog_attention(
            q[:, t : t + 1], k[:, lo : t + 1], v[:, lo : t + 1], phi_q[:, t : t + 1], phi_k[:, lo : t + 1],
            window=window, key_valid=key_valid[:, lo : t + 1], query_start=t, initial_state=state,
            keep_last=keep_last, output_final_state=True,
        )
        outputs.append(o)
        cached = min(t + 1, keep_last)
    return torch.cat(outputs, dim=1), state


# (T, H, Hkv, D, F, window, chunk_size, extra_keep): keep_last = window - 1 + extra_keep (a shared cache may keep
# more raw keys than this mixer's window, when a sliding layer has a larger window)
HEDGEHOG_CASES = [
    pytest.param(1, 4, 2, 8, 6, 4, 4, 0, id="T1-H4-kv2-w4"),
    pytest.param(63, 4, 2, 8, 6, 6, 16, 0, id="T63-H4-kv2-w6-c16"),
    pytest.param(63, 4, 4, 8, 6, 6, 5, 3, id="T63-H4-kv4-w6-c5-keep8"),
    pytest.param(257, 4, 2, 8, 10, 17, 16, 0, id="T257-H4-kv2-F10-w17-c16"),
    pytest.param(257, 2, 1, 12, 8, 6, 64, 5, id="T257-H2-kv1-D12-w6-c64-keep10"),
    pytest.param(257, 4, 2, 8, 6, 2, 7, 0, id="T257-H4-kv2-w2-c7"),
]


@pytest.mark.parametrize("seq_len, heads, kv_heads, dim, feature_dim, window, chunk_size, extra_keep", HEDGEHOG_CASES)
def test_hedgehog_chunked_naive_and_token_loop_agree(
    seq_len, heads, kv_heads, dim, feature_dim, window, chunk_size, extra_keep
):
    q, k, v, phi_q, phi_k, key_valid = hedgehog_inputs(seq_len, heads, kv_heads, dim, feature_dim, seq_len // 4)
    keep_last = window - 1 + extra_keep
    common = dict(window=window, key_valid=key_valid, keep_last=keep_last, output_final_state=True)
    o_chunk, s_chunk = hedgehog_attention(q, k, v, phi_q, phi_k, chunk_size=chunk_size, **common)
    o_naive, s_naive = hedgehog_attention(q, k, v, phi_q, phi_k, naive=True, **common)
    o_loop, s_loop = hedgehog_token_loop(q, k, v, phi_q, phi_k, window, key_valid, keep_last)
    expected = explicit_hedgehog(q, k, v, phi_q, phi_k, window, dim**-0.5, key_valid)

    assert o_chunk.shape == (2, seq_len, heads, dim) and o_chunk.dtype == q.dtype
    assert s_chunk.shape == (2, heads, feature_dim, dim + 1) and s_chunk.dtype == torch.float32
    assert_close(o_chunk, expected, "chunked vs explicit definition")
    assert_close(o_naive, expected, "naive vs explicit definition")
    assert_close(o_loop, expected, "token loop vs explicit definition")
    assert_close(o_chunk, o_naive, "chunked vs naive")
    assert_close(s_naive, s_chunk, "naive final state vs chunked")
    assert_close(s_loop, s_chunk, "token-loop final state vs chunked")

    # the state is sum phi(k) [v, 1]^T over every real key but the last keep_last
    stop = max(seq_len - keep_last, 0)
    groups = heads // kv_heads
    phi = (phi_k * key_valid[..., None, None]).repeat_interleave(groups, 2)[:, :stop].double()
    v_aug = torch.cat([v, torch.ones_like(v[..., :1])], -1).repeat_interleave(groups, 2)[:, :stop].double()
    expected_state = torch.einsum("bshf,bshd->bhfd", phi, v_aug)
    if stop:
        assert_close(s_chunk, expected_state, "final state vs its definition")
    else:
        assert torch.equal(s_chunk, torch.zeros_like(s_chunk))


@pytest.mark.parametrize(
    "seq_len, split, window, keep_last, chunk_size",
    [
        pytest.param(63, 20, 6, 5, 16, id="T63-split20-w6-keep5"),
        pytest.param(257, 100, 17, 20, 16, id="T257-split100-w17-keep20"),
        pytest.param(257, 3, 6, 5, 64, id="T257-split3-w6-keep5"),
    ],
)
def test_hedgehog_prefill_then_continue_equals_one_pass(seq_len, split, window, keep_last, chunk_size):
    """A second call sees the kept raw keys followed by its own, and the first call's state for everything older."""
    q, k, v, phi_q, phi_k, key_valid = hedgehog_inputs(seq_len, 4, 2, 8, 6, 9, seed=3)
    kw = dict(window=window, keep_last=keep_last, output_final_state=True, chunk_size=chunk_size)
    o_ref, s_ref = hedgehog_attention(q, k, v, phi_q, phi_k, key_valid=key_valid, **kw)
    o1, s1 = hedgehog_attention(
        q[:, :split], k[:, :split], v[:, :split], phi_q[:, :split], phi_k[:, :split], key_valid=key_valid[:, :split], **kw
    )
    lo = max(split - keep_last, 0)
    o2, s2 = hedgehog_attention(
        q[:, split:], k[:, lo:], v[:, lo:], phi_q[:, split:], phi_k[:, lo:], key_valid=key_valid[:, lo:],
        query_start=split, initial_state=s1, **kw,
    )
    assert_close(torch.cat([o1, o2], dim=1), o_ref, "two calls vs one pass (outputs)")
    assert_close(s2, s_ref, "two calls vs one pass (final state)")


def test_hedgehog_linear_terms_matter():
    """Keys older than the window contribute through the feature maps (guards the agreement tests above)."""
    q, k, v, phi_q, phi_k, key_valid = hedgehog_inputs(63, 4, 2, 8, 6, 0)
    with_linear, _ = hedgehog_attention(q, k, v, phi_q, phi_k, window=6, key_valid=key_valid)
    window_only = sliding_window_attention(q, k, v, window=6, key_valid=key_valid)
    # identical while no key has left the window, different afterwards
    assert_close(with_linear[:, :6], window_only[:, :6], "first window")
    assert rel_rms(with_linear[:, 6:], window_only[:, 6:]) > 1e-2
