"""The block top-k Triton kernels against the torch reference: selection, output and dq/dk/dv, odd lengths, GQA,
packed sequences; and the mixer on the kernels against the mixer on the reference. On a machine without a GPU the
kernels run through Triton's interpreter."""

import pytest
import torch

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
