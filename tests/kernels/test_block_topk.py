"""The block top-k Triton kernels against the torch reference: selection, output and dq/dk/dv, odd lengths, GQA,
packed sequences; and the mixer on the kernels against the mixer on the reference. On a machine without a GPU the
kernels run through Triton's interpreter."""

import pytest
import torch
from transformers import DynamicCache

from hf_effattn import EffAttnForCausalLM, mixer_block_topk, ops_reference
from tests.numerics import rel_rms

kernels = pytest.importorskip("hf_effattn.kernels.block_topk")
pytestmark = pytest.mark.usefixtures("torch_single_thread")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (output, gradients): the interpreter computes fp32 dots exactly; GPUs run them in tf32; bf16 as for every kernel
TOLERANCE = {torch.float32: (1e-5, 1e-5) if DEVICE == "cpu" else (5e-3, 1e-2), torch.bfloat16: (5e-3, 1e-2)}
MODEL_TOL = 1e-4 if DEVICE == "cpu" else 2e-2

# (B, T, H, Hkv, D, block_size, top_k, keep_first_block, dtype, cu_seqlens)
CASES = [
    pytest.param(2, 100, 4, 2, 16, 16, 2, True, torch.float32, None, id="B2-T100-G2"),
    pytest.param(2, 77, 6, 2, 24, 16, 1, False, torch.float32, None, id="B2-T77-G3-D24-top1-no-first"),
    pytest.param(1, 63, 4, 4, 16, 16, 3, True, torch.float32, None, id="T63-MHA-top3"),
    pytest.param(1, 130, 4, 2, 16, 16, 2, True, torch.float32, [0, 1, 17, 50, 50, 130], id="varlen-short"),
    pytest.param(1, 100, 4, 2, 32, 32, 2, True, torch.bfloat16, None, id="T100-bf16-block32"),
]


def inputs(batch, seq_len, heads, kv_heads, head_dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_len, heads, head_dim, generator=gen)
    k = torch.randn(batch, seq_len, kv_heads, head_dim, generator=gen)
    v = torch.randn(batch, seq_len, kv_heads, head_dim, generator=gen)
    return [x.to(dtype).to(DEVICE) for x in (q, k, v)]


@pytest.mark.parametrize(
    ("batch", "seq_len", "heads", "kv_heads", "head_dim", "block", "top_k", "first", "dtype", "cu"), CASES
)
def test_kernels_match_the_reference(batch, seq_len, heads, kv_heads, head_dim, block, top_k, first, dtype, cu):
    q, k, v = inputs(batch, seq_len, heads, kv_heads, head_dim, dtype)
    cu_seqlens = None if cu is None else torch.tensor(cu, device=DEVICE)
    options = {"block_size": block, "top_k": top_k, "keep_first_block": first, "cu_seqlens": cu_seqlens}
    selected = kernels.block_topk_select(q, k, **options)
    expected_selection = ops_reference.block_topk_select(q, k, **options)
    assert selected.dtype == torch.int32 and torch.equal(selected, expected_selection.to(selected.device))

    tri = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
    o = kernels.block_topk_attention(*tri, **options)
    o_ref = ops_reference.block_topk_attention(*ref, block_indices=selected, **options)
    assert o.dtype == dtype and o.shape == q.shape
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    (o.float() * do).sum().backward()
    (o_ref * do.double()).sum().backward()
    output_tol, grad_tol = TOLERANCE[dtype]
    assert rel_rms(o, o_ref) <= output_tol, f"o: {rel_rms(o, o_ref):.2e}"
    for name, a, b in zip(("dq", "dk", "dv"), tri, ref, strict=True):
        assert a.grad.dtype == a.dtype and torch.isfinite(a.grad).all(), name
        assert rel_rms(a.grad, b.grad) <= grad_tol, f"{name}: {rel_rms(a.grad, b.grad):.2e}"


