"""Shared fixtures: a fixed seed for every test, a factory for tiny EffAttn configs, and a tiny Llama teacher with
its own small BPE tokenizer, saved as a local transformers folder (no network)."""

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hf_effattn import EffAttnConfig
from hf_effattn.conversion.data import stdlib_documents

# small windows and chunks so that windows slide, sinks leave the window and chunked paths run on short inputs
TINY_MIXER_OPTIONS = {
    "sliding": {"window": 8, "sink_tokens": 2, "sink_logits": True, "chunk_size": 16},
    "hedgehog": {"window": 6, "chunk_size": 16},
    "gdn": {"chunk_size": 16},
    "deltanet": {"chunk_size": 16},
    "gla": {"chunk_size": 16},
    "kda": {"chunk_size": 16},
}


def make_tiny_config(mixer_types, mixer_options=None, **backbone) -> EffAttnConfig:
    """A 64-wide, 4-head (2 kv heads) config, one layer per entry of `mixer_types`.

    `mixer_options` are merged over `TINY_MIXER_OPTIONS` kind by kind; other keywords override the backbone.
    """
    options = {kind: dict(values) for kind, values in TINY_MIXER_OPTIONS.items()}
    for kind, values in (mixer_options or {}).items():
        options.setdefault(kind, {}).update(values)
    kwargs = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=len(mixer_types),
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        # larger than the default 0.02 so that every mixer visibly moves the logits
        initializer_range=0.1,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    kwargs.update(backbone)
    return EffAttnConfig(mixer_types=list(mixer_types), mixer_options=options, **kwargs)


@pytest.fixture
def tiny_config():
    """`tiny_config(mixer_types, mixer_options=None, **backbone)` -> EffAttnConfig."""
    return make_tiny_config


@pytest.fixture(scope="module")
def torch_single_thread():
    """One intra-op thread for tiny tensors: on a busy 2-core machine, OpenMP threads spinning for each other made
    these tests 20-50x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _fixed_seed():
    torch.manual_seed(0)
    yield


def build_tiny_teacher(folder, num_layers=4, seed=0):
    tokenizer_model = Tokenizer(models.BPE(unk_token=None))
    tokenizer_model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer_model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer_model.train_from_iterator(stdlib_documents("train")[:40], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer_model, eos_token="<eos>", pad_token="<eos>")
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """Path of a 4-layer, 64-wide random Llama teacher folder."""
    return build_tiny_teacher(tmp_path_factory.mktemp("tiny-teacher"))


@pytest.fixture(scope="session")
def make_tiny_teacher(tmp_path_factory):
    """`make_tiny_teacher(num_layers)` -> path of a new random Llama teacher folder with that many layers."""
    return lambda num_layers: build_tiny_teacher(tmp_path_factory.mktemp("tiny-teacher"), num_layers=num_layers)
