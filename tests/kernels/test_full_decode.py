"""The full-attention layers' decode steps over keys that are all valid (a static cache without a mask, a dynamic cache
without padding) run the split-KV kernel and give what they give on SDPA (the compiled static step:
test_compiled_decode.py); masked steps keep SDPA. On a machine without a GPU the kernels run through Triton's
interpreter."""

import pytest
import torch

from hf_effattn import EffAttnForCausalLM, mixer_full
from hf_effattn.evaluation import efficiency
from hf_effattn.mixer_common import TritonOps
from tests.numerics import rel_rms

pytest.importorskip("hf_effattn.kernels.decode_attention")
pytestmark = pytest.mark.usefixtures("torch_single_thread")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 throughout: the interpreter's dots are exact, GPUs run IEEE dots for fp32 inputs; SDPA sums in another order
TOL = 1e-4
LAYOUT = ["full", "gdn", "full"]


@pytest.fixture
def kernel_calls(monkeypatch):
    """Forces the decode kernel and counts its calls (the mixer asks a fresh `DECODE_OPS` for it)."""
    from hf_effattn.kernels.decode_attention import decode_attention

    calls = []

    def counted(*args):
        calls.append(args[0].shape)
        return decode_attention(*args)

    monkeypatch.setattr(mixer_full, "DECODE_OPS", TritonOps("full-attention decode", lambda: counted))
    monkeypatch.setattr(mixer_full, "DECODE_OPS_OVERRIDE", "triton")
    return calls


def generate(model, ids, mask, steps=5):
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        pad_token_id=0,
        output_scores=True,
        return_dict_in_generate=True,
    )
    return out.sequences, torch.stack(out.scores)


@torch.no_grad()
def test_dynamic_cache_steps(tiny_config, monkeypatch, kernel_calls):
    """Greedy generation on a dynamic cache without padding (no mask reaches the layers: every cached key is valid)
    runs its steps on the kernel and matches SDPA; a left-padded batch has a mask and keeps SDPA."""
    torch.manual_seed(0)
    model = EffAttnForCausalLM(tiny_config(LAYOUT)).to(DEVICE).eval()
    ids = torch.randint(1, 97, (2, 20), device=DEVICE)
    sequences, scores = generate(model, ids, torch.ones_like(ids))
    # 5 new tokens: the prefill gives the first, 4 steps the others, in each of the 2 full layers
    assert len(kernel_calls) == 4 * 2
    monkeypatch.setattr(mixer_full, "DECODE_OPS_OVERRIDE", "reference")
    expected_sequences, expected_scores = generate(model, ids, torch.ones_like(ids))
    assert torch.equal(sequences, expected_sequences)
    assert rel_rms(scores, expected_scores) < TOL, rel_rms(scores, expected_scores)
    monkeypatch.setattr(mixer_full, "DECODE_OPS_OVERRIDE", "triton")
    kernel_calls.clear()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    generate(model, ids, mask)
    assert kernel_calls == []


@torch.no_grad()
def test_static_cache_steps(tiny_config, monkeypatch, kernel_calls):
    """Greedy steps on a static cache without a mask (the kernel reads the buffer's first past + 1 keys) match the
    SDPA steps on the static mask; with a caller's mask the steps keep SDPA."""
    torch.manual_seed(0)
    model = EffAttnForCausalLM(tiny_config(LAYOUT)).to(DEVICE).eval()
    ids = torch.randint(1, 97, (2, 20), device=DEVICE)

    def decode(mode, steps=4, with_mask=False):
        monkeypatch.setattr(mixer_full, "DECODE_OPS_OVERRIDE", mode)
        logits, cache = efficiency.prefill(model, ids, None)
        # a buffer longer than the context: the slots past the valid keys are zeros the kernel must not read
        static = efficiency.to_static(model, cache, 48)
        token, out = logits[:, -1:].argmax(-1), []
        for step in range(steps):
            positions = torch.full((2, 1), 20 + step, device=DEVICE)
            mask = torch.ones(2, 21 + step, dtype=torch.long, device=DEVICE) if with_mask else None
            out.append(model(token, attention_mask=mask, position_ids=positions, past_key_values=static).logits)
            token = out[-1].argmax(-1)
        return torch.cat(out, dim=1)

    logits = decode("triton")
    assert len(kernel_calls) == 4 * 2
    expected = decode("reference")
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))
    assert rel_rms(logits, expected) < TOL, rel_rms(logits, expected)
    kernel_calls.clear()
    decode("triton", steps=1, with_mask=True)
    assert kernel_calls == []