def test_split_work_matches_the_reference(monkeypatch):
    """Lists of query blocks split over several dk/dv programs (atomic adds) and selection tiles of 2 blocks."""
    monkeypatch.setattr(kernels, "DKV_QUERY_CHUNK", 2)
    monkeypatch.setattr(kernels, "SELECT_BQ", 2)
    kernels._dense_layout.cache_clear()
    q, k, v = inputs(2, 100, 4, 2, 16, torch.float32, seed=3)
    tri = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
    selected = kernels.block_topk_select(q, k, block_size=16, top_k=2)
    assert torch.equal(selected, ops_reference.block_topk_select(q, k, block_size=16, top_k=2).to(selected.device))
    o = kernels.block_topk_attention(*tri, block_size=16, top_k=2)
    o_ref = ops_reference.block_topk_attention(*ref, block_size=16, top_k=2, block_indices=selected)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    (o * do).sum().backward()
    (o_ref * do.double()).sum().backward()
    output_tol, grad_tol = TOLERANCE[torch.float32]
    assert rel_rms(o, o_ref) <= output_tol
    for name, a, b in zip(("dq", "dk", "dv"), tri, ref, strict=True):
        assert rel_rms(a.grad, b.grad) <= grad_tol, f"{name}: {rel_rms(a.grad, b.grad):.2e}"
    kernels._dense_layout.cache_clear()


def test_selection_over_many_blocks_and_ties():
    # 150 blocks: the selection kernel scores several chunks of candidates and merges its running top-k
    q, k, _ = inputs(1, 16 * 150, 2, 1, 16, torch.float32, seed=2)
    options = {"block_size": 16, "top_k": 5, "keep_first_block": True}
    assert torch.equal(kernels.block_topk_select(q, k, **options), ops_reference.block_topk_select(q, k, **options))
    # identical blocks: every score ties, the lowest indices win
    q, k = torch.ones(1, 16 * 150, 2, 16, device=DEVICE), torch.ones(1, 16 * 150, 1, 16, device=DEVICE)
    selected = kernels.block_topk_select(q, k, block_size=16, top_k=3)
    assert torch.equal(selected, ops_reference.block_topk_select(q, k, block_size=16, top_k=3).to(selected.device))
    assert selected[0, 100, 0].tolist() == [1, 2, 3]


def test_given_selection_is_used_and_checked():
    q, k, v = inputs(1, 64, 4, 2, 16, torch.float32)
    selected = kernels.block_topk_select(q, k, block_size=16, top_k=1, keep_first_block=False)
    # a different valid selection (block 0 for every query block that has one) changes the result
    forced = torch.where(torch.arange(4, device=DEVICE)[None, :, None, None] > 0, 0, -1).expand_as(selected)
    forced = forced.to(torch.int32).contiguous()
    own = kernels.block_topk_attention(q, k, v, 16, 1, False, block_indices=selected)
    other = kernels.block_topk_attention(q, k, v, 16, 1, False, block_indices=forced)
    expected = ops_reference.block_topk_attention(q, k, v, 16, 1, False, block_indices=forced)
    # the fp32 output tolerance (GPUs run fp32 dots in tf32); the two selections differ far beyond it
    output_tol = TOLERANCE[torch.float32][0]
    assert rel_rms(other, expected) <= output_tol and rel_rms(own, other) > 10 * output_tol
    with pytest.raises(ValueError, match="block_indices must hold"):
        kernels.block_topk_attention(q, k, v, 16, 1, block_indices=selected[:, :2])


# (B, H, Hkv, D, block_size, top_k, keep_first_block, dtype, prompt, steps, first real token per row)
DECODE_CASES = [
    pytest.param(2, 6, 2, 24, 16, 2, True, torch.float32, 40, 30, [3, 42], id="G3-D24-top2-padding"),
    pytest.param(2, 4, 2, 16, 16, 1, False, torch.float32, 20, 14, [0, 7], id="top1-no-first"),
    pytest.param(1, 4, 1, 32, 32, 3, True, torch.bfloat16, 70, 30, [0], id="MQA-bf16-block32"),
    # 70 blocks: two programs of the scores kernel
    pytest.param(1, 2, 1, 16, 16, 5, True, torch.float32, 16 * 70, 20, [0], id="70-blocks"),
]


