"""A tiny hybrid with every mixer kind, saved as a remote-code checkpoint with a chat template, and a synthetic
chat task for it."""

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_effattn.checkpoint import save_checkpoint
from hf_effattn.conversion.weight_map import effattn_from_teacher

ALL_KINDS = ["full", "sliding", "gdn", "deltanet", "gla", "hedgehog"]
# a ChatML-like template; every turn renders the same whatever follows it
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<eos>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# small windows and chunks so that windows slide and chunked paths run on short inputs; a softmax window in the gdn
# layer (its recurrent_scale) and a convolution in the gla layer
MIXER_OPTIONS = {
    "sliding": {"window": 8, "sink_tokens": 2, "sink_logits": True, "chunk_size": 16},
    "hedgehog": {"window": 6, "chunk_size": 16},
    "gdn": {"chunk_size": 16, "window": 8, "sink_tokens": 2},
    "deltanet": {"chunk_size": 16},
    "gla": {"chunk_size": 16, "conv_size": 4},
}
NAMES = ["alpha", "bravo", "delta", "echo", "golf", "hotel", "india", "kilo"]
COLOURS = ["red", "green", "blue", "black", "white", "brown", "pink", "grey"]


def colour_chats(count: int, seed: int = 0) -> list[dict]:
    """"What colour is NAME?" -> "NAME is COLOUR." with a fixed NAME -> COLOUR map, sometimes after a system turn."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        index = rng.randrange(len(NAMES))
        messages = [{"role": "user", "content": f"What colour is {NAMES[index]}?"},
                    {"role": "assistant", "content": f"{NAMES[index]} is {COLOURS[index]}."}]
        if rng.random() < 0.3:
            messages.insert(0, {"role": "system", "content": "Answer briefly."})
        records.append({"messages": messages})
    return records


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


@pytest.fixture(scope="session")
def tiny_hybrid(tmp_path_factory, make_tiny_teacher):
    """Folder of a 6-layer hybrid (full, sliding, gdn, deltanet, gla, hedgehog) built from a tiny random Llama."""
    teacher_dir = make_tiny_teacher(len(ALL_KINDS))
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    hybrid, _ = effattn_from_teacher(teacher, mixer_types=ALL_KINDS, mixer_options=MIXER_OPTIONS)
    # the random teacher's tied embeddings (std 0.02) cap every logit near 1.3: scaled up, a frozen head can express
    # the confident answers that the synthetic task asks for
    with torch.no_grad():
        hybrid.model.embed_tokens.weight.mul_(4)
        # as after attention transfer: the windowed gdn layer's recurrent branch contributes (it starts at zero,
        # which would leave every parameter of that branch without gradient)
        hybrid.model.layers[ALL_KINDS.index("gdn")].self_attn.recurrent_scale.fill_(0.5)
    return save_checkpoint(hybrid, tmp_path_factory.mktemp("finetune-base") / "hybrid", tokenizer)


@pytest.fixture(scope="session")
def colour_data(tmp_path_factory):
    """A JSONL file of 48 synthetic colour chats."""
    return write_jsonl(tmp_path_factory.mktemp("finetune-data") / "colours.jsonl", colour_chats(48))


@pytest.fixture(scope="session")
def chats():
    """`chats(count, seed=0)` -> colour-chat records."""
    return colour_chats


@pytest.fixture(scope="session")
def jsonl():
    """`jsonl(path, records)` -> str(path), the records written one per line."""
    return write_jsonl
