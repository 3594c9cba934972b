"""`block_topk`: the reference op against its literal definition, cached decode against the full forward, padded
batches, beam search, options, conversion from a teacher and remote-code checkpoints (torch reference path)."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from test_cache import prefilled
from test_remote_code import LOADER
from transformers import AutoModelForCausalLM, DynamicCache

from hf_effattn import EffAttnConfig, EffAttnForCausalLM
from hf_effattn.checkpoint import REMOTE_CODE_FILES, save_checkpoint
from hf_effattn.conversion.weight_map import effattn_from_teacher
from hf_effattn.mixer_block_topk import BlockTopkCacheLayer
from hf_effattn.ops_reference import block_topk_attention, block_topk_cached_attention, block_topk_select
from tests.numerics import max_rel_diff, rel_rms

pytestmark = pytest.mark.usefixtures("torch_single_thread")

# small blocks so that short inputs have many blocks and a real choice among them
OPTIONS = {"block_topk": {"block_size": 16, "top_k": 2}}
DECODE_TOL = 2e-3


def qkv(batch, seq_len, heads=4, kv_heads=2, head_dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, seq_len, heads, head_dim, generator=gen),
        torch.randn(batch, seq_len, kv_heads, head_dim, generator=gen),
        torch.randn(batch, seq_len, kv_heads, head_dim, generator=gen),
    )


def literal_selection(q, k, block_size, top_k, keep_first_block):
    """`[NQ, Hkv]` lists of selected blocks of one sequence, written out loop by loop."""
    seq_len, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    num_blocks = -(-seq_len // block_size)
    chosen = []
    for i in range(num_blocks):
        row = []
        for h in range(kv_heads):
            if i == 0:
                row.append([])
                continue
            prev = q[(i - 1) * block_size : i * block_size, h * groups : (h + 1) * groups].double()
            q_mean = prev.reshape(-1, head_dim).mean(0)
            scored = []
            for j in range(1 if keep_first_block else 0, i):
                k_mean = k[j * block_size : (j + 1) * block_size, h].double().mean(0)
                scored.append((-(q_mean @ k_mean).item(), j))
            row.append(sorted(j for _, j in sorted(scored)[:top_k]))
        chosen.append(row)
    return chosen


@pytest.mark.parametrize("keep_first_block", [True, False], ids=["first", "no-first"])
@pytest.mark.parametrize(("seq_len", "block_size", "top_k"), [(77, 8, 2), (64, 16, 1), (5, 4, 3)])
def test_selection_matches_its_definition(seq_len, block_size, top_k, keep_first_block):
    q, k, _ = qkv(2, seq_len)
    selected = block_topk_select(q, k, block_size, top_k, keep_first_block)
    assert selected.shape == (2, -(-seq_len // block_size), 2, top_k) and selected.dtype == torch.int32
    for row in range(2):
        expected = literal_selection(q[row], k[row], block_size, top_k, keep_first_block)
        actual = [[[j for j in heads if j >= 0] for heads in block] for block in selected[row].tolist()]
        assert actual == expected


@pytest.mark.parametrize(
    ("batch", "seq_len", "heads", "kv_heads", "block_size", "top_k", "keep_first_block", "cu_seqlens"),
    [
        (2, 77, 4, 2, 8, 2, True, None),
        (1, 100, 6, 2, 16, 1, False, None),
        (1, 63, 4, 4, 8, 3, True, None),
        (1, 90, 4, 1, 8, 2, True, [0, 1, 9, 40, 40, 90]),
    ],
    ids=["T77-G2", "T100-G3-no-first", "T63-MHA", "varlen"],
)
def test_reference_matches_naive_masked_softmax(
    batch, seq_len, heads, kv_heads, block_size, top_k, keep_first_block, cu_seqlens
):
    q, k, v = qkv(batch, seq_len, heads, kv_heads)
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens)
    options = {"block_size": block_size, "top_k": top_k, "keep_first_block": keep_first_block, "cu_seqlens": cu}
    blockwise = block_topk_attention(q, k, v, max_blocks_per_step=3, **options)
    naive = block_topk_attention(q, k, v, naive=True, **options)
    assert blockwise.shape == q.shape
    assert rel_rms(blockwise, naive) < 1e-6
    if cu is not None:
        # each packed sequence is attended to on its own
        alone = block_topk_attention(q[:, 9:40], k[:, 9:40], v[:, 9:40], block_size, top_k, keep_first_block)
        assert rel_rms(blockwise[:, 9:40], alone) < 1e-6


def test_top_k_covering_every_block_is_causal_attention():
    q, k, v = qkv(2, 70, 4, 2)
    o = block_topk_attention(q, k, v, block_size=8, top_k=9)
    heads = [x.transpose(1, 2) for x in (q, k.repeat_interleave(2, 2), v.repeat_interleave(2, 2))]
    expected = F.scaled_dot_product_attention(*heads, is_causal=True).transpose(1, 2)
    assert rel_rms(o, expected) < 1e-6
    # with fewer blocks than the sequence has, queries miss some keys
    assert rel_rms(block_topk_attention(q, k, v, block_size=8, top_k=2), expected) > 1e-2


@pytest.mark.parametrize(
    "steps",
    [[70], [9] + [1] * 61, [1, 5, 3] + [1] * 7 + [54], [20, 33, 17]],
    ids=["prefill", "decode", "mixed", "chunks"],
)
def test_cached_attention_matches_prefill(steps):
    q, k, v = qkv(2, 70, 4, 2)
    expected = block_topk_attention(q, k, v, block_size=8, top_k=2)
    state, outputs, start = None, [], 0
    first_real = torch.zeros(2, dtype=torch.long)
    for size in steps:
        stop = start + size
        o, state = block_topk_cached_attention(q[:, start:stop], k[:, :stop], v[:, :stop], state, first_real, 8, 2)
        outputs.append(o)
        start = stop
    assert rel_rms(torch.cat(outputs, dim=1), expected) < 1e-6


def test_cached_attention_ignores_left_padding():
    q, k, v = qkv(1, 50, 4, 2)
    pad = 7
    padded = [torch.cat([torch.randn(1, pad, *x.shape[2:]), x], dim=1) for x in (q, k, v)]
    first_real = torch.tensor([pad])
    o, state = block_topk_cached_attention(
        padded[0][:, :20], padded[1][:, :20], padded[2][:, :20], None, first_real, 8, 2
    )
    outputs = [o]
    for t in range(20, 50 + pad):
        o, state = block_topk_cached_attention(
            padded[0][:, t : t + 1], padded[1][:, : t + 1], padded[2][:, : t + 1], state, first_real, 8, 2
        )
        outputs.append(o)
    o = torch.cat(outputs, dim=1)
    assert o[:, :pad].abs().max() == 0
    assert rel_rms(o[:, pad:], block_topk_attention(q, k, v, 8, 2)) < 1e-6


def build_model(tiny_config, mixer_types, options=OPTIONS, seed=1234):
    config = tiny_config(mixer_types, options)
    torch.manual_seed(seed)
    return EffAttnForCausalLM(config).eval()


def random_ids(batch, length, seed=0):
    return torch.randint(1, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


LAYOUTS = {"block_topk": ["block_topk", "full", "block_topk"], "hybrid": ["gdn", "block_topk", "sliding", "full"]}
SCHEDULES = {"prefill9-decode": (60, [9] + [1] * 51), "prefill70-chunks": (90, [70, 4] + [1] * 16)}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cached_decode_matches_full_forward(tiny_config, layout, schedule):
    model = build_model(tiny_config, LAYOUTS[layout])
    length, steps = SCHEDULES[schedule]
    input_ids = random_ids(2, length)
    with torch.no_grad():
        expected = model(input_ids, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        logits, start = [], 0
        for size in steps:
            logits.append(model(input_ids[:, start : start + size], past_key_values=cache, use_cache=True).logits)
            start += size
    assert max_rel_diff(torch.cat(logits, dim=1), expected) <= DECODE_TOL


def test_the_selection_matters(tiny_config):
    """Guards the tests above: with few selected blocks the model is far from its all-blocks version."""
    input_ids = random_ids(2, 90)
    sparse = build_model(tiny_config, LAYOUTS["block_topk"])
    dense = build_model(tiny_config, LAYOUTS["block_topk"], {"block_topk": {"block_size": 16, "top_k": 8}})
    with torch.no_grad():
        assert max_rel_diff(sparse(input_ids).logits, dense(input_ids).logits) > 20 * DECODE_TOL


def left_pad(prompts, pad_id=0):
    length = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, length - len(prompt) :] = prompt
        attention_mask[row, length - len(prompt) :] = 1
    return input_ids, attention_mask


def test_left_padded_generate_matches_each_prompt_alone(tiny_config):
    model = build_model(tiny_config, LAYOUTS["block_topk"])
    prompts = [random_ids(1, length, seed=length)[0] for length in (5, 40, 3, 70)]
    input_ids, attention_mask = left_pad(prompts)
    new_tokens = 20
    kwargs = {"do_sample": False, "max_new_tokens": new_tokens, "return_dict_in_generate": True, "output_scores": True}
    batched = model.generate(input_ids, attention_mask=attention_mask, **kwargs)
    batched_scores = torch.stack(batched.scores, dim=1)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long), **kwargs)
        assert torch.equal(batched.sequences[row, -new_tokens:], alone.sequences[0, len(prompt) :]), row
        assert max_rel_diff(batched_scores[row], torch.stack(alone.scores, dim=1)[0]) <= DECODE_TOL, row
    assert len({tuple(seq[-new_tokens:].tolist()) for seq in batched.sequences}) > 1


def test_beam_search_with_cache_matches_without(tiny_config):
    # the block means follow the cache's beam reordering
    model = build_model(tiny_config, LAYOUTS["block_topk"])
    prompt = random_ids(1, 45, seed=3)
    kwargs = {"attention_mask": torch.ones_like(prompt), "num_beams": 3, "do_sample": False, "max_new_tokens": 12}
    assert torch.equal(model.generate(prompt, **kwargs), model.generate(prompt, use_cache=False, **kwargs))


def test_reset_clears_the_block_means_with_the_keys(tiny_config):
    model = build_model(tiny_config, LAYOUTS["block_topk"])
    with torch.no_grad():
        cache = prefilled(model, random_ids(2, 50, seed=30))
    layer = cache.layers[0]
    assert isinstance(layer, BlockTopkCacheLayer)
    assert layer.block_means is not None and layer.block_means["kbar"].shape[0] == 2
    cache.reset()
    assert layer.get_seq_length() == 0 and layer.block_means is None


def test_a_cache_with_block_means_refuses_to_be_cropped(tiny_config):
    model = build_model(tiny_config, LAYOUTS["block_topk"])
    with torch.no_grad():
        cache = prefilled(model, random_ids(1, 20))
    assert not cache.is_croppable
    cache.crop(0)
    with pytest.raises(RuntimeError, match="cannot be cropped"):
        cache.crop(-3)


def test_a_cache_without_block_means_is_refused(tiny_config):
    model = build_model(tiny_config, ["block_topk"])
    cache = DynamicCache(config=model.config)
    cache.update(torch.zeros(1, 2, 5, 16), torch.zeros(1, 2, 5, 16), 0)
    with pytest.raises(ValueError, match="block means"):
        model(random_ids(1, 1), past_key_values=cache, use_cache=True)


def test_training_gives_finite_gradients(tiny_config):
    model = build_model(tiny_config, LAYOUTS["hybrid"]).train()
    input_ids = random_ids(2, 50, seed=7)
    model(input_ids, labels=input_ids).loss.backward()
    attn = model.model.layers[1].self_attn
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        grad = getattr(attn, name).weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"block_size": 48}, r"\['block_size'\] = 48 is invalid: expected one of \(16, 32, 64, 128, 256\)"),
        ({"block_size": 16.0}, r"\['block_size'\] = 16.0 is invalid"),
        ({"top_k": 0}, r"\['top_k'\] = 0 is invalid: expected a positive integer"),
        ({"top_k": True}, r"\['top_k'\] = True is invalid"),
        ({"keep_first_block": 1}, r"\['keep_first_block'\] = 1 is invalid: expected true or false"),
        ({"window": 64}, r"unknown option 'window'; allowed options: \['block_size', 'keep_first_block', 'top_k'\]"),
    ],
    ids=["block-size", "block-size-float", "top-k-zero", "top-k-bool", "keep-first-int", "unknown-option"],
)
def test_bad_options_give_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        EffAttnConfig(
            hidden_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            mixer_types=["block_topk", "full"],
            mixer_options={"block_topk": options},
        )


def test_config_derives_a_full_kv_cache_layer():
    config = EffAttnConfig(
        hidden_size=64, num_attention_heads=4, num_hidden_layers=2, mixer_types=["block_topk", "gdn"]
    )
    assert config.layer_types == ["full_attention", "linear_attention"]
    assert config.mixer_config(0) == {"block_size": 64, "top_k": 16, "keep_first_block": True}
    assert config.sliding_window is None


def test_conversion_copies_the_teacher_attention(tiny_teacher):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    input_ids = random_ids(1, 100, seed=5)
    with torch.no_grad():
        expected = teacher(input_ids).logits
    for top_k, close in ((8, True), (1, False)):
        options = {"block_topk": {"block_size": 16, "top_k": top_k}}
        student, new_parameters = effattn_from_teacher(teacher, mixer_types=["block_topk"] * 4, mixer_options=options)
        assert new_parameters == []
        attn, teacher_attn = student.model.layers[2].self_attn, teacher.model.layers[2].self_attn
        assert torch.equal(attn.q_proj.weight, teacher_attn.q_proj.weight)
        assert torch.equal(attn.o_proj.weight, teacher_attn.o_proj.weight)
        with torch.no_grad():
            error = rel_rms(student(input_ids).logits, expected)
        # every earlier block fits in top_k = 8 (7 blocks): the teacher exactly
        assert (error < 1e-5) == close, (top_k, error)


def test_checkpoint_loads_without_the_package(tiny_config, tmp_path):
    model = build_model(tiny_config, ["block_topk", "gdn", "block_topk"])
    folder = save_checkpoint(model, tmp_path / "ckpt")
    for name in ("mixer_block_topk.py", "block_topk.py", "block_topk_kernels.py"):
        assert name in REMOTE_CODE_FILES and (folder / name).is_file(), name
    ids = random_ids(2, 75, seed=9)
    torch.save(ids, tmp_path / "ids.pt")
    script = tmp_path / "load.py"
    script.write_text(LOADER)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, str(script), str(folder), str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        expected = model(ids).logits
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)


def test_cached_steps_refuse_right_padding(tiny_config):
    model = build_model(tiny_config, LAYOUTS["block_topk"])
    input_ids = random_ids(2, 20)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 15:] = 0
    with torch.no_grad():
        # without a cache, any padding runs as packed sequences
        assert torch.isfinite(model(input_ids, attention_mask=attention_mask, use_cache=False).logits).all()
        with pytest.raises(ValueError, match="only pad on the left"):
            model(input_ids, attention_mask=attention_mask, past_key_values=DynamicCache(config=model.config))