@pytest.mark.parametrize(
    ("batch", "heads", "kv_heads", "head_dim", "block", "top_k", "first", "dtype", "prompt", "steps", "first_real"),
    DECODE_CASES,
)
def test_decode_matches_the_cached_reference(
    batch, heads, kv_heads, head_dim, block, top_k, first, dtype, prompt, steps, first_real
):
    """Decode steps on the kernel against `block_topk_cached_attention`, each from the state the kernel left: outputs
    and the block-mean state across block boundaries (query sums and means, the key means of completed blocks).
    Left-padded rows count blocks from their first real token; a row whose first real token comes after the first
    steps gets zeros there and keeps its state. kbar is written in place while it has room and grows past it."""
    check_decode(batch, heads, kv_heads, head_dim, block, top_k, first, dtype, prompt, steps, first_real)


def test_decode_selects_over_chunks_of_scores(monkeypatch):
    """Rows with more candidate blocks than the selection holds at once: chunks of 16 scores, each chunk's top-k
    merged into the running list."""
    monkeypatch.setattr(kernels, "DECODE_MAX_SCORES", 16)
    check_decode(1, 2, 1, 16, 16, 5, True, torch.float32, 16 * 70, 6, [0])


def check_decode(batch, heads, kv_heads, head_dim, block, top_k, first, dtype, prompt, steps, first_real):
    q, k, v = inputs(batch, prompt + steps, heads, kv_heads, head_dim, dtype, seed=6)
    first_real = torch.tensor(first_real, device=DEVICE)
    options = {"block_size": block, "top_k": top_k, "keep_first_block": first}
    _, ref_state = ops_reference.block_topk_cached_attention(
        q[:, :prompt], k[:, :prompt], v[:, :prompt], None, first_real, attend=False, **options
    )
    state = {name: x.clone() for name, x in ref_state.items()}
    # room for the prompt's blocks alone: the first step into a new block grows kbar
    state["kbar"] = state["kbar"][:, : -(-prompt // block)].clone()
    output_tol = TOLERANCE[dtype][0]
    grew = 0
    for t in range(prompt, prompt + steps):
        cache = (k[:, : t + 1], v[:, : t + 1])
        o_ref, ref_state = ops_reference.block_topk_cached_attention(
            q[:, t : t + 1], *cache, ref_state, first_real, **options
        )
        room = state["kbar"].shape[1] >= -(-(t + 1) // block)
        o, new = kernels.block_topk_decode(q[:, t : t + 1], *cache, state, first_real, **options)
        assert o.dtype == dtype and o.shape == (batch, 1, heads, head_dim)
        assert rel_rms(o, o_ref) <= output_tol, f"step {t}: {rel_rms(o, o_ref):.2e}"
        padded = first_real > t
        assert not o[padded].any()
        assert (new["kbar"] is state["kbar"]) == room
        grew += not room
        state = new
        # fp32 sums in another order
        for name in ("qbar", "qsum"):
            torch.testing.assert_close(state[name], ref_state[name], rtol=1e-5, atol=1e-5, msg=f"step {t}: {name}")
        blocks = min(state["kbar"].shape[1], ref_state["kbar"].shape[1])
        torch.testing.assert_close(state["kbar"][:, :blocks], ref_state["kbar"][:, :blocks], rtol=1e-5, atol=1e-5)
        assert not state["kbar"][:, blocks:].any() and not ref_state["kbar"][:, blocks:].any()
    assert grew >= 1


def test_decode_ties_go_to_the_lower_blocks():
    """Equal keys in every block: every score ties and the decode step reads the lowest blocks, as the reference."""
    q, _, v = inputs(1, 16 * 20 + 1, 2, 1, 16, torch.float32, seed=7)
    k = torch.ones(1, 16 * 20 + 1, 1, 16, device=DEVICE)
    first_real = torch.zeros(1, dtype=torch.long, device=DEVICE)
    options = {"block_size": 16, "top_k": 3, "keep_first_block": True}
    _, state = ops_reference.block_topk_cached_attention(
        q[:, :-1], k[:, :-1], v[:, :-1], None, first_real, attend=False, **options
    )
    o_ref, _ = ops_reference.block_topk_cached_attention(q[:, -1:], k, v, state, first_real, **options)
    o, _ = kernels.block_topk_decode(q[:, -1:], k, v, state, first_real, **options)
    assert rel_rms(o, o_ref) <= TOLERANCE[torch.float32][0]
    # the same step over blocks 1, 2, 4 instead of 1, 2, 3 differs far beyond the tolerance
    shifted = torch.cat([v[:, : 16 * 3], v[:, 16 * 4 : 16 * 5], v[:, 16 * 3 : 16 * 4], v[:, 16 * 5 :]], dim=1)
    o_other, _ = kernels.block_topk_decode(q[:, -1:], k, shifted, state, first_real, **options)
    assert rel_rms(o_other, o_ref) > 10 * TOLERANCE[torch.float32][0]


def test_decode_bad_arguments_raise():
    q, k, v = inputs(1, 40, 4, 2, 16, torch.float32)
    first_real = torch.zeros(1, dtype=torch.long, device=DEVICE)
    _, state = ops_reference.block_topk_cached_attention(q, k, v, None, first_real, block_size=16, attend=False)
    with pytest.raises(ValueError, match="one new token per row"):
        kernels.block_topk_decode(q[:, -2:], k, v, state, first_real, block_size=16)
    with pytest.raises(ValueError, match="block-mean state"):
        kernels.block_topk_decode(q[:, -1:], k, v, None, first_real, block_size=16)
    with pytest.raises(ValueError, match="state qbar and qsum"):
        kernels.block_topk_decode(q[:, -1:], k, v, {**state, "qbar": state["qbar"][:, :1]}, first_real, block_size=16)
    with pytest.raises(ValueError, match="block_size must be one of"):
        kernels.block_topk_decode(q[:, -1:], k, v, state, first_real, block_size=24)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"block_size": 48}, "block_size must be one of"),
        ({"top_k": 0}, "top_k must be a positive integer"),
        ({"cu_seqlens": torch.tensor([0, 10, 20])}, "batch size is expected to be 1"),
        ({"cu_seqlens": torch.tensor([1, 20]), "batch": 1}, "must rise from 0"),
        ({"cu_seqlens": torch.tensor([0, 12, 8, 20]), "batch": 1}, "must rise from 0"),
        ({"cu_seqlens": torch.tensor([0, 10]), "batch": 1}, "must rise from 0"),
    ],
    ids=["block-size", "top-k", "varlen-batch", "varlen-start", "varlen-order", "varlen-end"],
)
def test_bad_arguments_raise(kwargs, message):
    kwargs = dict(kwargs)
    q, k, v = inputs(kwargs.pop("batch", 2), 20, 4, 2, 16, torch.float32)
    with pytest.raises(ValueError, match=message):
        kernels.block_topk_attention(q, k, v, **kwargs)


