"""Offline training data: the stdlib split, local files, retrieval samples and packing."""

import json
import random

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hf_effattn.conversion.data import (
    DataError,
    data_sources,
    heldout_documents,
    load_documents,
    pack,
    retrieval_sample,
    training_blocks,
    training_blocks_with_answers,
)


@pytest.fixture(scope="module")
def char_tokenizer():
    """One token per character (byte-level alphabet), so every text tokenizes."""
    alphabet = sorted(set(chr(i) for i in range(32, 127)) | {"\n", "\t"})
    vocab = {"[UNK]": 0, "[EOS]": 1, **{c: i + 2 for i, c in enumerate(alphabet)}}
    model = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    model.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=model, unk_token="[UNK]", eos_token="[EOS]")


def test_stdlib_split_is_disjoint_and_stable():
    train, heldout = load_documents("stdlib", "train"), load_documents("stdlib", "heldout")
    assert len(train) > 200 and 5 <= len(heldout) < len(train) / 5
    assert not set(train) & set(heldout)
    assert heldout == load_documents("stdlib", "heldout")


def test_local_txt_and_jsonl_files(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "second"}) + "\n\n" + json.dumps({"text": "third"}) + "\n")
    assert load_documents(str(tmp_path)) == ["first document", "second", "third"]
    assert load_documents(str(tmp_path / "b.jsonl")) == ["second", "third"]


@pytest.mark.parametrize(
    "content, name, message",
    [
        ('{"body": "x"}\n', "bad.jsonl", "no 'text' field"),
        ("   \n", "empty.txt", "holds no text"),
        ("x", "notes.md", "expected a .txt or .jsonl"),
    ],
)
def test_bad_local_data_is_refused(tmp_path, content, name, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message):
        load_documents(str(tmp_path / name))


def test_missing_source_is_refused(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_documents(str(tmp_path / "nowhere.txt"))
    with pytest.raises(DataError, match="does not exist"):
        load_documents(f"stdlib+{tmp_path / 'nowhere.txt'}")
    with pytest.raises(DataError, match="empty part"):
        load_documents("stdlib++teacher")


def test_sources_join_with_plus(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    stdlib = load_documents("stdlib")
    assert load_documents(f"stdlib+{tmp_path / 'a.txt'}") == stdlib + ["first document"]
    # the pipeline writes the teacher's documents: they add nothing here
    assert load_documents("stdlib+teacher") == stdlib and load_documents("teacher") == []
    # a path with a '+' in its name is one source
    (tmp_path / "c+d.txt").write_text("plus in the name")
    assert data_sources(str(tmp_path / "c+d.txt")) == [str(tmp_path / "c+d.txt")]
    assert load_documents(str(tmp_path / "c+d.txt")) == ["plus in the name"]
    # held-out perplexity: the stdlib's held-out files, also for teacher text alone; other sources' own text
    heldout = load_documents("stdlib", "heldout")
    assert heldout_documents("stdlib+teacher") == heldout_documents("teacher") == (heldout, "stdlib held-out files")
    assert heldout_documents(f"{tmp_path / 'a.txt'}+teacher") == (["first document"], str(tmp_path / "a.txt"))


def test_retrieval_sample_ends_with_the_answer_to_a_fact_stated_earlier(char_tokenizer):
    rng = random.Random(0)
    docs = ["def f(x):\n    return x * 2\n" * 20]
    for _ in range(20):
        ids = retrieval_sample(char_tokenizer, docs, 600, rng)
        assert len(ids) == 600
        text = char_tokenizer.decode(ids).replace(" ", "")
        # the last line asks about one fact; its value appears earlier in the sample
        *_, tail = text.rstrip(".").split("\n")
        value = tail.split("=")[-1] if "=" in tail else tail.split("is")[-1]
        assert value.isdigit() and text.count(value) >= 2, tail


def test_pack_and_retrieval_share(char_tokenizer):
    docs = load_documents("stdlib", "train")[:30]
    blocks = pack(char_tokenizer, docs, 256, 8)
    assert blocks.shape == (8, 256)
    assert (blocks == char_tokenizer.eos_token_id).any()
    mixed = training_blocks(char_tokenizer, docs, 600, 10, 0.5, seed=0)
    assert mixed.shape == (10, 600)
    assert mixed.tolist() == training_blocks(char_tokenizer, docs, 600, 10, 0.5, seed=0).tolist()
    # five of the ten blocks ask a question at their end
    texts = [t.replace(" ", "") for t in char_tokenizer.batch_decode(mixed)]
    assert sum("Question" in t or "Recall" in t or "Whatis" in t for t in texts) >= 5
    with pytest.raises(DataError, match="too short for retrieval samples"):
        training_blocks(char_tokenizer, docs, 128, 4, 1.0, seed=0)
    with pytest.raises(DataError, match="fewer than 100000 tokens"):
        pack(char_tokenizer, ["tiny"], 100000, 1)
    with pytest.raises(DataError, match="fraction"):
        training_blocks(char_tokenizer, docs, 256, 4, 1.5, seed=0)


def test_answer_mask_marks_the_positions_that_predict_the_asked_value(char_tokenizer):
    docs = load_documents("stdlib", "train")[:30]
    blocks, answers = training_blocks_with_answers(char_tokenizer, docs, 600, 10, 0.5, seed=3)
    assert blocks.tolist() == training_blocks(char_tokenizer, docs, 600, 10, 0.5, seed=3).tolist()
    rows = answers.any(-1)
    assert rows.sum() == 5
    for ids, mask in zip(blocks[rows], answers[rows]):
        positions = mask.nonzero().flatten()
        # contiguous, ending on the position before the last token
        assert positions.tolist() == list(range(int(positions[0]), 599))
        predicted = char_tokenizer.decode(ids[positions + 1]).replace(" ", "")
        # the predicted tokens are the value (digits) and its full stop; the value was stated earlier
        assert predicted.endswith(".") and predicted[:-1].isdigit(), predicted
        assert char_tokenizer.decode(ids[: int(positions[0])]).replace(" ", "").count(predicted[:-1]) >= 1
