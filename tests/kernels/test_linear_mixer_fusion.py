"""The fused inference kernels around the linear-attention ops (convolution + q/k/v preparation, gated output norm)
against their fp32 references, and the mixers' fused inference path against their torch path."""

import pytest
import torch
from transformers import DynamicCache

from hf_effattn import EffAttnForCausalLM, mixer_linear
from tests.numerics import rel_rms

pytest.importorskip("hf_effattn.kernels")
from hf_effattn.kernels.linear_mixer_fusion import (  # noqa: E402
    CONV_BLOCK_T,
    gated_rms_norm,
    gated_rms_norm_reference,
    short_conv_qkv,
    short_conv_qkv_reference,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32: the kernels and the references differ only in summation order. bf16: both round their fp32 result once to
# bf16, so any difference is a one-ulp rounding flip (relative 2^-8) on a few elements
TOL = {torch.float32: 1e-5, torch.bfloat16: 4e-3}
# fused vs torch path through a whole fp32 model: the interpreter's dots are exact; on a GPU the linear-attention op
# runs its fp32 dots in tf32 (10-bit mantissa), where last-bit differences of its inputs flip roundings (4e-5 measured
# on an H100); a wrong state or norm is off by more than 1e-2
MIXER_TOL = 5e-4 if DEVICE == "cuda" else 1e-5


def _projections(batch, seq_len, heads, kv_heads, head_dim, dtype):
    shape = (batch, seq_len)
    return (
        torch.randn(*shape, heads * head_dim, device=DEVICE, dtype=dtype),
        torch.randn(*shape, kv_heads * head_dim, device=DEVICE, dtype=dtype),
        torch.randn(*shape, kv_heads * head_dim, device=DEVICE, dtype=dtype),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "seq_len, heads, kv_heads, head_dim, with_state, l2norm",
    [
        (CONV_BLOCK_T + 5, 4, 2, 24, False, True),  # two token blocks, GQA, a non-power-of-two head dim
        (CONV_BLOCK_T + 5, 2, 2, 16, True, False),  # a cached state, no groups, no norm
        (1, 4, 1, 16, True, True),  # one decode token: every tap but the last reads the state
        (2, 2, 1, 16, False, True),  # fewer tokens than the convolution's context
    ],
)
def test_short_conv_qkv_matches_the_reference(dtype, seq_len, heads, kv_heads, head_dim, with_state, l2norm):
    width = 4
    q, k, v = _projections(2, seq_len, heads, kv_heads, head_dim, dtype)
    channels = (heads + 2 * kv_heads) * head_dim
    weight = torch.randn(channels, 1, width, device=DEVICE, dtype=dtype)
    state = torch.randn(2, channels, width - 1, device=DEVICE, dtype=dtype) if with_state else None
    outputs = short_conv_qkv(q, k, v, weight, head_dim, state=state, l2norm=l2norm)
    references = short_conv_qkv_reference(q, k, v, weight, head_dim, state=state, l2norm=l2norm)
    for name, out, ref in zip("qkv", outputs, references):
        assert out.shape == ref.shape == (2, seq_len, heads, head_dim), name
        assert out.dtype == dtype
        assert rel_rms(out, ref) < TOL[dtype], f"{name}: {rel_rms(out, ref):.2e}"
    if l2norm:
        norms = outputs[0].float().norm(dim=-1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-2)


def test_short_conv_qkv_state_continues_the_sequence():
    """A chunk after a state holding the previous chunk's last inputs gives what one pass over both gives."""
    q, k, v = _projections(1, 40, 2, 1, 16, torch.float32)
    weight = torch.randn(64, 1, 4, device=DEVICE)
    whole = short_conv_qkv(q, k, v, weight, 16)
    state = torch.cat([q[:, 29:32], k[:, 29:32], v[:, 29:32]], dim=-1).transpose(1, 2).contiguous()
    tail = short_conv_qkv(q[:, 32:], k[:, 32:], v[:, 32:], weight, 16, state=state)
    for a, b in zip(whole, tail):
        assert rel_rms(a[:, 32:], b) < 1e-6


def test_short_conv_qkv_refuses_mismatched_shapes():
    q, k, v = _projections(1, 8, 2, 1, 16, torch.float32)
    with pytest.raises(ValueError, match="weight: expected 64 channels"):
        short_conv_qkv(q, k, v, torch.randn(48, 4, device=DEVICE), 16)
    with pytest.raises(ValueError, match="v: expected shape"):
        short_conv_qkv(q, k, v[:, :4], torch.randn(64, 4, device=DEVICE), 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm, gate", [(True, True), (True, False), (False, True)])
def test_gated_rms_norm_matches_the_reference(dtype, norm, gate):
    # 2 x 7 x 3 = 42 rows: not a multiple of the kernel's row block; head dim 24 is not a power of two
    o = torch.randn(2, 7, 3, 24, device=DEVICE, dtype=dtype) * 3
    gate_values = torch.randn(2, 7, 72, device=DEVICE, dtype=dtype) if gate else None
    weight = torch.randn(24, device=DEVICE, dtype=dtype) if norm else None
    out = gated_rms_norm(o, gate_values, weight, eps=1e-6)
    ref = gated_rms_norm_reference(o, gate_values, weight, eps=1e-6)
    assert out.shape == (2, 7, 72) and out.dtype == dtype
    assert rel_rms(out, ref) < TOL[dtype], rel_rms(out, ref)


@pytest.mark.parametrize("kind, options", [("gdn", None), ("gla", None), ("gdn", {"window": 8, "sink_tokens": 2})])
def test_mixer_fused_inference_matches_the_torch_path(tiny_config, monkeypatch, kind, options):
    """No-grad forward through the cache (a chunked prefill, then decode steps): the fused kernels (which run) give
    the torch path's logits. The Triton linear-attention ops run in both, so only the fusion differs. The windowed
    layout (softmax window and sinks beside the state, as conversions build) keeps its window cache too."""
    torch.manual_seed(0)
    model = EffAttnForCausalLM(tiny_config([kind, "full", kind], {kind: options} if options else None)).to(DEVICE)
    model = model.eval()
    if options:
        with torch.no_grad():
            for layer in (0, 2):
                model.model.layers[layer].self_attn.recurrent_scale.normal_(0.0, 1.0)
    ids = torch.randint(1, 97, (2, 72), device=DEVICE)
    calls = []
    original = mixer_linear.fusion_ops

    def spy(x, mask):
        ops = original(x, mask)
        calls.append(ops is not None)
        return ops

    monkeypatch.setattr(mixer_linear, "fusion_ops", spy)
    monkeypatch.setattr(mixer_linear, "LINEAR_OPS_OVERRIDE", "triton")

    @torch.no_grad()
    def decode():
        cache = DynamicCache(config=model.config)
        logits = [model(ids[:, :70], past_key_values=cache, use_cache=True).logits]
        for t in (70, 71):
            logits.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
        return torch.cat(logits, dim=1)

    fused = decode()
    assert calls and all(calls), calls
    # the torch path: fusion off, same Triton linear-attention ops
    monkeypatch.setattr(mixer_linear, "fusion_ops", lambda x, mask: None)
    reference = decode()
    assert rel_rms(fused, reference) < MIXER_TOL, rel_rms(fused, reference)


def test_mixer_fusion_stays_off_for_training_and_padding(tiny_config, monkeypatch):
    monkeypatch.setattr(mixer_linear, "LINEAR_OPS_OVERRIDE", "triton")
    x = torch.zeros(1, 2, 4, device=DEVICE)
    with torch.no_grad():
        assert mixer_linear.fusion_ops(x, None) is not None
        assert mixer_linear.fusion_ops(x, torch.ones(1, 2, dtype=torch.bool, device=DEVICE)) is None
    # gradients enabled: the torch path, which has a backward
    assert mixer_linear.fusion_ops(x, None) is None
    monkeypatch.setattr(mixer_linear, "LINEAR_OPS_OVERRIDE", "reference")
    with torch.no_grad():
        assert mixer_linear.fusion_ops(x, None) is None


def test_short_conv_qkv_without_convolution_splits_normalises_and_repeats():
    q, k, v = _projections(2, 5, 4, 2, 16, torch.float32)
    outputs = short_conv_qkv(q, k, v, None, 16, l2norm=True)
    references = short_conv_qkv_reference(q, k, v, None, 16, l2norm=True)
    for out, ref in zip(outputs, references):
        assert rel_rms(out, ref) < 1e-6
    # v is neither convolved nor normalised: query head 1 reads key/value head 0
    assert torch.equal(outputs[2][:, :, 1], v[:, :, :16])
