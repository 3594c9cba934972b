"""The Triton linear-attention ops against the fp64 naive recurrence: outputs, final states and every gradient.

On a machine without a GPU these run through Triton's interpreter, so the CPU cases are small; the `gpu` cases use
full sizes (`scripts/check_kernels_gpu.py` runs the whole matrix and prints a table).
"""

import pytest
import torch

from hf_effattn.ops_reference import naive_linear_attention

kernels = pytest.importorskip("hf_effattn.kernels")
testing = pytest.importorskip("hf_effattn.kernels.testing")

pytestmark = pytest.mark.usefixtures("torch_single_thread")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def assert_within_tolerance(errors, dtype):
    bad = testing.failures(errors, dtype, exact_fp32=DEVICE == "cpu")
    assert not bad, f"{bad} (all errors: {errors})"


# (B, T, H, HV, K, V, dtype, strong decay, cu_seqlens): small enough for the interpreter
CPU_CASES = [
    ("T1", (2, 1, 1, 1, 16, 16, torch.float32, False, None)),
    ("T63-GVA", (2, 63, 1, 2, 16, 32, torch.float32, False, None)),
    ("T130-K24-V20", (1, 130, 2, 2, 24, 20, torch.float32, False, None)),
    ("varlen-1-64-1-64", (1, 130, 1, 2, 16, 16, torch.float32, False, [0, 1, 65, 66, 130])),
    ("T100-bf16", (1, 100, 1, 2, 32, 16, torch.bfloat16, False, None)),
]

CPU_CASE_PARAMETERS = pytest.mark.parametrize(
    "batch, seq_len, heads, v_heads, key_dim, value_dim, dtype, strong_decay, cu_seqlens",
    [pytest.param(*case, id=name) for name, case in CPU_CASES],
)


@pytest.mark.parametrize("variant", testing.VARIANTS)
@CPU_CASE_PARAMETERS
def test_chunk_matches_naive(
    variant, batch, seq_len, heads, v_heads, key_dim, value_dim, dtype, strong_decay, cu_seqlens
):
    errors = testing.check_chunk(
        variant, batch, seq_len, heads, v_heads, key_dim, value_dim, dtype, DEVICE, strong_decay, cu_seqlens
    )
    assert_within_tolerance(errors, dtype)


@pytest.mark.parametrize("variant", ["gdn", "gla", "kda"])
def test_chunk_strong_decay_stays_finite(variant):
    """Decays down to ~ -50 per step: per-channel pairwise terms must underflow, never overflow (the pairwise
    kernel's diagonal sub-blocks then take their per-column loop; the other cases, with milder decays, take the
    single product against a reference row)."""
    errors = testing.check_chunk(variant, 1, 80, 1, 1, 16, 16, torch.float32, DEVICE, strong_decay=True)
    assert_within_tolerance(errors, torch.float32)


@pytest.mark.parametrize("variant", testing.VARIANTS)
@pytest.mark.parametrize(
    "batch, seq_len, cu_seqlens",
    [pytest.param(2, 130, None, id="T130"), pytest.param(1, 200, [0, 1, 130, 131, 200], id="varlen-1-129-1-69")],
)
def test_chunk_split_into_segments_matches_naive(monkeypatch, variant, batch, seq_len, cu_seqlens):
    """Sequences split into one-chunk segments, joined by the segment maps (the long-sequence path)."""
    monkeypatch.setattr(kernels.linear_attn, "SEGMENT_CHUNKS", 1)
    errors = testing.check_chunk(variant, batch, seq_len, 1, 2, 16, 16, torch.float32, DEVICE, cu_seqlens=cu_seqlens)
    assert_within_tolerance(errors, torch.float32)


@pytest.mark.parametrize("variant", testing.VARIANTS)
@pytest.mark.parametrize(
    "key_dim, cu_seqlens",
    [pytest.param(24, None, id="K24-two-blocks"), pytest.param(40, [0, 1, 65, 100], id="K40-three-blocks-varlen")],
)
def test_gradient_kernel_split_over_key_blocks_matches_naive(monkeypatch, variant, key_dim, cu_seqlens):
    """The gradient kernel over blocks of 16 key channels, the last one partly outside K: the per-token sums over
    key channels (dbeta, per-head db) come in parts, and the terms without key channels from the first block."""
    monkeypatch.setattr(kernels.linear_attn, "GRAD_KEY_BLOCK", 16)
    batch = 2 if cu_seqlens is None else 1
    errors = testing.check_chunk(variant, batch, 100, 1, 2, key_dim, 16, torch.float32, DEVICE, cu_seqlens=cu_seqlens)
    assert_within_tolerance(errors, torch.float32)


