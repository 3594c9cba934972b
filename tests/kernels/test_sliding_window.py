"""The Triton sliding-window attention against the fp64 naive op (output and every gradient), the decode kernel
against the same, and the `sliding` mixer on the kernels against the mixer on the torch reference.

On a machine without a GPU these run through Triton's interpreter, so the shapes are small; the interpreter's tiles
(`CPU_TILES`: 32 x 16 forward, 16 x 32 for dk/dv) make these lengths and windows cross every phase of the kernels.
`scripts/sliding_window_gpu.py` checks full sizes against FlexAttention on a GPU.
"""

import pytest
import torch
from transformers import DynamicCache

from hf_effattn import EffAttnForCausalLM, mixer_sliding
from hf_effattn.mixer_sliding import SlidingWindowAttention
from hf_effattn.ops_reference import sliding_window_attention as reference_op
from tests.numerics import rel_rms

kernels = pytest.importorskip("hf_effattn.kernels")
ops = pytest.importorskip("hf_effattn.kernels.sliding_window")
testing = pytest.importorskip("hf_effattn.kernels.testing")

pytestmark = pytest.mark.usefixtures("torch_single_thread")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the interpreter computes fp32 dots exactly; GPUs run them in tf32; 16-bit inputs round p and ds to 16 bits
TOLERANCE = {torch.float32: (1e-4, 1e-4) if DEVICE == "cpu" else (5e-3, 1e-2), torch.bfloat16: (5e-3, 1e-2)}
# (logits, parameter gradients) of the fp32 model on the kernels against the model on the reference: the same tf32
# rounding on GPUs, through the rest of the model
MIXER_TOLERANCE = (1e-4, 1e-3) if DEVICE == "cpu" else (5e-3, 1e-2)


def attention_inputs(batch, seq_len, heads, kv_heads, head_dim, dtype, sink_logits, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_len, heads, head_dim, generator=gen)
    k = torch.randn(batch, seq_len, kv_heads, head_dim, generator=gen)
    v = torch.randn(batch, seq_len, kv_heads, head_dim, generator=gen)
    z = torch.randn(heads, generator=gen) if sink_logits else None
    do = torch.randn(batch, seq_len, heads, head_dim, generator=gen)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    return [None if x is None else x.to(DEVICE) for x in (q, k, v, z, do)]


# (B, T, H, HKV, D, window, sink tokens, sink logits, dtype, cu_seqlens, key_bounds)
CASES = [
    ("T1", (2, 1, 2, 1, 16, 4, 2, True, torch.float32, None, None)),
    ("T63-GQA", (2, 63, 4, 2, 16, 20, 0, False, torch.float32, None, None)),
    ("T130-sinks-logits", (1, 130, 2, 1, 32, 37, 4, True, torch.float32, None, None)),
    ("window>T", (1, 63, 2, 2, 16, 100, 2, False, torch.float32, None, None)),
    ("window<tile-D24", (1, 40, 2, 1, 24, 5, 3, True, torch.float32, None, None)),
    ("varlen-1-64-1-64", (1, 130, 2, 1, 16, 17, 2, True, torch.float32, [0, 1, 65, 66, 130], None)),
    ("padding-left-right", (2, 70, 2, 1, 16, 19, 3, True, torch.float32, None, [[5, 70], [0, 50]])),
    ("T100-bf16", (1, 100, 2, 1, 32, 33, 2, True, torch.bfloat16, None, None)),
    # windows wider than a query tile plus a key tile: every kernel also runs fully visible tiles mid-sequence
    ("T200-window90-GQA-bf16", (2, 200, 4, 2, 32, 90, 3, True, torch.bfloat16, None, None)),
    ("varlen-window70", (1, 260, 2, 1, 16, 70, 2, False, torch.float32, [0, 1, 150, 260], None)),
    # a group of 4 heads: the forward and dq tiles hold 8 queries x 4 heads
    ("T150-G4-sinks-logits-padding", (2, 150, 8, 2, 32, 60, 2, True, torch.float32, None, [[3, 150], [0, 141]])),
]


