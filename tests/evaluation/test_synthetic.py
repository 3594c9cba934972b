"""Passkey prompts and scoring (landmark-attention's definition)."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hf_effattn.evaluation.synthetic import (
    PASSKEY_FILLER,
    PASSKEY_INTRO,
    PASSKEY_QUESTION,
    passkey_correct,
    passkey_prompt,
    passkey_samples,
)


@pytest.fixture(scope="module")
def word_tokenizer():
    """One token per whitespace-separated word: lengths are easy to reason about."""
    words = set((PASSKEY_INTRO + " " + PASSKEY_FILLER + " " + PASSKEY_QUESTION + " The pass key is Remember it.").split())
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(sorted(words))}}
    model = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=model, unk_token="[UNK]")


def test_prompt_holds_the_needle_at_the_requested_depth():
    start = passkey_prompt(4242, 10, 0.0)
    end = passkey_prompt(4242, 10, 1.0)
    lines = start.split("\n")
    assert lines[0] == PASSKEY_INTRO and lines[-1] == PASSKEY_QUESTION
    assert lines[1] == "The pass key is 4242. Remember it. 4242 is the pass key."
    assert end.split("\n")[-2] == "The pass key is 4242. Remember it. 4242 is the pass key."
    assert start.count(PASSKEY_FILLER) == end.count(PASSKEY_FILLER) == 10


@pytest.mark.parametrize("length", [256, 1024, 4096])
def test_samples_have_about_the_requested_length(word_tokenizer, length):
    samples = passkey_samples(word_tokenizer, length, 5, seed=3)
    sizes = [len(word_tokenizer(s["prompt"])["input_ids"]) for s in samples]
    # one filler group is 18 words: the prompt lands within one group of the target
    assert all(length - 18 <= size <= length for size in sizes), sizes
    assert [s["depth"] for s in samples] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert all(s["answer"] in s["prompt"] for s in samples)


def test_samples_are_seeded(word_tokenizer):
    first = passkey_samples(word_tokenizer, 512, 4, seed=1)
    assert first == passkey_samples(word_tokenizer, 512, 4, seed=1)
    assert [s["answer"] for s in first] != [s["answer"] for s in passkey_samples(word_tokenizer, 512, 4, seed=2)]


@pytest.mark.parametrize(
    "generation, expected",
    [(" 31665.\n", True), ("31665 is the key", True), (" 3166", False), (" the pass key that", False),
     (" 316650", False), ("key 7, then 31665", False)],
)
def test_first_number_must_equal_the_key(generation, expected):
    assert passkey_correct(generation, "31665") is expected


def test_bad_requests_are_refused(word_tokenizer):
    with pytest.raises(ValueError, match="positive count"):
        passkey_samples(word_tokenizer, 512, 0)
    with pytest.raises(ValueError, match="at least 64 tokens"):
        passkey_samples(word_tokenizer, 32, 2)
