"""Fine-tuning data: record checks with line numbers, assistant-only targets, packing, evaluation split."""

import pytest
from transformers import AutoTokenizer

from hf_effattn.finetuning.data import (
    IGNORE_INDEX,
    FinetuneDataError,
    collate,
    count_targets,
    pack_examples,
    read_jsonl,
    split_examples,
    tokenize_records,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_hybrid):
    return AutoTokenizer.from_pretrained(tiny_hybrid)


def decode_targets(tokenizer, example) -> str:
    return tokenizer.decode([label for label in example.labels if label != IGNORE_INDEX])


def test_only_assistant_turns_are_targets(tokenizer):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What colour is alpha?"},
        {"role": "assistant", "content": "alpha is red."},
        {"role": "user", "content": "And kilo?"},
        {"role": "assistant", "content": "kilo is grey."},
    ]
    (example,), counts = tokenize_records(tokenizer, [{"messages": messages}], 512, "chats.jsonl")
    assert counts == {"records": 1, "examples": 1, "truncated": 0, "dropped": 0}
    # each reply with the template's end-of-turn marker, nothing of the prompts
    assert decode_targets(tokenizer, example) == "alpha is red.<eos>\nkilo is grey.<eos>\n"
    # the prompt of the first reply is tokenized exactly as at generation time
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert example.input_ids[: len(prompt_ids)] == prompt_ids
    assert set(example.labels[: len(prompt_ids)]) == {IGNORE_INDEX}
    assert example.labels[len(prompt_ids)] == example.input_ids[len(prompt_ids)]


def test_text_records_learn_every_token_and_end_with_eos(tokenizer):
    (example,), _ = tokenize_records(tokenizer, [{"text": "def f(x): return x"}], 512, "text.jsonl")
    assert example.labels == example.input_ids
    assert example.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(example.input_ids) == "def f(x): return x<eos>"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "ok"}\n{"text": "missing quote}\n', r"line 2: not valid JSON"),
        ('{"text": "ok"}\n\n{"prompt": "a", "completion": "b"}\n', r"line 3: the record has neither a 'messages' list"),
        ("", r"holds no records"),
        ("\n  \n", r"holds no records"),
        ('[{"text": "a"}]\n', r"line 1: expected a JSON object, got list"),
        ('{"messages": [{"role": "human", "content": "hi"}]}\n', r"messages\[0\] has role 'human'; allowed roles"),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', r"no assistant turn"),
        ('{"messages": [{"role": "user"}]}\n', r"messages\[0\] must be an object with 'role' and 'content'"),
        ('{"messages": []}\n', r"'messages' must be a non-empty list"),
        ('{"text": ""}\n', r"'text' must be a non-empty string"),
        ('{"text": "a", "messages": []}\n', r"not both"),
    ],
    ids=["not-json", "missing-fields", "empty", "blank-lines", "not-object", "unknown-role", "no-assistant",
         "no-content", "no-turns", "empty-text", "both-formats"],
)
def test_bad_files_are_rejected_with_the_line(tmp_path, content, message):
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    with pytest.raises(FinetuneDataError, match=message):
        read_jsonl(path)


def test_missing_file_and_binary_file_are_rejected(tmp_path):
    with pytest.raises(FinetuneDataError, match="does not exist"):
        read_jsonl(tmp_path / "nothing.jsonl")
    (tmp_path / "data.bin").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(FinetuneDataError, match="not UTF-8"):
        read_jsonl(tmp_path / "data.bin")


def test_messages_need_a_prefix_stable_chat_template(tokenizer):
    records = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    plain = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    with pytest.raises(FinetuneDataError, match="no chat template"):
        tokenize_records(plain, records, 512, "chats.jsonl")
    # a template that announces the number of turns renders a prefix differently from the whole conversation
    plain.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(FinetuneDataError, match="not prefix-stable"):
        tokenize_records(plain, records, 512, "chats.jsonl")
    plain.chat_template = "{% if messages[0]['role'] == 'user' %}{{ raise_exception('system turn first') }}{% endif %}"
    with pytest.raises(FinetuneDataError, match="record 1: the chat template refused the conversation: system turn"):
        tokenize_records(plain, records, 512, "chats.jsonl")


def test_truncation_drops_examples_left_without_targets(tokenizer):
    question = [{"role": "user", "content": "What colour is alpha?"}, {"role": "assistant", "content": "alpha is red."}]
    records = [{"messages": question}, {"messages": [{"role": "system", "content": "Answer briefly."}, *question]}]
    # the reply starts after 35 tokens, or after 59 behind the system turn
    examples, counts = tokenize_records(tokenizer, records, 40, "chats.jsonl")
    assert counts == {"records": 2, "examples": 1, "truncated": 2, "dropped": 1}
    assert len(examples[0].input_ids) == 40
    with pytest.raises(FinetuneDataError, match="raise --max-length"):
        tokenize_records(tokenizer, records, 20, "chats.jsonl")


def test_packing_keeps_every_target_but_the_first_token_of_each_example(tokenizer, chats):
    examples, _ = tokenize_records(tokenizer, chats(10) + [{"text": "x = 1"}], 512, "mixed.jsonl")
    blocks = pack_examples(examples, 32)
    total = sum(len(e.input_ids) for e in examples)
    assert [len(b.input_ids) for b in blocks] == [32] * (total // 32) + ([total % 32] if total % 32 else [])
    assert [t for b in blocks for t in b.input_ids] == [t for e in examples for t in e.input_ids]
    # an example's first token is never learned from the example before it
    expected = sum(1 for e in examples for label in e.labels[1:] if label != IGNORE_INDEX)
    assert sum(1 for b in blocks for label in b.labels if label != IGNORE_INDEX) == expected

    batch = collate(blocks[-2:], pad_token_id=tokenizer.eos_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert int(batch["attention_mask"].sum()) == sum(len(b.input_ids) for b in blocks[-2:])
    assert count_targets(batch["labels"]) == sum(
        1 for b in blocks[-2:] for label in b.labels[1:] if label != IGNORE_INDEX
    )


def test_evaluation_split_is_seeded_and_disjoint(tokenizer, chats):
    examples, _ = tokenize_records(tokenizer, chats(20), 512, "chats.jsonl")
    train, held_out = split_examples(examples, 0.25, seed=3)
    again = split_examples(examples, 0.25, seed=3)
    assert len(held_out) == 5 and len(train) == 15
    assert [e.input_ids for e in held_out] == [e.input_ids for e in again[1]]
    assert {id(e) for e in train}.isdisjoint({id(e) for e in held_out})
    assert split_examples(examples, 0.0, seed=3) == (examples, [])
    with pytest.raises(FinetuneDataError, match="leaves none for training"):
        split_examples(examples[:1], 0.5, seed=0)