def check_against_naive(
    batch, seq_len, heads, kv_heads, head_dim, window, num_sinks, sink_logits, dtype, cu_seqlens, key_bounds
):
    q, k, v, z, do = attention_inputs(batch, seq_len, heads, kv_heads, head_dim, dtype, sink_logits)
    cu_seqlens = None if cu_seqlens is None else torch.tensor(cu_seqlens, device=DEVICE)
    key_bounds = None if key_bounds is None else torch.tensor(key_bounds, device=DEVICE)
    tri = [None if x is None else x.clone().requires_grad_() for x in (q, k, v, z)]
    ref = [None if x is None else x.detach().double().requires_grad_() for x in (q, k, v, z)]
    o = kernels.sliding_window_attention(
        *tri[:3], window, num_sinks, tri[3], cu_seqlens=cu_seqlens, key_bounds=key_bounds
    )
    o_ref = testing.naive_sliding_window_attention(
        *ref[:3], window, num_sinks, ref[3], cu_seqlens=cu_seqlens, key_bounds=key_bounds
    )
    assert o.dtype == dtype and o.shape == q.shape
    (o.float() * do).sum().backward()
    (o_ref * do.double()).sum().backward()
    errors = {"o": rel_rms(o, o_ref)}
    for name, a, b in zip(("dq", "dk", "dv", "dsink"), tri, ref, strict=True):
        if a is not None:
            assert a.grad is not None and a.grad.dtype == a.dtype, name
            errors[name] = rel_rms(a.grad, b.grad)
    output_tol, grad_tol = TOLERANCE[dtype]
    bad = {name: e for name, e in errors.items() if not e <= (output_tol if name == "o" else grad_tol)}
    assert not bad, f"{bad} (all errors: {errors})"


@pytest.mark.parametrize(
    "batch, seq_len, heads, kv_heads, head_dim, window, num_sinks, sink_logits, dtype, cu_seqlens, key_bounds",
    [pytest.param(*case, id=name) for name, case in CASES],
)
def test_matches_naive(
    batch, seq_len, heads, kv_heads, head_dim, window, num_sinks, sink_logits, dtype, cu_seqlens, key_bounds
):
    check_against_naive(
        batch, seq_len, heads, kv_heads, head_dim, window, num_sinks, sink_logits, dtype, cu_seqlens, key_bounds
    )


def some_cases(*names):
    found = [pytest.param(case, id=name) for name, case in CASES if name in names]
    assert len(found) == len(names), f"unknown cases among {names}"
    return found


@pytest.mark.parametrize(
    "case", some_cases("window>T", "T200-window90-GQA-bf16", "varlen-window70", "T150-G4-sinks-logits-padding")
)
def test_matches_naive_through_tensor_descriptors(case, monkeypatch):
    """Tensor-descriptor (TMA) loads of the window's tiles, forced on in all three kernels (on Hopper GPUs they are
    on by default), read unmasked tiles where the pointer loads mask keys (or queries) of padding, of a neighbouring
    sequence or past the end: each kernel builds its descriptors, and the results match the naive op."""
    monkeypatch.setattr(ops, "USE_TENSOR_DESCRIPTORS", True)
    built = []
    from_tensor = ops.TensorDescriptor.from_tensor
    monkeypatch.setattr(
        ops.TensorDescriptor,
        "from_tensor",
        staticmethod(lambda *args, **kw: built.append(args[1]) or from_tensor(*args, **kw)),
    )
    check_against_naive(*case)
    # k and v in `BN`-key tiles (forward, dq), q and do in `BM`-query tiles (dk/dv)
    head_dim, dtype = case[4], case[8]
    fwd, dq, dkdv = (ops._tiles(kind, head_dim, dtype, torch.device(DEVICE)) for kind in ("fwd", "dq", "dkdv"))
    rows = [fwd["BN"]] * 2 + [dq["BN"]] * 2 + [dkdv["BM"]] * 2
    assert built == [[n, head_dim] for n in rows]


