"""EffAttnForCausalLM end to end on tiny random models: cached decode, batched generation, training, dtypes, saving."""

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from hf_effattn import MIXER_KINDS, EffAttnForCausalLM
from hf_effattn.mixer_sliding import SlidingWindowAttention
from tests.numerics import max_rel_diff, rel_rms

pytestmark = pytest.mark.usefixtures("torch_single_thread")

DECODE_TOL = 2e-3

# a model whose layers use the kind, with one full layer between; plus a hybrid of all six kinds
LAYOUTS = {kind: [kind, "full", kind] for kind in MIXER_KINDS if kind != "full"}
LAYOUTS["full"] = ["full", "full"]
LAYOUTS["hybrid"] = ["gdn", "sliding", "full", "hedgehog", "deltanet", "gla"]
LAYOUT_IDS = list(LAYOUTS)


def build_model(tiny_config, mixer_types, mixer_options=None, seed=1234, **backbone) -> EffAttnForCausalLM:
    config = tiny_config(mixer_types, mixer_options, **backbone)
    torch.manual_seed(seed)
    model = EffAttnForCausalLM(config).eval()
    with torch.no_grad():
        for module in model.modules():
            # sink logits start at zero; random ones make them matter (and must survive save/load)
            if isinstance(module, SlidingWindowAttention) and module.sinks is not None:
                module.sinks.normal_(0.0, 1.0)
    return model


def random_ids(batch, length, seed=0):
    # token 0 is the pad token
    return torch.randint(1, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def cached_logits(model, input_ids, steps):
    """Feeds `input_ids` in pieces of the given sizes through one cache; returns the concatenated logits."""
    assert sum(steps) == input_ids.shape[1]
    cache = DynamicCache(config=model.config)
    logits, start = [], 0
    for size in steps:
        out = model(input_ids[:, start : start + size], past_key_values=cache, use_cache=True)
        assert out.past_key_values is cache
        logits.append(out.logits)
        start += size
    return torch.cat(logits, dim=1)


# (total length, piece sizes): a short prefill on the recurrent path, and a prefill longer than 64 tokens (the chunked
# path of the linear mixers; longer than chunk_size=16 everywhere) followed by a multi-token step and single tokens
DECODE_SCHEDULES = {
    "prefill9-decode": (24, [9] + [1] * 15),
    "prefill1-steps": (20, [1, 5, 3] + [1] * 11),
    "prefill70-chunked": (84, [70, 4] + [1] * 10),
}


@pytest.mark.parametrize("schedule", list(DECODE_SCHEDULES))
@pytest.mark.parametrize("layout", LAYOUT_IDS + ["all-linear"])
def test_cached_decode_matches_full_forward(tiny_config, layout, schedule):
    mixer_types = ["gdn", "deltanet", "gla"] if layout == "all-linear" else LAYOUTS[layout]
    model = build_model(tiny_config, mixer_types)
    length, steps = DECODE_SCHEDULES[schedule]
    input_ids = random_ids(2, length)
    with torch.no_grad():
        expected = model(input_ids, use_cache=False).logits
    actual = cached_logits(model, input_ids, steps)
    assert actual.shape == expected.shape == (2, length, 97)
    diff = max_rel_diff(actual, expected)
    assert diff <= DECODE_TOL, f"cached decode differs from the full forward: max rel diff {diff:.2e}"


@pytest.mark.parametrize("layout", ["sliding", "hedgehog", "gdn", "hybrid"])
def test_decode_tolerance_detects_a_wrong_window(tiny_config, layout):
    """Guards the decode test: a model whose windows are off by one is far outside the tolerance."""
    options = {"sliding": {"window": 9}, "hedgehog": {"window": 7}, "gdn": {"conv_size": 3}}
    model = build_model(tiny_config, LAYOUTS[layout])
    other = build_model(tiny_config, LAYOUTS[layout], options)
    input_ids = random_ids(2, 40)
    with torch.no_grad():
        diff = max_rel_diff(other(input_ids).logits, model(input_ids).logits)
    assert diff > 20 * DECODE_TOL


def left_pad(prompts, pad_id=0):
    length = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, length - len(prompt) :] = prompt
        attention_mask[row, length - len(prompt) :] = 1
    return input_ids, attention_mask