@pytest.mark.parametrize("variant", ["gdn", "kda"])
def test_training_pseudo_values_from_ai_match_those_from_w_and_u(monkeypatch, variant):
    """The training forward's state passes form vn from Ai (the default) or read w and u (`WY_IN_MEMORY`): the same
    outputs and gradients up to fp32 rounding, and only the second path stores u."""
    linear_attn = kernels.linear_attn
    stored_u = []
    original = linear_attn._launch

    def spy(kernel, grid, configs, key, args, kwargs, outputs, device):
        if kernel.fn.__name__ == "chunk_wu_fwd_kernel":
            stored_u.append(outputs[1] is not None)
        original(kernel, grid, configs, key, args, kwargs, outputs, device)

    monkeypatch.setattr(linear_attn, "_launch", spy)
    inputs = testing.linear_inputs(variant, 1, 100, 1, 2, 16, 16, torch.float32, DEVICE)
    results = []
    for in_memory in (False, True):
        monkeypatch.setattr(linear_attn, "WY_IN_MEMORY", in_memory)
        leaves = [x.detach().clone().requires_grad_() for x in inputs]
        o, s = kernels.chunk_linear_attention(*leaves[:5], initial_state=leaves[5], output_final_state=True)
        (o.square().sum() + s.square().sum()).backward()
        results.append([o.detach(), s.detach(), *(x.grad for x in leaves)])
    assert stored_u == [False, True]
    # fp32 roundings of the two orders (Ai applied before or after the subtraction); dg reaches ~30 here
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


TUNED_KERNELS = (
    "chunk_pairwise_fwd_kernel",
    "chunk_wy_fwd_kernel",
    "chunk_wu_fwd_kernel",
    "chunk_segment_fwd_kernel",
    "chunk_combine_kernel",
    "chunk_state_fwd_kernel",
    "chunk_state_fwd_t_kernel",
    "chunk_state_bwd_kernel",
    "chunk_grad_kernel",
)


def test_chunk_other_launch_configs_match_naive(monkeypatch):
    """A tuning candidate other than the default (other V blocks) computes the same, for the per-channel delta rule
    (gdn and gla: all candidates, through the tuner, below)."""
    monkeypatch.setattr(kernels.linear_attn, "CONFIG_OVERRIDE", dict.fromkeys(TUNED_KERNELS, 3))
    monkeypatch.setattr(kernels.linear_attn, "SEGMENT_CHUNKS", 1)
    errors = testing.check_chunk("kda", 1, 130, 1, 2, 24, 40, torch.float32, DEVICE)
    assert_within_tolerance(errors, torch.float32)


@pytest.mark.parametrize("variant", testing.VARIANTS)
@CPU_CASE_PARAMETERS
def test_chunk_forward_without_gradients_matches_naive(
    variant, batch, seq_len, heads, v_heads, key_dim, value_dim, dtype, strong_decay, cu_seqlens
):
    """Inference forward: nothing is kept for a backward, and the delta rule's state passes form the pseudo-values
    from Ai (w and u are not stored)."""
    errors = testing.check_chunk(
        variant,
        batch,
        seq_len,
        heads,
        v_heads,
        key_dim,
        value_dim,
        dtype,
        DEVICE,
        strong_decay,
        cu_seqlens,
        backward=False,
    )
    assert_within_tolerance(errors, dtype)


@pytest.mark.parametrize("variant", ["gdn", "gla", "kda"])
@pytest.mark.parametrize(
    "batch, seq_len, cu_seqlens, strong_decay",
    [
        pytest.param(2, 130, None, False, id="T130"),
        pytest.param(1, 200, [0, 1, 130, 131, 200], False, id="varlen-1-129-1-69"),
        pytest.param(1, 80, None, True, id="T80-strong-decay"),
    ],
)
def test_chunk_forward_without_gradients_in_segments_matches_naive(
    monkeypatch, variant, batch, seq_len, cu_seqlens, strong_decay
):
    """The inference forward split into one-chunk segments: the segment maps form their pseudo-values from Ai too
    (delta rule), or their diagonal M directly from the decays (additive writes)."""
    monkeypatch.setattr(kernels.linear_attn, "SEGMENT_CHUNKS", 1)
    errors = testing.check_chunk(
        variant, batch, seq_len, 1, 2, 16, 16, torch.float32, DEVICE, strong_decay, cu_seqlens, backward=False
    )
    assert_within_tolerance(errors, torch.float32)