@pytest.mark.parametrize("descriptors", [True, False])
@pytest.mark.parametrize("fill", [float("nan"), float("inf")])
# the interpreter's numpy products warn on the padding's NaN/inf scores, which the score mask then replaces
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_padding_keys_holding_nan_or_inf_change_nothing(fill, descriptors, monkeypatch):
    """Keys and values of padding (outside each row's key bounds) may hold anything, NaN and inf included: no query
    sees them, and the kernels give bit for bit the results of finite padding, through the masked pointer loads and
    through tensor-descriptor loads, which read whole tiles (the op zeros the padding first). Row 0 has right
    padding, row 1 left padding."""
    monkeypatch.setattr(ops, "USE_TENSOR_DESCRIPTORS", descriptors)
    q, k, v, z, do = attention_inputs(2, 150, 8, 2, 32, torch.float32, True)
    key_bounds = torch.tensor([[0, 131], [9, 150]], device=DEVICE)
    results = []
    for poison in (False, True):
        k_in, v_in = k.clone(), v.clone()
        if poison:
            for row, (first, end) in enumerate(key_bounds.tolist()):
                for x in (k_in, v_in):
                    x[row, :first] = fill
                    x[row, end:] = fill
        leaves = [x.clone().requires_grad_() for x in (q, k_in, v_in, z)]
        o = kernels.sliding_window_attention(*leaves[:3], 60, 2, leaves[3], key_bounds=key_bounds)
        (o * do).sum().backward()
        results.append([o.detach()] + [x.grad for x in leaves])
    for name, clean, poisoned in zip(("o", "dq", "dk", "dv", "dsink"), *results, strict=True):
        assert torch.isfinite(poisoned).all(), name
        assert torch.equal(clean, poisoned), name


@pytest.mark.parametrize("case", some_cases("T63-GQA", "T200-window90-GQA-bf16", "T150-G4-sinks-logits-padding"))
def test_matches_naive_with_one_head_per_tile(case, monkeypatch):
    """GQA layers run with the group's heads packed into each forward and dq tile (`test_matches_naive`); groups that
    cannot be packed (not a power of two, or too large for a tile) run one head per tile, as here."""
    monkeypatch.setattr(ops, "PACK_GQA_HEADS", False)
    heads, kv_heads = case[2], case[3]
    assert ops._pack(heads, kv_heads, 32) == 1
    check_against_naive(*case)


@pytest.mark.parametrize("case", some_cases("varlen-1-64-1-64", "T150-G4-sinks-logits-padding"))
def test_matches_naive_with_the_other_block_order(case, monkeypatch):
    """The forward and dq kernels launch their query blocks in either order (`HEAVY_BLOCKS_FIRST`): a program finds
    its block, and dq's sink partials their slot, from the block index alone."""
    monkeypatch.setattr(ops, "HEAVY_BLOCKS_FIRST", {kind: not last for kind, last in ops.HEAVY_BLOCKS_FIRST.items()})
    check_against_naive(*case)


