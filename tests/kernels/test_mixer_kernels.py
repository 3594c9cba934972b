"""The linear mixers give the same results on the Triton kernels as on the torch reference (forward, cached decode,
gradients); on a machine without a GPU the kernels run through Triton's interpreter."""

import pytest
import torch
from transformers import DynamicCache

from hf_effattn import EffAttnForCausalLM, mixer_linear
from tests.numerics import rel_rms

pytest.importorskip("hf_effattn.kernels")
pytestmark = pytest.mark.usefixtures("torch_single_thread")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the interpreter computes fp32 dots exactly; GPUs run them in tf32
OUTPUT_TOL, GRAD_TOL = (5e-3, 2e-2) if DEVICE == "cuda" else (1e-4, 1e-3)
# one mixer per kernel gate type (per head, per channel without and with the delta rule); deltanet is gdn without a
# gate, which the op tests cover
KINDS = ["gdn", "gla", "kda"]


def run(model, ops, monkeypatch, fn):
    monkeypatch.setattr(mixer_linear, "LINEAR_OPS_OVERRIDE", ops)
    return fn(model)


def test_forward_and_gradients_match_the_reference(tiny_config, monkeypatch):
    torch.manual_seed(0)
    model = EffAttnForCausalLM(tiny_config(KINDS)).to(DEVICE).train()
    # 70 tokens: longer than one 64-token kernel chunk; training runs the chunked ops
    ids = torch.randint(1, 97, (2, 70), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0

    def loss_and_grads(model):
        model.zero_grad()
        logits = model(ids, attention_mask=mask).logits
        logits.float().pow(2).mean().backward()
        return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    ref_logits, ref_grads = run(model, "reference", monkeypatch, loss_and_grads)
    logits, grads = run(model, "triton", monkeypatch, loss_and_grads)
    assert rel_rms(logits, ref_logits) < OUTPUT_TOL, rel_rms(logits, ref_logits)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        error = rel_rms(grad, ref_grads[name])
        assert error < GRAD_TOL, f"{name}: {error:.2e}"


def test_cached_decode_matches_the_reference(tiny_config, monkeypatch):
    torch.manual_seed(0)
    model = EffAttnForCausalLM(tiny_config(KINDS)).to(DEVICE).eval()
    ids = torch.randint(1, 97, (2, 72), device=DEVICE)

    @torch.no_grad()
    def decode(model):
        cache = DynamicCache(config=model.config)
        # a chunked prefill, then token-by-token steps (the fused recurrent ops)
        logits = [model(ids[:, :70], past_key_values=cache, use_cache=True).logits]
        for t in (70, 71):
            logits.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
        return torch.cat(logits, dim=1)

    error = rel_rms(run(model, "triton", monkeypatch, decode), run(model, "reference", monkeypatch, decode))
    assert error < OUTPUT_TOL, error
