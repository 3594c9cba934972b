"""The split-KV decode attention kernel against its fp32 reference and SDPA, and as a torch custom op (fake
implementation, opcheck, one node of a compiled graph). On a machine without a GPU the kernels run through Triton's
interpreter."""

import pytest
import torch
import torch.nn.functional as F

from hf_effattn import mixer_full
from hf_effattn.mixer_common import TritonOps
from tests.numerics import rel_rms

da = pytest.importorskip("hf_effattn.kernels.decode_attention")
pytestmark = pytest.mark.usefixtures("torch_single_thread")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 inputs run IEEE dots (exact in the interpreter); 16-bit outputs are rounded to their dtype (relative RMS
# about 1e-3 for bf16) and the softmax weights enter the value product in it, as in flash attention: 1.9e-3 measured
# at L = 300 in bf16, and the GPU script's bound is 5e-3
TOL = {torch.float32: 1e-5 if DEVICE == "cpu" else 1e-4, torch.float16: 2e-3, torch.bfloat16: 5e-3}


def inputs(batch, heads, kv_heads, length, dim, dtype=torch.float32):
    q = torch.randn(batch, heads, 1, dim, device=DEVICE, dtype=dtype)
    k, v = (torch.randn(batch, kv_heads, length, dim, device=DEVICE, dtype=dtype) for _ in range(2))
    return q, k, v


def sdpa(q, k, v, kv_len=None, scale=None):
    """fp32 SDPA with the key/value heads repeated over their groups; `kv_len` as a boolean key mask."""
    groups = q.shape[1] // k.shape[1]
    k, v = (x.float().repeat_interleave(groups, dim=1) for x in (k, v))
    mask = None
    if kv_len is not None:
        mask = (torch.arange(k.shape[2], device=q.device) < kv_len.reshape(-1, 1))[:, None, None, :]
    return F.scaled_dot_product_attention(q.float(), k, v, attn_mask=mask, scale=scale)


CASES = [
    # (batch, heads, kv heads, L, D, dtype, splits, kv_len)
    pytest.param(2, 2, 2, 17, 64, torch.float32, None, None, id="G1-D64-L17"),
    pytest.param(1, 6, 2, 1, 64, torch.float32, None, None, id="G3-D64-L1"),
    pytest.param(2, 4, 2, 300, 96, torch.float32, 4, None, id="G2-D96-L300-4splits"),
    pytest.param(2, 4, 2, 17, 64, torch.float16, 2, None, id="G2-D64-L17-fp16"),
    # row 0: every key; row 1: split 0 full, split 1 one key, splits 2 and 3 empty; row 2: no key at all
    pytest.param(3, 4, 2, 300, 64, torch.float32, 4, [300, 17, 0], id="static-G2-D64-L300-4splits"),
    # one length for every row (0-d), ending on a split boundary (4 splits of 16 keys)
    pytest.param(2, 2, 1, 300, 96, torch.float32, 4, 64, id="static-G2-D96-L300-boundary"),
    pytest.param(2, 4, 1, 300, 64, torch.bfloat16, 3, [300, 129], id="static-G4-D64-L300-bf16"),
]


@pytest.mark.parametrize("batch, heads, kv_heads, length, dim, dtype, splits, kv_len", CASES)
def test_kernel_matches_the_reference_and_sdpa(batch, heads, kv_heads, length, dim, dtype, splits, kv_len):
    q, k, v = inputs(batch, heads, kv_heads, length, dim, dtype)
    if kv_len is not None:
        kv_len = torch.tensor(kv_len, device=DEVICE, dtype=torch.int32 if dtype == torch.bfloat16 else torch.int64)
    out = da.decode_attention(q, k, v, kv_len, scale=0.3, num_splits=splits)
    assert out.shape == q.shape and out.dtype == dtype
    ref = da.decode_attention_reference(q, k, v, kv_len, scale=0.3)
    assert rel_rms(out, ref) < TOL[dtype], rel_rms(out, ref)
    # SDPA is undefined (NaN) for a row without keys; the kernel gives zeros there
    rows = torch.ones(batch, dtype=torch.bool) if kv_len is None else (kv_len.reshape(-1).expand(batch) > 0).cpu()
    expected = sdpa(q, k, v, kv_len, scale=0.3)
    assert rel_rms(out[rows], expected[rows]) < TOL[dtype], rel_rms(out[rows], expected[rows])
    assert torch.isfinite(out).all()
    assert not out[~rows].any()


def test_automatic_splits_leave_splits_past_the_valid_keys_empty(monkeypatch):
    # a 64-key minimum per split, so that a 300-key buffer gets the automatic 4 splits (4 SMs on a CPU, 4 programs
    # each) in the interpreter; row 1's 70 keys fill two of them
    from hf_effattn import decode_attention as flat_copy

    # the op runs the copy that registered it first: both read the patched minimum
    for module in (da, flat_copy):
        monkeypatch.setattr(module, "MIN_SPLIT_KEYS", 64)
    if DEVICE == "cpu":
        assert da.num_splits_for(300, 2, 2, torch.device("cpu")) == 4
    q, k, v = inputs(2, 4, 2, 300, 64)
    kv_len = torch.tensor([300, 70], device=DEVICE)
    out = da.decode_attention(q, k, v, kv_len)
    assert rel_rms(out, sdpa(q, k, v, kv_len)) < TOL[torch.float32]


def test_split_count_fills_the_gpu_with_at_least_the_minimum_keys():
    cpu = torch.device("cpu")
    # 4 SMs x 4 programs = 16 programs wanted
    assert da.num_splits_for(131072, 1, 2, cpu) == 8
    assert da.num_splits_for(131072, 16, 8, cpu) == 1
    # too short for a second split of 256 keys
    assert da.num_splits_for(511, 1, 1, cpu) == 1
    assert da.num_splits_for(1, 1, 1, cpu) == 1


def test_inputs_are_checked():
    q, k, v = inputs(2, 4, 2, 8, 16)
    with pytest.raises(ValueError, match="one query token"):
        da.decode_attention(q.expand(2, 4, 2, 16), k, v)
    with pytest.raises(ValueError, match="multiple of the 3"):
        da.decode_attention(q, k[:, :1].expand(2, 3, 8, 16), v[:, :1].expand(2, 3, 8, 16))
    with pytest.raises(ValueError, match="kv_len"):
        da.decode_attention(q, k, v, torch.tensor([1.0, 2.0], device=DEVICE))
    with pytest.raises(ValueError, match="share a dtype"):
        da.decode_attention(q, k.half(), v.half())


def test_fake_implementation_gives_the_output_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(3, 8, 1, 96, dtype=torch.bfloat16)
        k = torch.empty(3, 2, 1000, 96, dtype=torch.bfloat16)
        o = torch.ops.hf_effattn.decode_attention(q, k, k, torch.empty(3, dtype=torch.int64), 0.1, 0)
    assert (o.shape, o.dtype) == ((3, 8, 1, 96), torch.bfloat16)


def test_op_passes_opcheck():
    q, k, v = inputs(2, 4, 2, 40, 16)
    kv_len = torch.tensor([40, 9], device=DEVICE)
    torch.library.opcheck(torch.ops.hf_effattn.decode_attention, (q, k, v, kv_len, 0.3, 2))


def test_op_traces_into_one_graph(monkeypatch):
    """A compiled function holds the op as one node (the fake implementation traces it), with no graph break, also
    when the compiled call is the first to ask the model's mixer for it (dynamo traces the import)."""
    monkeypatch.setattr(mixer_full, "DECODE_OPS_OVERRIDE", "triton")
    monkeypatch.setattr(mixer_full, "DECODE_OPS", TritonOps("full-attention decode", mixer_full._import_decode_op))
    q, k, v = inputs(2, 4, 2, 40, 16)
    kv_len = torch.tensor(33, device=DEVICE)

    def step(q, k, v, kv_len):
        return mixer_full.decode_op(q)(q, k, v, kv_len, 0.3) * 2

    explanation = torch._dynamo.explain(step)(q, k, v, kv_len)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    monkeypatch.setattr(mixer_full, "DECODE_OPS", TritonOps("full-attention decode", mixer_full._import_decode_op))
    out = torch.compile(step, backend=backend, fullgraph=True)(q, k, v, kv_len)
    targets = [str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert targets.count("hf_effattn.decode_attention") == 1, targets
    assert rel_rms(out, 2 * sdpa(q, k, v, kv_len, scale=0.3)) < TOL[torch.float32]