@pytest.mark.parametrize("across", [True, False])
@pytest.mark.parametrize("case", some_cases("T200-window90-GQA-bf16", "T150-G4-sinks-logits-padding"))
def test_matches_naive_in_either_block_schedule(case, across, monkeypatch):
    """Every kernel runs with its blocks row by row, or with the blocks that see a whole window row by row and the
    shorter ones across the rows (`SHORT_BLOCKS_ACROSS_ROWS`, on by default for dk/dv): each program takes one
    (block, row), and none is left out."""
    monkeypatch.setattr(ops, "SHORT_BLOCKS_ACROSS_ROWS", dict.fromkeys(ops.SHORT_BLOCKS_ACROSS_ROWS, across))
    heads, window = case[2], case[5]
    fwd = ops._tiles("fwd", case[4], case[8], torch.device(DEVICE))
    dkdv = ops._tiles("dkdv", case[4], case[8], torch.device(DEVICE))
    if across:
        # these cases have both kinds of blocks, some that see a whole window and some shorter, so the launch mixes
        # the two orders
        for kind, block in (("fwd", fwd["BM"] // ops._pack(heads, case[3], fwd["BM"])), ("dkdv", dkdv["BN"])):
            count = -(-case[1] // block)
            assert 0 < ops._full_blocks(kind, count, block, case[1], window, False) < count
    check_against_naive(*case)


def jumping_scores(dtype, seed=3):
    """(q, k, v, do) `[1, 160, 2 or 1, 32]` whose head-0 scores carry an offset per key: flat, +6 (log2 units) at
    key 30, +17 at 60, back to +6 at 75, +29 at 100, +150 at 140 (past fp32's range as p = 2^150 against a stale
    max). q and k hold bf16 values, so that a GPU's tf32 products of the fp32 inputs are exact too."""
    gen = torch.Generator().manual_seed(seed)
    seq_len, head_dim = 160, 32
    direction = torch.randn(head_dim, generator=gen)
    q = torch.randn(1, seq_len, 2, head_dim, generator=gen) * 0.3
    # head 0 follows the jumps; head 1 is orthogonal to them, so the two heads packed in one tile disagree on when
    # the max moves
    q[:, :, 1] -= (q[:, :, 1] @ direction)[..., None] * direction / direction.square().sum()
    q[:, :, 0] += direction
    bump = torch.zeros(seq_len)
    for start, rise in ((30, 6.0), (60, 17.0), (75, 6.0), (100, 29.0), (140, 150.0)):
        bump[start:] = rise
    # log2 units of the score per unit of `direction` in k
    unit = head_dim**-0.5 * direction.square().sum() * 1.4426950408889634
    k = torch.randn(1, seq_len, 1, head_dim, generator=gen) * 0.3 + (bump / unit)[None, :, None, None] * direction
    v = torch.randn(1, seq_len, 1, head_dim, generator=gen)
    do = torch.randn(1, seq_len, 2, head_dim, generator=gen)
    return [x.to(torch.bfloat16).to(dtype).to(DEVICE) for x in (q, k, v, do)]


@pytest.mark.parametrize("lazy", [True, False])
def test_matches_naive_when_the_score_max_jumps(lazy, monkeypatch):
    """The forward moves its reference max only when a tile's scores exceed it by more than `RESCALE_SLACK` (2^8):
    scores that jump by 17, 29 and 150 (forcing a rescale) and rise by 6 (within the slack, so p runs up to 2^6
    against the old max) give the naive op's output and gradients, with the lazy rescale and without."""
    monkeypatch.setattr(ops, "LAZY_RESCALE", lazy)
    q, k, v, do = jumping_scores(torch.float32)
    tri = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = [x.double().requires_grad_() for x in (q, k, v)]
    o = kernels.sliding_window_attention(*tri, 120, 2)
    o_ref = testing.naive_sliding_window_attention(*ref, 120, 2)
    (o * do).sum().backward()
    (o_ref * do.double()).sum().backward()
    output_tol, grad_tol = TOLERANCE[torch.float32]
    assert rel_rms(o, o_ref) <= output_tol
    for a, b in zip(tri, ref, strict=True):
        assert rel_rms(a.grad, b.grad) <= grad_tol


def test_lazy_rescale_in_bf16(monkeypatch):
    """With bf16 inputs, p is rounded to bf16 whatever its scale: the lazy rescale (p up to 2^8 times the row's share)
    gives the output of the exact one. (Against the fp64 naive op these nearly one-hot rows lose about 2% of their
    gradients to the 16-bit p and ds, with either rescale.)"""
    q, k, v, _do = jumping_scores(torch.bfloat16)
    outputs = []
    for lazy in (True, False):
        monkeypatch.setattr(ops, "LAZY_RESCALE", lazy)
        outputs.append(kernels.sliding_window_attention(q, k, v, 120, 2))
    o_ref = testing.naive_sliding_window_attention(q.double(), k.double(), v.double(), 120, 2)
    assert rel_rms(outputs[0], o_ref) <= TOLERANCE[torch.bfloat16][0]
    # both round o to bf16 (2^-9 relative)
    assert rel_rms(outputs[0], outputs[1]) <= TOLERANCE[torch.bfloat16][0]


def test_heads_packed_per_tile():
    assert ops._pack(32, 8, 128) == 4 and ops._pack(8, 8, 128) == 1
    # a tile keeps at least 8 queries; groups that are not powers of two are not packed
    assert ops._pack(64, 1, 128) == 1 and ops._pack(16, 1, 128) == 16 and ops._pack(12, 4, 128) == 1


def test_tensor_descriptors_need_a_power_of_two_head_dim(monkeypatch):
    monkeypatch.setattr(ops, "USE_TENSOR_DESCRIPTORS", True)
    x = torch.zeros(1, 4, 2, 24, device=DEVICE)
    assert not ops._use_descriptors("dkdv", x, 24) and ops._use_descriptors("dkdv", x, 32)
    # an empty batch has nothing to describe
    assert not ops._use_descriptors("dkdv", x[:0], 32)
    monkeypatch.setattr(ops, "USE_TENSOR_DESCRIPTORS", None)
    # by default: the kernels chosen for Hopper, on Hopper and later GPUs only
    hopper = DEVICE == "cuda" and torch.cuda.get_device_capability()[0] >= 9
    for kind, chosen in ops.TENSOR_DESCRIPTOR_KERNELS.items():
        assert ops._use_descriptors(kind, x, 32) == (hopper and chosen)


@pytest.mark.gpu
def test_matches_naive_full_size():
    check_against_naive(2, 1000, 8, 2, 128, 256, 4, True, torch.bfloat16, None, None)
    check_against_naive(1, 1000, 4, 1, 64, 100, 4, True, torch.bfloat16, [0, 1, 15, 100, 300, 301, 1000], None)


def test_naive_matches_the_mixer_reference():
    """The naive op and `ops_reference.sliding_window_attention` (what the mixer runs) share one definition:
    padding as the key validity, sinks as the first real tokens."""
    q, k, v, z, _ = attention_inputs(2, 45, 4, 2, 16, torch.float64, sink_logits=True)
    window, num_sinks = 11, 3
    key_bounds = torch.tensor([[4, 45], [0, 45]], device=DEVICE)
    index = torch.arange(45, device=DEVICE)
    sink_index = key_bounds[:, :1] + torch.arange(num_sinks, device=DEVICE)
    gather = sink_index[..., None, None].expand(-1, -1, 2, 16)
    expected = reference_op(
        q,
        k,
        v,
        window,
        key_valid=index >= key_bounds[:, :1],
        sink_k=k.gather(1, gather),
        sink_v=v.gather(1, gather),
        sink_index=sink_index,
        sink_logits=z,
        naive=True,
    )
    actual = testing.naive_sliding_window_attention(q, k, v, window, num_sinks, z, key_bounds=key_bounds)
    assert rel_rms(actual, expected) < 1e-6


@pytest.mark.parametrize("num_queries, first_index", [(1, None), (3, [0, 6])], ids=["one-token", "three-left-padded"])
def test_decode_matches_naive(num_queries, first_index):
    """Queries at the end of a long sequence against a cache of the last `window` keys (in the transformers cache
    layout) plus the sinks: the same as attending over the whole sequence."""
    seq_len, window, num_sinks = 90, 24, 3
    q, k, v, z, _ = attention_inputs(2, seq_len, 4, 2, 16, torch.float32, sink_logits=True)
    first = torch.tensor(first_index or [0, 0], device=DEVICE)
    key_bounds = torch.stack([first, torch.full_like(first, seq_len)], dim=-1)
    keep = window - 1 + num_queries
    # [B, HKV, keep, D], read through a transposed view
    cache_k = k[:, -keep:].transpose(1, 2).contiguous().transpose(1, 2)
    cache_v = v[:, -keep:].transpose(1, 2).contiguous().transpose(1, 2)
    sink_index = first[:, None] + torch.arange(num_sinks, device=DEVICE)
    gather = sink_index[..., None, None].expand(-1, -1, 2, 16)
    with torch.no_grad():
        o = kernels.sliding_window_decode(
            q[:, -num_queries:],
            cache_k,
            cache_v,
            window,
            seq_len - num_queries,
            k.gather(1, gather),
            v.gather(1, gather),
            sink_index,
            z,
            first_index=None if first_index is None else first,
        )
    o_ref = testing.naive_sliding_window_attention(
        q.double(), k.double(), v.double(), window, num_sinks, z.double(), key_bounds=key_bounds
    )
    assert rel_rms(o, o_ref[:, -num_queries:]) < TOLERANCE[torch.float32][0]


def test_rejects_bad_inputs():
    q, k, v, z, _ = attention_inputs(2, 8, 4, 2, 16, torch.float32, sink_logits=True)
    with pytest.raises(ValueError, match="HKV"):
        kernels.sliding_window_attention(q, k[:, :, :1].expand(-1, -1, 3, -1), v[:, :, :1].expand(-1, -1, 3, -1), 4)
    with pytest.raises(ValueError, match="sink_logits"):
        kernels.sliding_window_attention(q, k, v, 4, sink_logits=z[:2])
    with pytest.raises(ValueError, match="batch size is expected to be 1"):
        kernels.sliding_window_attention(q, k, v, 4, cu_seqlens=torch.tensor([0, 3, 8], device=DEVICE))
    packed = [x[:1] for x in (q, k, v)]
    for bounds in ([1, 9], [0, 5, 3, 8], [0, 7]):
        with pytest.raises(ValueError, match="must rise from 0"):
            kernels.sliding_window_attention(*packed, 4, cu_seqlens=torch.tensor(bounds, device=DEVICE))
    with pytest.raises(ValueError, match="window"):
        kernels.sliding_window_attention(q, k, v, 0)
    with pytest.raises(RuntimeError, match="no backward"):
        kernels.sliding_window_decode(q.requires_grad_(), k, v, 4, 0)


class CountingOps:
    """Wraps the mixer's (prefill, decode) kernel ops and counts their calls."""

    def __init__(self):
        self.calls = {"prefill": 0, "decode": 0}
        prefill_op, decode_op = mixer_sliding.triton_sliding_ops()
        self.ops = (self.counted("prefill", prefill_op), self.counted("decode", decode_op))

    def counted(self, name, op):
        def call(*args, **kwargs):
            self.calls[name] += 1
            return op(*args, **kwargs)

        return call


def build_model(tiny_config):
    torch.manual_seed(0)
    options = {"sliding": {"window": 8, "sink_tokens": 2, "sink_logits": True}}
    model = EffAttnForCausalLM(tiny_config(["sliding", "full", "sliding"], options)).to(DEVICE)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, SlidingWindowAttention):
                module.sinks.normal_(0.0, 1.0)
    return model


def run_with(ops_kind, monkeypatch, fn):
    monkeypatch.setattr(mixer_sliding, "SLIDING_OPS_OVERRIDE", ops_kind)
    counter = CountingOps()
    monkeypatch.setattr(mixer_sliding, "triton_sliding_ops", lambda: counter.ops)
    return fn(), counter.calls


def test_mixer_forward_and_gradients_match_the_reference(tiny_config, monkeypatch):
    model = build_model(tiny_config).train()
    ids = torch.randint(1, 97, (2, 21), device=DEVICE)
    # left padding on one row: the kernel takes it as per-row key bounds
    mask = torch.ones_like(ids)
    mask[1, :4] = 0

    def loss_and_grads():
        model.zero_grad()
        logits = model(ids, attention_mask=mask).logits
        logits.float().pow(2).mean().backward()
        return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    (ref_logits, ref_grads), _ = run_with("reference", monkeypatch, loss_and_grads)
    (logits, grads), calls = run_with("triton", monkeypatch, loss_and_grads)
    assert calls == {"prefill": 2, "decode": 0}
    logits_tol, grad_tol = MIXER_TOLERANCE
    assert rel_rms(logits, ref_logits) < logits_tol, rel_rms(logits, ref_logits)
    assert grads.keys() == ref_grads.keys()
    errors = {name: rel_rms(grad, ref_grads[name]) for name, grad in grads.items()}
    assert all(error < grad_tol for error in errors.values()), errors


def test_mixer_cached_decode_matches_the_reference(tiny_config, monkeypatch):
    model = build_model(tiny_config).eval()
    ids = torch.randint(1, 97, (2, 27), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0

    @torch.no_grad()
    def decode():
        cache = DynamicCache(config=model.config)
        # a prefill, a 4-token chunk, then token-by-token steps past the window (8) and the sinks
        logits, start = [], 0
        for size in [12, 4] + [1] * 11:
            stop = start + size
            out = model(ids[:, start:stop], attention_mask=mask[:, :stop], past_key_values=cache, use_cache=True)
            logits.append(out.logits)
            start = stop
        return torch.cat(logits, dim=1)

    expected, _ = run_with("reference", monkeypatch, decode)
    actual, calls = run_with("triton", monkeypatch, decode)
    assert calls == {"prefill": 2, "decode": 2 * 12}
    assert rel_rms(actual, expected) < MIXER_TOLERANCE[0], rel_rms(actual, expected)


def test_register_cap_reaches_the_launch_of_16_bit_gpu_tiles_only(monkeypatch):
    """The forward's GPU tiles cap registers per thread (two programs per SM); the cap is passed to the launch for
    16-bit inputs on a GPU whose Triton takes it, and dropped for the halved fp32 tiles, the interpreter's tiles and
    Triton builds without the option."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(ops, "takes_register_caps", lambda: True)
    cap = ops.GPU_TILES["fwd"][128][4]
    assert ops._launch_options(ops._tiles("fwd", 128, torch.bfloat16, cuda)) == {
        "num_warps": ops.GPU_TILES["fwd"][128][2],
        "num_stages": ops.GPU_TILES["fwd"][128][3],
        "maxnreg": cap,
    }
    assert ops._tiles("fwd", 128, torch.float32, cuda)["maxnreg"] is None
    assert ops._tiles("dq", 128, torch.bfloat16, cuda)["maxnreg"] is None
    assert "maxnreg" not in ops._launch_options(ops._tiles("fwd", 128, torch.bfloat16, cpu))
    monkeypatch.setattr(ops, "takes_register_caps", lambda: False)
    assert "maxnreg" not in ops._launch_options(ops._tiles("fwd", 128, torch.bfloat16, cuda))