def test_mixer_on_the_kernels_matches_the_reference(tiny_config, monkeypatch):
    """Forward, padding (packed sequences), cached decode and parameter gradients of a model with block_topk layers."""
    torch.manual_seed(0)
    options = {"block_topk": {"block_size": 16, "top_k": 1}}
    model = EffAttnForCausalLM(tiny_config(["block_topk", "full"], options)).to(DEVICE).train()
    ids = torch.randint(1, 97, (2, 70), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :21] = 0

    def run(ops):
        monkeypatch.setattr(mixer_block_topk, "BLOCK_TOPK_OPS_OVERRIDE", ops)
        model.zero_grad()
        logits = model(ids, attention_mask=mask).logits
        (logits.float().pow(2) * mask[..., None]).mean().backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        return logits.detach(), grads

    ref_logits, ref_grads = run("reference")
    logits, grads = run("triton")
    real = mask.bool()
    assert rel_rms(logits[real], ref_logits[real]) <= MODEL_TOL
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert rel_rms(grad, ref_grads[name]) <= MODEL_TOL, name


def rotary_tables(batch, seq_len, head_dim, dtype, seed=5):
    """cos/sin `[batch, T, D]` of rotate-half rotary angles at random positions, in `dtype`."""
    gen = torch.Generator().manual_seed(seed)
    positions = torch.rand(batch, seq_len, 1, generator=gen) * 1000
    freqs = 10000.0 ** (-torch.arange(0, head_dim, 2) / head_dim)
    angles = torch.cat([positions * freqs, positions * freqs], dim=-1)
    return angles.cos().to(dtype).to(DEVICE), angles.sin().to(dtype).to(DEVICE)