@pytest.mark.parametrize("layout", LAYOUT_IDS + ["all-linear"])
def test_batched_left_padded_generate_matches_each_prompt_alone(tiny_config, layout):
    model = build_model(tiny_config, ["gdn", "deltanet", "gla"] if layout == "all-linear" else LAYOUTS[layout])
    # one prompt longer than 64 tokens: the padded batch prefill takes the chunked path
    prompts = [random_ids(1, length, seed=length)[0] for length in (5, 12, 3, 70)]
    input_ids, attention_mask = left_pad(prompts)
    new_tokens = 10
    kwargs = dict(do_sample=False, max_new_tokens=new_tokens, return_dict_in_generate=True, output_scores=True)
    batched = model.generate(input_ids, attention_mask=attention_mask, **kwargs)
    assert batched.sequences.shape == (4, input_ids.shape[1] + new_tokens)
    assert torch.equal(batched.sequences[:, : input_ids.shape[1]], input_ids)
    batched_scores = torch.stack(batched.scores, dim=1)  # [B, new, vocab]
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long), **kwargs)
        alone_tokens = alone.sequences[0, len(prompt) :]
        assert torch.equal(batched.sequences[row, -new_tokens:], alone_tokens), (
            f"prompt {row} (length {len(prompt)}): batched {batched.sequences[row, -new_tokens:].tolist()} "
            f"!= alone {alone_tokens.tolist()}"
        )
        diff = max_rel_diff(batched_scores[row], torch.stack(alone.scores, dim=1)[0])
        assert diff <= DECODE_TOL, f"prompt {row}: scores differ by {diff:.2e}"
    # the prompts do not all produce the same continuation (a degenerate model would hide padding bugs)
    assert len({tuple(seq[-new_tokens:].tolist()) for seq in batched.sequences}) > 1


def greedy_without_cache(model, prompt, new_tokens):
    """Greedy decoding by a full forward over the whole sequence at every step: no cache involved."""
    sequence = prompt
    with torch.no_grad():
        for _ in range(new_tokens):
            next_token = model(sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], dim=1)
    return sequence


def test_greedy_generate_matches_manual_argmax_decode(tiny_config):
    model = build_model(tiny_config, LAYOUTS["hybrid"])
    prompt = random_ids(1, 11, seed=5)
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=8)
    assert torch.equal(generated, greedy_without_cache(model, prompt, 8))


def test_cache_is_taken_under_either_name(tiny_config):
    """transformers >= 5.24 passes the cache as `cache`, earlier versions as `past_key_values`: both continue a
    prompt alike, the output carries it under the installed version's name, and passing it twice is an error."""
    from hf_effattn.modeling_effattn import CACHE_NAME

    model = build_model(tiny_config, LAYOUTS["hybrid"])
    prompt, token = random_ids(1, 7, seed=2), random_ids(1, 1, seed=9)
    steps = []
    for name in ("past_key_values", "cache"):
        first = model(prompt, use_cache=True)
        cache = getattr(first, CACHE_NAME)
        steps.append(model(token, use_cache=True, **{name: cache}).logits)
    assert cache.get_seq_length() == 8
    torch.testing.assert_close(steps[0], steps[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="passed twice"):
        model(token, past_key_values=cache, cache=cache)


@pytest.mark.parametrize("mixer_types", [["gdn", "gdn"], ["gdn", "deltanet", "gla"]], ids=["all-gdn", "gdn-deltanet-gla"])
def test_all_linear_model_generates_with_cache(tiny_config, mixer_types):
    model = build_model(tiny_config, mixer_types)
    prompt = random_ids(1, 9, seed=3)
    lengths = []
    hook = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=6)
    finally:
        hook.remove()
    # the prompt once, then one token per step: the cache carries the recurrent states
    assert lengths == [9] + [1] * 5
    assert torch.equal(generated, greedy_without_cache(model, prompt, 6))


def test_window_of_one_is_rejected(tiny_config):
    # transformers' sliding-window cache keeps `window - 1` keys, so a window of one cannot be cached correctly
    with pytest.raises(ValueError, match=r"mixer_options\['hedgehog'\]\['window'\] = 1"):
        build_model(tiny_config, ["hedgehog", "full"], {"hedgehog": {"window": 1}})