@pytest.mark.parametrize("variant", ["gdn", "gla", "kda"])
@pytest.mark.parametrize("backward", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("cu_seqlens", [None, [0, 0, 130, 130, 131, 200]], ids=["fixed", "varlen-with-empty"])
def test_segments_without_initial_state_match_naive(monkeypatch, variant, backward, cu_seqlens):
    """Without an initial state the forward forms no M for a sequence's first segment, and for no sequence the map
    of its last segment: the state pass of that segment writes the final state (packed sequences include empty
    ones, which have no segment and whose final state is zero)."""
    monkeypatch.setattr(kernels.linear_attn, "SEGMENT_CHUNKS", 1)
    batch = 2 if cu_seqlens is None else 1
    errors = testing.check_chunk(
        variant,
        batch,
        200,
        1,
        2,
        16,
        16,
        torch.float32,
        DEVICE,
        False,
        cu_seqlens,
        backward=backward,
        initial_state=False,
    )
    assert_within_tolerance(errors, torch.float32)


def test_chunk_forward_without_gradients_stores_neither_w_nor_u(monkeypatch):
    """The inference forward computes Ai only, not w and u; with w and u in memory (the training path's state
    passes) the result is the same."""
    linear_attn = kernels.linear_attn
    launched = []
    original = linear_attn._launch

    def spy(kernel, grid, configs, key, args, kwargs, outputs, device):
        launched.append((kernel.fn.__name__, kwargs))
        original(kernel, grid, configs, key, args, kwargs, outputs, device)

    monkeypatch.setattr(linear_attn, "_launch", spy)
    q, k, v, g, beta, s0 = testing.linear_inputs("gdn", 1, 100, 1, 2, 16, 16, torch.float32, DEVICE)
    with torch.no_grad():
        o, s = kernels.chunk_linear_attention(q, k, v, g, beta, initial_state=s0, output_final_state=True)
        monkeypatch.setattr(linear_attn, "WY_IN_MEMORY", True)
        o_wu, s_wu = kernels.chunk_linear_attention(q, k, v, g, beta, initial_state=s0, output_final_state=True)
    names = [name for name, _ in launched]
    # Ai alone and the transposed pass from Ai; then Ai, the w/u kernel and the pass that reads w and u
    assert names == [
        "chunk_wy_fwd_kernel",
        "chunk_state_fwd_t_kernel",
        "chunk_wy_fwd_kernel",
        "chunk_wu_fwd_kernel",
        "chunk_state_fwd_kernel",
    ]
    assert [kwargs["FROM_AI"] for name, kwargs in launched if name.startswith("chunk_state")] == [True, False]
    # the two paths round differently in fp32 (w S against k S, Ai applied before or after the subtraction)
    torch.testing.assert_close(o, o_wu, rtol=0, atol=1e-5)
    torch.testing.assert_close(s, s_wu, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", testing.VARIANTS)
def test_transposed_state_pass_matches_the_untransposed_one(monkeypatch, variant):
    """Forwards without a backward can run `chunk_state_fwd_t_kernel` (the state held transposed; by default for
    every rule, `STATE_PASS_TRANSPOSED`); it gives the untransposed kernel's outputs and final states,
    with an initial state, GVA and packed sequences."""
    linear_attn = kernels.linear_attn
    launched = []
    original = linear_attn._launch

    def spy(kernel, *args):
        launched.append(kernel.fn.__name__)
        original(kernel, *args)

    monkeypatch.setattr(linear_attn, "_launch", spy)
    cu_seqlens = torch.tensor([0, 1, 70, 200], device=DEVICE)
    q, k, v, g, beta, s0 = testing.linear_inputs(variant, 1, 200, 1, 2, 32, 24, torch.float32, DEVICE, num_states=3)
    results = {}
    rule = linear_attn.rule_of(g, beta)
    assert rule in linear_attn.STATE_PASS_TRANSPOSED
    for transposed in (True, False):
        monkeypatch.setattr(linear_attn, "STATE_PASS_TRANSPOSED", {rule} if transposed else set())
        with torch.no_grad():
            results[transposed] = kernels.chunk_linear_attention(
                q, k, v, g, beta, initial_state=s0, output_final_state=True, cu_seqlens=cu_seqlens
            )
    state_passes = [name for name in launched if name.startswith("chunk_state_fwd")]
    assert state_passes == ["chunk_state_fwd_t_kernel", "chunk_state_fwd_kernel"]
    # the interpreter's fp32 products differ only in summation order; GPUs run the Ai and P products in tf32 in both
    # kernels, on differently ordered operands
    atol = 1e-5 if DEVICE == "cpu" else 2e-3
    for a, b in zip(results[True], results[False], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=atol)


def spy_launches(monkeypatch, flag):
    """[(kernel name, its `flag` argument or None)] of every launch of the linear kernels from now on."""
    linear_attn = kernels.linear_attn
    launched = []
    original = linear_attn._launch

    def spy(kernel, grid, configs, key, args, kwargs, outputs, device):
        launched.append((kernel.fn.__name__, kwargs.get(flag)))
        original(kernel, grid, configs, key, args, kwargs, outputs, device)

    monkeypatch.setattr(linear_attn, "_launch", spy)
    return launched


@pytest.mark.parametrize("variant", ["gla", "kda"])
@pytest.mark.parametrize("transposed", [False, True], ids=["untransposed", "transposed"])
@pytest.mark.parametrize("segment_chunks", [None, 1], ids=["whole", "segments"])
def test_pregated_operands_give_the_same_bits(monkeypatch, variant, transposed, segment_chunks):
    """Per-channel decays, forwards without a backward: the pairwise kernel writes scale q e^b, k e^(b_last - b)
    and (KDA) k e^b in the input dtype, and the segment and state passes read them instead of forming them from q,
    k and the fp32 decays. They are formed with the same fp32 operations and rounded the same way, so the outputs
    and final states are bit for bit those of the passes that form them (bf16, GVA, packed sequences with a
    length-1 one, an initial state per sequence)."""
    linear_attn = kernels.linear_attn
    launched = spy_launches(monkeypatch, "PREGATED")
    monkeypatch.setattr(linear_attn, "SEGMENT_CHUNKS", segment_chunks)
    cu_seqlens = torch.tensor([0, 1, 70, 200], device=DEVICE)
    q, k, v, g, beta, s0 = testing.linear_inputs(variant, 1, 200, 1, 2, 32, 24, torch.bfloat16, DEVICE, num_states=3)
    rule = linear_attn.rule_of(g, beta)
    monkeypatch.setattr(linear_attn, "STATE_PASS_TRANSPOSED", {rule} if transposed else set())
    results = {}
    for pregated in (True, False):
        monkeypatch.setattr(linear_attn, "PREGATED_OPERANDS", pregated)
        with torch.no_grad():
            results[pregated] = kernels.chunk_linear_attention(
                q, k, v, g, beta, initial_state=s0, output_final_state=True, cu_seqlens=cu_seqlens
            )
    # every kernel that takes the flag had it set in the first run only
    flagged = [(name, flag) for name, flag in launched if flag is not None]
    kernels_run = {name for name, _ in flagged}
    expected = {"chunk_pairwise_fwd_kernel", "chunk_state_fwd_t_kernel" if transposed else "chunk_state_fwd_kernel"}
    if segment_chunks:
        expected.add("chunk_segment_fwd_kernel")
    assert kernels_run == expected
    half = len(flagged) // 2
    assert [flag for _, flag in flagged] == [True] * half + [False] * half
    for a, b in zip(results[True], results[False], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["gdn", "kda"])
@pytest.mark.parametrize("segment_chunks", [None, 1], ids=["whole", "segments"])
def test_inference_state_products_are_single_bf16(monkeypatch, variant, segment_chunks):
    """Forwards without a backward form the state's products with one bf16 MMA (the state rounded to bf16), the
    training forward and `SPLIT_STATE_PRODUCTS = True` with two (the state as two bf16 halves). Both stay within
    the bf16 bounds of the fp64 op, and they differ, so the choice reaches the state and segment passes."""
    linear_attn = kernels.linear_attn
    launched = spy_launches(monkeypatch, "SPLIT")
    monkeypatch.setattr(linear_attn, "SEGMENT_CHUNKS", segment_chunks)
    q, k, v, g, beta, s0 = testing.linear_inputs(variant, 1, 200, 1, 2, 32, 32, torch.bfloat16, DEVICE)
    o_ref, s_ref = testing.naive_reference(*(x.double() for x in (q, k, v, g, beta, s0)))
    results = {}
    for split in (False, True):
        monkeypatch.setattr(linear_attn, "SPLIT_STATE_PRODUCTS", split)
        with torch.no_grad():
            results[split] = kernels.chunk_linear_attention(q, k, v, g, beta, initial_state=s0, output_final_state=True)
        o, s = results[split]
        assert_within_tolerance({"o": testing.rel_rms(o, o_ref), "state": testing.rel_rms(s, s_ref)}, torch.bfloat16)
    assert not torch.equal(results[False][1], results[True][1])
    flagged = [(name, flag) for name, flag in launched if flag is not None]
    expected = {"chunk_state_fwd_t_kernel"} | ({"chunk_segment_fwd_kernel"} if segment_chunks else set())
    assert {name for name, _ in flagged} == expected
    half = len(flagged) // 2
    assert [flag for _, flag in flagged] == [False] * half + [True] * half
    # the training forward keeps the split products
    launched.clear()
    monkeypatch.setattr(linear_attn, "SPLIT_STATE_PRODUCTS", False)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    kernels.chunk_linear_attention(*leaves, g, beta, initial_state=s0, output_final_state=True)
    assert {flag for _, flag in launched if flag is not None} == {True}


@pytest.mark.parametrize("variant", ["gla", "kda"])
def test_inference_scores_of_per_channel_decays_are_bf16(monkeypatch, variant):
    """Per-channel decays: a bf16 forward without a backward stores the pairwise scores P in bf16 and multiplies
    them with the pseudo-values in one bf16 MMA; `SPLIT_STATE_PRODUCTS = True`, the training forward and fp32
    inputs keep fp32 scores. Both settings stay within the bf16 bounds of the fp64 op, and their outputs differ."""
    linear_attn = kernels.linear_attn
    scores = []
    original = linear_attn._launch

    def spy(kernel, grid, configs, key, args, kwargs, outputs, device):
        if kernel.fn.__name__ == "chunk_pairwise_fwd_kernel":
            scores.append(args[3].dtype)
        original(kernel, grid, configs, key, args, kwargs, outputs, device)

    monkeypatch.setattr(linear_attn, "_launch", spy)
    q, k, v, g, beta, s0 = testing.linear_inputs(variant, 1, 130, 1, 2, 32, 32, torch.bfloat16, DEVICE)
    o_ref, s_ref = testing.naive_reference(*(None if x is None else x.double() for x in (q, k, v, g, beta, s0)))
    outputs = {}
    for split in (False, True):
        monkeypatch.setattr(linear_attn, "SPLIT_STATE_PRODUCTS", split)
        with torch.no_grad():
            o, s = kernels.chunk_linear_attention(q, k, v, g, beta, initial_state=s0, output_final_state=True)
        assert_within_tolerance({"o": testing.rel_rms(o, o_ref), "state": testing.rel_rms(s, s_ref)}, torch.bfloat16)
        outputs[split] = o
    assert scores == [torch.bfloat16, torch.float32]
    assert not torch.equal(outputs[False], outputs[True])
    scores.clear()
    monkeypatch.setattr(linear_attn, "SPLIT_STATE_PRODUCTS", False)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    kernels.chunk_linear_attention(*leaves, g, beta, initial_state=s0)
    with torch.no_grad():
        kernels.chunk_linear_attention(q.float(), k.float(), v.float(), g, beta, initial_state=s0)
    assert scores == [torch.float32, torch.float32]


def _horizon_inputs(seq_len=6 * 64, nan_token=10):
    """GDN inputs with strong decays (about -6 per step, so every chunk decays by far more than exp(-70)), bf16 keys
    and values, a NaN in the values of token `nan_token` (in the first chunk), and its fp64 reference with that
    value zeroed."""
    q, k, v, g, beta, s0 = testing.linear_inputs("gdn", 1, seq_len, 1, 2, 16, 16, torch.float32, DEVICE, True)
    v_clean = v.clone()
    v_clean[:, nan_token] = 0.0
    v[:, nan_token] = float("nan")
    return (q, k, v, g, beta, s0), testing.naive_reference(*(x.double() for x in (q, k, v_clean, g, beta, s0)))


@pytest.mark.parametrize("backward", [False, True], ids=["inference", "training"])
def test_segment_maps_skip_chunks_their_decay_erased(monkeypatch, backward):
    """Segments of two chunks under strong per-head decays: a segment's C starts at its last chunk (the first one
    reaches the segment's end scaled below exp(-70)) and its M is zero. A NaN value in the first chunk therefore
    stays in its own segment, whose state pass reads every chunk, and the later segments match the fp64 op with that
    value zeroed; without the horizon (`DECAY_HORIZON = None`) the maps read it and it reaches every later token."""
    linear_attn = kernels.linear_attn
    monkeypatch.setattr(linear_attn, "SEGMENT_CHUNKS", 2)
    inputs, (o_ref, s_ref) = _horizon_inputs()
    results = {}
    for horizon in (70.0, None):
        monkeypatch.setattr(linear_attn, "DECAY_HORIZON", horizon)
        leaves = [x.clone().requires_grad_(backward) for x in inputs[:3]]
        with torch.set_grad_enabled(backward):
            results[horizon] = kernels.chunk_linear_attention(
                *leaves, *inputs[3:5], initial_state=inputs[5], output_final_state=True
            )
    o, s = results[70.0]
    # the NaN's own segment (tokens 0-127) carries it from token 10 on; the others do not see it
    assert torch.isnan(o[:, 10:128]).all()
    later = {"o": testing.rel_rms(o[:, 128:], o_ref[:, 128:]), "state": testing.rel_rms(s, s_ref)}
    assert_within_tolerance(later, torch.float32)
    o_off, s_off = results[None]
    assert torch.isnan(o_off[:, 128:]).all() and torch.isnan(s_off).all()


def test_gradient_segment_shares_skip_chunks_their_decay_erased(monkeypatch):
    """The backward's counterpart: a segment's own share of the gradient of its entering state stops at the chunk
    from which the decay back to the segment's start falls below exp(-70). A NaN output gradient in the second
    chunk of the first segment then reaches the gradients of that segment's tokens (the full backward pass reads
    every chunk) but not the initial state's gradient, which matches the fp64 op's with that gradient zeroed; without
    the horizon it is NaN."""
    linear_attn = kernels.linear_attn
    monkeypatch.setattr(linear_attn, "SEGMENT_CHUNKS", 2)
    (q, k, v, g, beta, s0), _ = _horizon_inputs()
    v = torch.nan_to_num(v)
    gen = torch.Generator().manual_seed(5)
    do = torch.randn(v.shape, generator=gen).to(DEVICE)
    do_clean = do.clone()
    do_clean[:, 100] = 0.0
    do[:, 100] = float("nan")
    ref = [x.double().requires_grad_(x is s0) for x in (q, k, v, g, beta, s0)]
    o_ref, _ = testing.naive_reference(*ref)
    (o_ref * do_clean.double()).sum().backward()
    grads = {}
    for horizon in (70.0, None):
        monkeypatch.setattr(linear_attn, "DECAY_HORIZON", horizon)
        leaf = s0.clone().requires_grad_()
        o, _ = kernels.chunk_linear_attention(q.clone().requires_grad_(), k, v, g, beta, initial_state=leaf)
        (o * do).sum().backward()
        grads[horizon] = leaf.grad
    assert_within_tolerance({"dh0": testing.rel_rms(grads[70.0], ref[5].grad)}, torch.float32)
    assert torch.isnan(grads[None]).all()


@pytest.mark.parametrize("expanding", ["positive-decay", "beta-above-2"])
def test_segment_maps_keep_every_chunk_where_a_transition_may_expand(monkeypatch, expanding):
    """The horizon holds only where every transition exp(g) (I - beta k k^T) contracts the state by its decay. One
    token with g > 0, or with beta |k|^2 > 2, anywhere in the sequence turns it off for that sequence's head (the
    WY kernel flags it): the maps then read every chunk, and the NaN of the first chunk reaches every later token."""
    linear_attn = kernels.linear_attn
    monkeypatch.setattr(linear_attn, "SEGMENT_CHUNKS", 2)
    (q, k, v, g, beta, s0), _ = _horizon_inputs()
    if expanding == "positive-decay":
        g[:, 300] = 0.5
    else:
        beta[:, 300] = 2.5
    with torch.no_grad():
        o, s = kernels.chunk_linear_attention(q, k, v, g, beta, initial_state=s0, output_final_state=True)
    assert torch.isnan(o[:, 128:]).all() and torch.isnan(s).all()


def test_segment_register_cap_is_a_candidate_of_16_bit_cuda_launches_only(monkeypatch):
    """The segment maps' candidates include one capped at 168 registers per thread (three programs per SM); the cap
    is kept for 16-bit inputs on a CUDA device whose Triton takes it, and dropped for fp32 inputs, the interpreter
    and Triton builds without the option (the capped candidate then equals its uncapped twin and is dropped). The
    segment kernel's launches take their candidates from that list."""
    linear_attn = kernels.linear_attn
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    candidates = linear_attn.SEGMENT_CANDIDATES
    monkeypatch.setattr(linear_attn, "takes_register_caps", lambda: True)
    caps = [config.get("maxnreg") for config in linear_attn._configs(torch.bfloat16, 128, candidates, cuda)]
    assert caps == [candidate[3] if len(candidate) > 3 else None for candidate in candidates]
    assert 168 in caps
    uncapped = [
        config for config in linear_attn._configs(torch.bfloat16, 128, candidates, cuda) if "maxnreg" not in config
    ]
    for dtype, device in ((torch.float32, cuda), (torch.bfloat16, cpu), (torch.bfloat16, None)):
        configs = linear_attn._configs(dtype, 128, candidates, device)
        assert all("maxnreg" not in config for config in configs)
    assert linear_attn._configs(torch.bfloat16, 128, candidates, cpu) == uncapped
    monkeypatch.setattr(linear_attn, "takes_register_caps", lambda: False)
    assert linear_attn._configs(torch.bfloat16, 128, candidates, cuda) == uncapped
    # the launches
    launched = []
    original = linear_attn._launch

    def spy(kernel, grid, configs, key, args, kwargs, outputs, device):
        if kernel.fn.__name__ == "chunk_segment_fwd_kernel":
            launched.append(configs)
        original(kernel, grid, configs, key, args, kwargs, outputs, device)

    monkeypatch.setattr(linear_attn, "_launch", spy)
    monkeypatch.setattr(linear_attn, "SEGMENT_CHUNKS", 1)
    q, k, v, g, beta, s0 = testing.linear_inputs("gdn", 1, 130, 1, 1, 32, 32, torch.bfloat16, DEVICE)
    with torch.no_grad():
        kernels.chunk_linear_attention(q, k, v, g, beta, initial_state=s0)
    assert launched == [linear_attn._configs(torch.bfloat16, 32, candidates, q.device)]


def test_tuning_keeps_the_fastest_candidate_that_matches_the_first(monkeypatch):
    linear_attn = kernels.linear_attn
    monkeypatch.setattr(linear_attn, "_tuning", lambda device: True)
    monkeypatch.setattr(linear_attn, "_CHOICES", {})
    times = {"a": 3.0, "b": 1.0, "c": 2.0, "d": 0.5, "e": 0.1}
    out = torch.zeros(4)
    current = []

    def run(option):
        if option == "e":
            raise RuntimeError("out of resources")
        current[:] = [option]
        out.fill_(2.0 if option == "d" else 1.0)

    monkeypatch.setattr(linear_attn.triton.testing, "do_bench", lambda fn, **kwargs: (fn(), times[current[0]])[1])
    device = torch.device("cpu")
    choice = linear_attn._pick("kernel", ("key",), list("abcde"), run, lambda: [out], device)
    # d is faster but computes something else, e fails
    assert choice == "b"
    entry = linear_attn.tuned_configs()[0]
    assert entry["timings"]["a"] == 3.0 and entry["timings"]["d"].startswith("rejected")
    assert entry["timings"]["e"].startswith("failed")
    assert linear_attn._pick("kernel", ("key",), list("abcde"), None, None, device) == "b"


@pytest.mark.parametrize("variant", ["gdn", "gla"])
def test_tuned_path_matches_naive_and_rejects_no_candidate(monkeypatch, variant):
    """The first call of a shape class with tuning on (timing stubbed): every candidate, split and whole sequences
    alike, runs and matches the first, and the results that follow the tuning are right."""
    linear_attn = kernels.linear_attn
    monkeypatch.setattr(linear_attn, "_tuning", lambda device: True)
    monkeypatch.setattr(linear_attn, "_CHOICES", {})
    monkeypatch.setattr(linear_attn, "_segment_options", lambda *args: [0, 1])
    monkeypatch.setattr(linear_attn.triton.testing, "do_bench", lambda fn, **kwargs: (fn(), 1.0)[1])
    errors = testing.check_chunk(variant, 1, 130, 1, 2, 16, 40, torch.float32, DEVICE)
    assert_within_tolerance(errors, torch.float32)
    tuned = linear_attn.tuned_configs()
    assert {"state_fwd segment length", "state_bwd segment length", "chunk_state_bwd_kernel"} <= {
        entry["kernel"] for entry in tuned
    }
    ruled_out = {
        entry["kernel"]: entry["timings"]
        for entry in tuned
        if not all(isinstance(value, float) for value in entry["timings"].values())
    }
    assert not ruled_out


@pytest.mark.gpu
@pytest.mark.parametrize("variant", testing.VARIANTS)
@pytest.mark.parametrize(
    "batch, seq_len, heads, v_heads, key_dim, value_dim, cu_seqlens",
    [
        pytest.param(2, 1000, 2, 4, 128, 128, None, id="T1000-D128-GVA"),
        pytest.param(2, 1000, 4, 4, 64, 64, None, id="T1000-D64"),
        pytest.param(1, 1000, 2, 2, 100, 100, [0, 1, 15, 100, 300, 301, 1000], id="varlen-D100"),
    ],
)
def test_chunk_matches_naive_full_size(variant, batch, seq_len, heads, v_heads, key_dim, value_dim, cu_seqlens):
    errors = testing.check_chunk(
        variant, batch, seq_len, heads, v_heads, key_dim, value_dim, torch.bfloat16, DEVICE, cu_seqlens=cu_seqlens
    )
    assert_within_tolerance(errors, torch.bfloat16)


@pytest.mark.parametrize("variant", testing.VARIANTS)
def test_fused_recurrent_matches_naive(variant):
    """Packed segments (one of length 1), an initial state per segment, GVA, in-kernel q/k L2 norm."""
    errors = testing.check_fused_recurrent(
        variant, 1, 21, 1, 2, 16, 16, torch.float32, DEVICE, cu_seqlens=[0, 1, 9, 21], use_qk_l2norm_in_kernel=True
    )
    assert_within_tolerance(errors, torch.float32)


def test_fused_recurrent_decode_step_continues_chunked_prefill():
    q, k, v, g, beta, s0 = testing.linear_inputs("gdn", 2, 70, 2, 2, 16, 16, torch.float32, DEVICE)
    with torch.no_grad():
        _, s1 = kernels.chunk_gated_delta_rule(
            q[:, :69], k[:, :69], v[:, :69], g[:, :69], beta[:, :69], initial_state=s0, output_final_state=True
        )
        o, s2 = kernels.fused_recurrent_gated_delta_rule(
            q[:, 69:], k[:, 69:], v[:, 69:], g=g[:, 69:], beta=beta[:, 69:], initial_state=s1, output_final_state=True
        )
    o_ref, s_ref = naive_linear_attention(q, k, v, g=g, beta=beta, initial_state=s0, output_final_state=True)
    errors = {"o": testing.rel_rms(o, o_ref[:, 69:]), "state": testing.rel_rms(s2, s_ref)}
    assert_within_tolerance(errors, torch.float32)


def test_named_ops_are_the_generic_op():
    """fla's entry points, called with fla's argument names, select the matching variant."""
    chunked = {
        "gdn": lambda q, k, v, g, beta: kernels.chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True),
        "deltanet": lambda q, k, v, g, beta: kernels.chunk_delta_rule(q, k, v, beta, output_final_state=True),
        "gla": lambda q, k, v, g, beta: kernels.chunk_gla(q, k, v, g, output_final_state=True),
        "kda": lambda q, k, v, g, beta: kernels.chunk_kda(q, k, v, g, beta, output_final_state=True),
    }
    recurrent = {
        "gdn": lambda q, k, v, g, beta: kernels.fused_recurrent_gated_delta_rule(
            q, k, v, g=g, beta=beta, output_final_state=True
        ),
        "deltanet": lambda q, k, v, g, beta: kernels.fused_recurrent_delta_rule(q, k, v, beta, output_final_state=True),
        "gla": lambda q, k, v, g, beta: kernels.fused_recurrent_gla(q, k, v, gk=g, output_final_state=True),
        "kda": lambda q, k, v, g, beta: kernels.fused_recurrent_kda(q, k, v, g, beta, output_final_state=True),
    }
    with torch.no_grad():
        for variant in testing.VARIANTS:
            q, k, v, g, beta, _ = testing.linear_inputs(variant, 1, 9, 1, 1, 16, 16, torch.float32, DEVICE)
            o_ref, s_ref = naive_linear_attention(q, k, v, g=g, beta=beta, output_final_state=True)
            for ops in (chunked, recurrent):
                o, s = ops[variant](q, k, v, g, beta)
                errors = {"o": testing.rel_rms(o, o_ref), "state": testing.rel_rms(s, s_ref)}
                assert_within_tolerance(errors, torch.float32)


def test_rejects_bad_inputs_and_unsupported_options():
    q, k, v, g, beta, s0 = testing.linear_inputs("gdn", 2, 4, 2, 4, 16, 16, torch.float32, DEVICE)
    with pytest.raises(ValueError, match="HV"):
        kernels.chunk_gated_delta_rule(q, k, v[:, :, :3], g[:, :, :3], beta[:, :, :3])
    with pytest.raises(ValueError, match="beta"):
        kernels.chunk_gated_delta_rule(q, k, v, g, beta[:, :, :2])
    with pytest.raises(ValueError, match="initial_state"):
        kernels.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0[:, :2])
    with pytest.raises(ValueError, match="batch size is expected to be 1"):
        kernels.chunk_gated_delta_rule(q, k, v, g, beta, cu_seqlens=torch.tensor([0, 2, 4], device=DEVICE))
    with pytest.raises(NotImplementedError, match="use_gate_in_kernel"):
        kernels.chunk_kda(q, k, v, g[..., None].expand(-1, -1, -1, 16), beta, use_gate_in_kernel=True)
    with pytest.raises(NotImplementedError, match="gv"):
        kernels.fused_recurrent_gla(q, k, v, gv=v)
