"""The fused recurrent kernel as a torch custom op: its fake implementation, and a compiled decode step that keeps it
in the graph, as it keeps the full layers' decode attention op (on a machine without a GPU the kernels run through
Triton's interpreter)."""

import pytest
import torch

from hf_effattn import EffAttnForCausalLM, mixer_full, mixer_linear
from hf_effattn.ops_reference import recurrent_linear_attention
from tests.numerics import rel_rms

ops = pytest.importorskip("hf_effattn.kernels.linear_attn_ops")
pytestmark = pytest.mark.usefixtures("torch_single_thread")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 5e-3 if DEVICE == "cuda" else 1e-4


def inputs(gate: str, batch=2, heads=2, value_heads=4, dim=16):
    q, k = (torch.randn(batch, 1, heads, dim, device=DEVICE) for _ in range(2))
    v = torch.randn(batch, 1, value_heads, dim, device=DEVICE)
    g = {
        "none": None,
        "head": -torch.rand(batch, 1, value_heads, device=DEVICE),
        "channel": -torch.rand(batch, 1, value_heads, dim, device=DEVICE),
    }[gate]
    beta = torch.rand(batch, 1, value_heads, device=DEVICE)
    state = torch.randn(batch, value_heads, dim, dim, device=DEVICE)
    return q, k, v, g, beta, state


def test_fake_implementation_gives_the_output_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(3, 1, 2, 16, dtype=torch.bfloat16)
        v = torch.empty(3, 1, 4, 32, dtype=torch.bfloat16)
        o, state = torch.ops.hf_effattn.fused_recurrent_linear_attention(q, q, v, None, None, None, 0.25)
    assert (o.shape, o.dtype) == ((3, 1, 4, 32), torch.bfloat16)
    assert (state.shape, state.dtype) == ((3, 4, 16, 32), torch.float32)


@pytest.mark.parametrize("gate", ["none", "head", "channel"])
def test_op_passes_opcheck_and_matches_the_reference(gate):
    q, k, v, g, beta, state = inputs(gate)
    torch.library.opcheck(torch.ops.hf_effattn.fused_recurrent_linear_attention, (q, k, v, g, beta, state, 0.3))
    o, final = ops.fused_recurrent_linear_attention_op(q, k, v, g, beta, 0.3, state, output_final_state=True)
    ref_o, ref_final = recurrent_linear_attention(q, k, v, g, beta, 0.3, state, output_final_state=True)
    assert rel_rms(o, ref_o) < TOL and rel_rms(final, ref_final) < TOL


def test_op_traces_into_one_graph():
    q, k, v, g, beta, state = inputs("head")

    def step(q, k, v, g, beta, state):
        o, final = ops.fused_recurrent_linear_attention_op(q, k, v, g, beta, None, state, output_final_state=True)
        return o * 2, final

    compiled = torch.compile(step, backend="eager", fullgraph=True)
    o, final = compiled(q, k, v, g, beta, state)
    ref_o, ref_final = recurrent_linear_attention(q, k, v, g, beta, None, state, output_final_state=True)
    assert rel_rms(o, 2 * ref_o) < TOL and rel_rms(final, ref_final) < TOL


def compiled_static_step(model, before_eager=None):
    """(the call targets of the one graph two compiled static-cache decode steps make, the first step's logits, the
    logits of the eager dynamic-cache step) after a 20-token prefill; `before_eager()` runs before the eager step."""
    from transformers import StaticCache

    from hf_effattn.evaluation import efficiency

    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    ids = torch.randint(1, 97, (2, 20), device=DEVICE)
    with torch.no_grad():
        logits, cache = efficiency.prefill(model, ids, None)
        token = logits[:, -1:].argmax(-1)
        static = efficiency.to_static(model, cache, 32)
        assert isinstance(static, StaticCache)
        compiled = torch.compile(model.forward, backend=backend, fullgraph=True)
        positions = torch.full((2, 1), 20, device=DEVICE)
        actual = compiled(input_ids=token, position_ids=positions, past_key_values=static, use_cache=True).logits
        # a second step reuses the graph: nothing in the cache (its layers' classes included) changes between steps
        compiled(input_ids=token, position_ids=positions + 1, past_key_values=static, use_cache=True)
        if before_eager is not None:
            before_eager()
        expected = model(token, past_key_values=cache, use_cache=True).logits
    assert len(graphs) == 1
    targets = [str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"]
    return targets, actual, expected


def test_compiled_static_decode_runs_the_op(tiny_config, monkeypatch):
    """A whole decode step of a hybrid compiles into one graph holding the custom op, and gives the logits of the
    eager dynamic-cache step."""
    torch.manual_seed(0)
    model = EffAttnForCausalLM(tiny_config(["gdn", "full", "kda"])).to(DEVICE).eval()
    monkeypatch.setattr(mixer_linear, "LINEAR_OPS_OVERRIDE", "triton")
    mixer_linear.triton_linear_ops()
    targets, actual, expected = compiled_static_step(model)
    # one op node per linear layer
    assert targets.count("hf_effattn.fused_recurrent_linear_attention") == 2, sorted(set(targets))
    assert rel_rms(actual, expected) < TOL


def test_compiled_static_decode_runs_the_decode_attention_op(tiny_config, monkeypatch):
    """With the full layers' decode kernel forced, the compiled step holds its op once per full layer and gives the
    logits of the eager SDPA step."""
    torch.manual_seed(0)
    model = EffAttnForCausalLM(tiny_config(["full", "gdn", "full"])).to(DEVICE).eval()
    monkeypatch.setattr(mixer_full, "DECODE_OPS_OVERRIDE", "triton")
    # imported before compiling, as the linear test does: the first compiled step would import them and the second
    # recompile (dynamo guards the import flag)
    mixer_full.DECODE_OPS.get()
    targets, actual, expected = compiled_static_step(
        model, lambda: monkeypatch.setattr(mixer_full, "DECODE_OPS_OVERRIDE", "reference")
    )
    assert targets.count("hf_effattn.decode_attention") == 2, sorted(set(targets))
    assert rel_rms(actual, expected) < TOL