@pytest.mark.parametrize(
    ("batch", "seq_len", "heads", "kv_heads", "head_dim", "block", "dtype", "cos_batch"),
    [
        pytest.param(2, 100, 6, 2, 24, 16, torch.float32, 2, id="B2-T100-G3-D24-fp32"),
        pytest.param(1, 100, 4, 4, 16, 16, torch.bfloat16, 1, id="T100-MHA-bf16"),
        # the model's tiles: 16 rows per load, 4 loads per block; one cos/sin row shared by the batch
        pytest.param(2, 150, 8, 2, 128, 64, torch.bfloat16, 1, id="B2-T150-G4-D128-block64-shared-cos"),
    ],
)
def test_rotary_with_block_means(batch, seq_len, heads, kv_heads, head_dim, block, dtype, cos_batch):
    """One pass gives the rotary kernel's bits, the block means of its output, and through them the selection and
    output of the op that pools q and k itself."""
    from hf_effattn.kernels.decoder_fusion import rotary

    q, k, v = inputs(batch, seq_len, heads, kv_heads, head_dim, dtype, seed=6)
    # strided heads, as a transposed projection gives them
    q, k = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k))
    cos, sin = rotary_tables(cos_batch, seq_len, head_dim, dtype)
    q_rot, k_rot, (qbar, kbar) = kernels.block_topk_rotary(q, k, cos, sin, block_size=block)
    assert torch.equal(q_rot, rotary(q, cos, sin)) and torch.equal(k_rot, rotary(k, cos, sin))

    groups, complete = heads // kv_heads, seq_len // block
    blocks = -(-seq_len // block)
    assert qbar.shape == kbar.shape == (batch, blocks, kv_heads, head_dim) and qbar.dtype == torch.float32
    padded = torch.nn.functional.pad(q_rot.float(), (0, 0, 0, 0, 0, blocks * block - seq_len))
    q_sums = padded.view(batch, blocks, block, kv_heads, groups, head_dim).sum(dim=(2, 4))
    k_means = k_rot[:, : complete * block].float().view(batch, complete, block, kv_heads, head_dim).mean(dim=2)
    # fp32 sums in another order
    torch.testing.assert_close(qbar, q_sums / (block * groups), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kbar[:, :complete], k_means, rtol=1e-5, atol=1e-6)
    assert not kbar[:, complete:].any()

    options = {"block_size": block, "top_k": 2}
    selected = kernels.block_topk_select(q_rot, k_rot, **options)
    assert (selected >= 0).any()
    assert torch.equal(kernels.block_topk_select(q_rot, k_rot, block_means=(qbar, kbar), **options), selected)
    o = kernels.block_topk_attention(q_rot, k_rot, v, block_means=(qbar, kbar), **options)
    assert torch.equal(o, kernels.block_topk_attention(q_rot, k_rot, v, block_indices=selected, **options))


def test_bad_block_means_and_rotary_inputs_raise():
    q, k, v = inputs(1, 40, 4, 2, 16, torch.float32)
    cos, sin = rotary_tables(1, 40, 16, torch.float32)
    _, _, means = kernels.block_topk_rotary(q, k, cos, sin, block_size=16)
    with pytest.raises(ValueError, match="with cu_seqlens, leave block_means unset"):
        kernels.block_topk_attention(q, k, v, 16, 1, cu_seqlens=torch.tensor([0, 20, 40]), block_means=means)
    with pytest.raises(ValueError, match="the key means must be fp32 of"):
        kernels.block_topk_select(q, k, 16, 1, block_means=(means[0], means[1][:, :2]))
    with pytest.raises(TypeError, match=r"\(query means, key means\) pair"):
        kernels.block_topk_select(q, k, 16, 1, block_means=means[0])
    with pytest.raises(TypeError, match="pair of tensors"):
        kernels.block_topk_select(q, k, 16, 1, block_means=(1.0, 2.0))
    with pytest.raises(ValueError, match="the query means must be fp32 of"):
        kernels.block_topk_select(q, k, 16, 1, block_means=(means[0].double(), means[1]))
    with pytest.raises(ValueError, match="must share a dtype"):
        kernels.block_topk_rotary(q, k.double(), cos, sin, block_size=16)
    with pytest.raises(ValueError, match="even head dim"):
        kernels.block_topk_rotary(q[..., :15], k[..., :15], cos[..., :15], sin[..., :15], block_size=16)
    with pytest.raises(ValueError, match="cos/sin: expected shape"):
        kernels.block_topk_rotary(q, k, cos[:, :20], sin[:, :20], block_size=16)
    with pytest.raises(ValueError, match="block_size must be one of"):
        kernels.block_topk_rotary(q, k, cos, sin, block_size=24)


@pytest.mark.parametrize(
    ("prompt", "num_steps"),
    # (4 complete blocks + 6 tokens, then steps that complete the fifth), (whole blocks only), (no complete block)
    [(70, 12), (64, 3), (10, 7)],
)
def test_fused_rotary_prefill_and_its_decode_state(tiny_config, monkeypatch, prompt, num_steps):
    """At inference on the kernels, an unpadded prefill takes its rotary embedding and block means from one kernel;
    the cache's decode state built from those means matches the one the reference builds from q and k, and so do
    the decode steps that read it (on the decode kernel), past the next block boundary."""
    torch.manual_seed(0)
    options = {"block_topk": {"block_size": 16, "top_k": 1}}
    model = EffAttnForCausalLM(tiny_config(["block_topk", "full", "block_topk"], options)).to(DEVICE).eval()
    ids = torch.randint(1, 97, (2, prompt), device=DEVICE)
    steps = torch.randint(1, 97, (2, num_steps), device=DEVICE)
    attention, rotary, decode = mixer_block_topk.triton_block_topk()
    fused, decoded = [], []
    monkeypatch.setattr(
        mixer_block_topk.BLOCK_TOPK_OPS,
        "ops",
        (attention, lambda *a: fused.append(1) or rotary(*a), lambda *a, **kw: decoded.append(1) or decode(*a, **kw)),
    )

    def run(ops):
        monkeypatch.setattr(mixer_block_topk, "BLOCK_TOPK_OPS_OVERRIDE", ops)
        with torch.no_grad():
            cache = DynamicCache(config=model.config)
            logits = [model(ids, past_key_values=cache, use_cache=True).logits]
            state = {name: x.clone() for name, x in cache.layers[0].block_means.items()}
            logits += [
                model(steps[:, i : i + 1], past_key_values=cache, use_cache=True).logits for i in range(num_steps)
            ]
            # the cache-free forward
            logits.append(model(ids).logits)
        return torch.cat(logits, dim=1), state

    ref_logits, ref_state = run("reference")
    assert not fused and not decoded
    logits, state = run("triton")
    # two layers, each in the cached prefill and in the cache-free forward; each step in both layers
    assert len(fused) == 4 and len(decoded) == 2 * num_steps
    assert rel_rms(logits, ref_logits) <= MODEL_TOL
    # the reference keeps room for the next blocks (zeros); fp32 means summed in another order
    blocks = state["kbar"].shape[1]
    assert blocks == -(-prompt // 16) and not ref_state["kbar"][:, blocks:].any()
    for name in ("kbar", "qbar", "qsum"):
        expected = ref_state[name][:, :blocks] if name == "kbar" else ref_state[name]
        torch.testing.assert_close(state[name], expected, rtol=1e-4, atol=1e-5, msg=name)