@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*deprecated:FutureWarning")
def test_gradient_checkpointing_same_loss_and_finite_grads(tiny_config):
    model = build_model(tiny_config, LAYOUTS["hybrid"])
    # longer than chunk_size and not a multiple of it: training takes the chunked paths with a padded tail
    input_ids = random_ids(2, 40, seed=7)
    model.train()

    def loss_and_grads(**kwargs):
        model.zero_grad(set_to_none=True)
        loss = model(input_ids, labels=input_ids, **kwargs).loss
        loss.backward()
        return loss.detach(), {name: p.grad for name, p in model.named_parameters()}

    reference_loss, reference_grads = loss_and_grads(use_cache=False)

    calls = []
    hook = model.model.layers[0].self_attn.register_forward_hook(lambda *args: calls.append(1))
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    try:
        loss, grads = loss_and_grads()
    finally:
        hook.remove()
        model.gradient_checkpointing_disable()
    # forward, then the recomputation during backward
    assert len(calls) == 2, f"the first mixer ran {len(calls)} times; checkpointing should recompute it once"

    assert torch.allclose(loss, reference_loss, rtol=1e-6, atol=0), (loss.item(), reference_loss.item())
    for name, param in model.named_parameters():
        grad = grads[name]
        assert grad is not None, f"{name} got no gradient under checkpointing"
        assert torch.isfinite(grad).all(), f"{name}: non-finite gradient"
        assert reference_grads[name] is not None, f"{name} got no gradient without checkpointing"
        assert torch.allclose(grad, reference_grads[name], rtol=1e-4, atol=1e-7), f"{name}: gradient differs"
    assert sum(g.abs().sum() for g in grads.values()) > 0


@pytest.mark.parametrize("layout", LAYOUT_IDS)
def test_bf16_forward_close_to_fp32(tiny_config, layout):
    model = build_model(tiny_config, LAYOUTS[layout])
    input_ids = random_ids(2, 80, seed=11)
    with torch.no_grad():
        expected = model(input_ids).logits
        model_bf16 = model.to(torch.bfloat16)
        assert all(p.dtype == torch.bfloat16 for p in model_bf16.parameters())
        logits = model_bf16(input_ids).logits
    assert logits.dtype == torch.bfloat16
    assert torch.isfinite(logits).all()
    error = rel_rms(logits, expected)
    assert error < 5e-2, f"bf16 logits relative RMS error {error:.3e}"


@pytest.mark.parametrize("layout", LAYOUT_IDS)
def test_save_pretrained_round_trip_reproduces_logits(tiny_config, layout, tmp_path):
    model = build_model(tiny_config, LAYOUTS[layout])
    input_ids = random_ids(2, 30, seed=13)
    with torch.no_grad():
        expected = model(input_ids).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is EffAttnForCausalLM
    assert loaded.config.mixer_types == model.config.mixer_types
    assert loaded.config.mixer_options == model.config.mixer_options
    loaded.eval()
    for (name, param), (loaded_name, loaded_param) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert name == loaded_name and torch.equal(param, loaded_param), f"{name} changed on reload"
    with torch.no_grad():
        logits = loaded(input_ids).logits
    assert torch.equal(logits, expected)


def host_reads_of_a_decode_step(model, monkeypatch) -> int:
    """How often a left-padded decode step reads a tensor back to the host (bool(), item(), tolist(), int())."""
    input_ids = random_ids(2, 30, seed=4)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0
    reads = []
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(input_ids[:, :29], attention_mask=attention_mask[:, :29], past_key_values=cache, use_cache=True)
        for name in ("__bool__", "item", "tolist", "__int__", "__index__"):
            original = getattr(torch.Tensor, name)

            def counted(self, *args, original=original, **kwargs):
                reads.append(1)
                return original(self, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)
        model(input_ids[:, 29:], attention_mask=attention_mask, past_key_values=cache, use_cache=True)
        monkeypatch.undo()
    return len(reads)


def test_a_decode_step_reads_the_mask_once_not_per_layer(tiny_config, monkeypatch):
    layers = ["gdn", "block_topk", "sliding", "hedgehog", "full"]
    options = {"gdn": {"window": 8}, "block_topk": {"block_size": 16, "top_k": 2}}
    reads = [host_reads_of_a_decode_step(build_model(tiny_config, layers * n, options), monkeypatch) for n in (1, 2)]
    # the padding summary (once per forward) and transformers' causal mask of the full layers
    assert reads[0] == reads[1] <= 2, reads
