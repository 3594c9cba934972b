"""The decoder layer's fused inference kernels (RMSNorm with the residual add, SwiGLU) against the torch code they
replace, and the model's fused inference path against its torch path."""

import pytest
import torch
from transformers import DynamicCache

from hf_effattn import EffAttnForCausalLM, mixer_block_topk, mixer_common
from tests.numerics import rel_rms

pytest.importorskip("hf_effattn.kernels")
from hf_effattn.kernels.decoder_fusion import (  # noqa: E402
    ROTARY_BLOCK_T,
    rms_norm,
    rms_norm_reference,
    rotary,
    rotary_reference,
    silu_mul,
    silu_mul_reference,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32: the kernel and torch differ only in the order of the row sum. bf16: both round the same fp32 values to bf16,
# except where that summation order (or the SiLU's exp) moves a value across a rounding boundary: a one-ulp flip
# (relative 2^-8) on a few elements
TOL = {torch.float32: 1e-6, torch.bfloat16: 4e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden, with_residual", [(96, True), (96, False), (24, True), (5000, True)])
def test_rms_norm_matches_torch(dtype, hidden, with_residual):
    # 3 x 7 = 21 rows: not a multiple of the rows per program; 96, 24 and 5000 are not powers of two, and 5000 takes
    # one row per program
    x = torch.randn(3, 7, hidden, device=DEVICE, dtype=dtype) * 3
    residual = torch.randn_like(x) if with_residual else None
    weight = torch.randn(hidden, device=DEVICE, dtype=dtype)
    out = rms_norm(x, weight, 1e-6, residual=residual)
    ref = rms_norm_reference(x, weight, 1e-6, residual=residual)
    if with_residual:
        (out, total), (ref, ref_total) = out, ref
        # one fp32 add rounded once: the same bits as torch's add
        assert torch.equal(total, ref_total)
    assert out.shape == x.shape and out.dtype == dtype
    assert rel_rms(out, ref) < TOL[dtype], rel_rms(out, ref)


def test_rms_norm_promotes_as_torch():
    """A bf16 stream with an fp32 weight gives fp32, and a bf16 output added to an fp32 residual sums in fp32, as
    torch's type promotion does (autocast and fp32 norms produce both)."""
    x = torch.randn(5, 32, device=DEVICE, dtype=torch.bfloat16)
    weight = torch.randn(32, device=DEVICE)
    out = rms_norm(x, weight)
    ref = rms_norm_reference(x, weight)
    assert out.dtype == ref.dtype == torch.float32
    assert rel_rms(out, ref) < TOL[torch.float32]
    residual = torch.randn(5, 32, device=DEVICE)
    (out, total), (ref, ref_total) = (
        rms_norm(x, weight, residual=residual),
        rms_norm_reference(x, weight, residual=residual),
    )
    assert total.dtype == ref_total.dtype == torch.float32 and torch.equal(total, ref_total)
    assert rel_rms(out, ref) < TOL[torch.float32]


def test_rms_norm_reads_strided_rows():
    """Rows of a wider tensor (a view with a row stride larger than the hidden size) are read in place."""
    wide = torch.randn(6, 80, device=DEVICE)
    x = wide[:, :48]
    weight = torch.randn(48, device=DEVICE)
    assert rel_rms(rms_norm(x, weight), rms_norm_reference(x, weight)) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_matches_torch(dtype):
    # 3 x 7 x 123 elements: not a multiple of the kernel's block
    gate = torch.randn(3, 7, 123, device=DEVICE, dtype=dtype) * 4
    up = torch.randn_like(gate)
    out = silu_mul(gate, up)
    ref = silu_mul_reference(gate, up)
    assert out.shape == gate.shape and out.dtype == dtype
    assert rel_rms(out, ref) < TOL[dtype], rel_rms(out, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim, cos_batch", [(16, 2), (24, 1)])
def test_rotary_matches_transformers(dtype, head_dim, cos_batch):
    """The rotate-half embedding of a strided view (a projection's heads), against transformers' own function: the
    same bits, since each product and the sum round once, as in torch. Head dim 24 has a non-power-of-two half;
    cos/sin of batch 1 serve every row."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    seq_len = ROTARY_BLOCK_T + 3
    projection = torch.randn(2, seq_len, 3 * head_dim + 8, device=DEVICE, dtype=dtype)
    x = projection[..., : 3 * head_dim].view(2, seq_len, 3, head_dim)
    angles = torch.randn(cos_batch, seq_len, head_dim // 2, device=DEVICE).repeat(1, 1, 2)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    out = rotary(x, cos, sin)
    expected, _ = apply_rotary_pos_emb(x, x, cos, sin, unsqueeze_dim=2)
    assert out.is_contiguous() and out.dtype == dtype
    assert torch.equal(out, expected)
    assert torch.equal(rotary_reference(x, cos, sin), expected)


def test_fused_ops_refuse_mismatched_shapes():
    x = torch.randn(2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="weight: expected shape"):
        rms_norm(x, torch.ones(8, device=DEVICE))
    with pytest.raises(ValueError, match="residual: expected shape"):
        rms_norm(x, torch.ones(16, device=DEVICE), residual=x[:1])
    with pytest.raises(ValueError, match="same shape"):
        silu_mul(x, x[:, :8])
    q = torch.randn(1, 4, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="rotary: expected"):
        rotary(q, torch.ones(1, 4, 8, device=DEVICE), torch.ones(1, 4, 8, device=DEVICE))
    with pytest.raises(ValueError, match="neither 1 nor 1"):
        rotary(q, torch.ones(3, 4, 16, device=DEVICE), torch.ones(3, 4, 16, device=DEVICE))


# (layout, layers with a rotary embedding: gdn has none by default)
@pytest.mark.parametrize(
    "mixers, rotary_layers", [(["gdn", "full", "sliding"], 2), (["full", "block_topk", "hedgehog"], 3)]
)
def test_model_fused_inference_matches_the_torch_path(tiny_config, monkeypatch, mixers, rotary_layers):
    """No-grad forward through the cache (a prefill, then decode steps): the fused norms and SwiGLU (which run) give
    the torch path's logits; the mixers run the same ops in both."""
    torch.manual_seed(0)
    model = EffAttnForCausalLM(tiny_config(mixers)).to(DEVICE).eval()
    ids = torch.randint(1, 97, (2, 40), device=DEVICE)
    calls = []
    original = mixer_common.DECODER_OPS.load

    def counting_load():
        def counted(name, op):
            def run(*args, **kwargs):
                calls.append(name)
                return op(*args, **kwargs)

            return run

        return tuple(counted(name, op) for name, op in zip(("rms_norm", "silu_mul", "rotary"), original()))

    monkeypatch.setattr(mixer_common, "DECODER_OPS", mixer_common.TritonOps("test", counting_load))
    # a block_topk prefill on its kernels rotates q and k in the kernel that also takes the block means
    block_topk_ops = mixer_block_topk.triton_block_topk

    def counting_block_topk():
        attention, rotary = block_topk_ops()

        def run(*args):
            calls.extend(["rotary", "rotary"])
            return rotary(*args)

        return attention, run

    monkeypatch.setattr(mixer_block_topk, "triton_block_topk", counting_block_topk)

    @torch.no_grad()
    def decode():
        cache = DynamicCache(config=model.config)
        logits = [model(ids[:, :38], past_key_values=cache, use_cache=True).logits]
        for t in (38, 39):
            logits.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
        return torch.cat(logits, dim=1)

    norm_calls = []
    for module in model.modules():
        if isinstance(module, mixer_common.RMSNorm):
            module.register_forward_hook(lambda *args: norm_calls.append(1))
    monkeypatch.setattr(mixer_common, "DECODER_OPS_OVERRIDE", "triton")
    fused = decode()
    # every RMSNorm ran the kernel: per forward at least 2 per layer and the final norm (the mixers' own per-head
    # norms, where their torch path runs, come on top); one SwiGLU per layer
    layers = len(mixers)
    assert calls.count("rms_norm") == len(norm_calls) >= 3 * (2 * layers + 1), (calls, len(norm_calls))
    assert calls.count("silu_mul") == 3 * layers, calls
    # q and k of every layer with a rotary embedding
    assert calls.count("rotary") == 3 * 2 * rotary_layers, calls
    monkeypatch.setattr(mixer_common, "DECODER_OPS_OVERRIDE", "reference")
    reference = decode()
    assert rel_rms(fused, reference) < 1e-5, rel_rms(fused, reference)


def test_decoder_fusion_stays_off_for_training(monkeypatch):
    monkeypatch.setattr(mixer_common, "DECODER_OPS_OVERRIDE", "triton")
    x = torch.zeros(1, 2, 4, device=DEVICE)
    with torch.no_grad():
        assert mixer_common.decoder_fusion_ops(x) is not None
    # gradients enabled: the torch code, which has a backward
    assert mixer_common.decoder_fusion_ops(x) is None
    monkeypatch.setattr(mixer_common, "DECODER_OPS_OVERRIDE", "reference")
    with torch.no_grad():
        assert mixer_common.decoder_fusion_ops(x) is None
