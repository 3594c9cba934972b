"""Text the teacher writes: seeded prompts, sampled batched answers from the real embedded teacher, the cache."""

import pytest

from hf_effattn.conversion.teacher_text import generate_batch, teacher_documents, teacher_prompts
from hf_effattn.conversion.workdir import WorkDir

ANSWER_TOKENS = 12


def test_prompts_are_seeded_and_varied():
    prompts = teacher_prompts(40, seed=0)
    assert prompts == teacher_prompts(40, seed=0) and prompts != teacher_prompts(40, seed=1)
    assert len(set(prompts)) > 30
    assert len({prompt.split()[0] for prompt in prompts}) > 5, "the instructions vary, not only the topics"


def _workdir(path):
    work = WorkDir(path)
    work.open({})
    return work


@pytest.mark.teacher
def test_the_embedded_teacher_writes_seeded_cached_documents(embedded_teacher, tmp_path):
    model, tokenizer = embedded_teacher
    work = _workdir(tmp_path / "first")
    documents = teacher_documents(model, tokenizer, 3, ANSWER_TOKENS, seed=0, workdir=work, batch_size=2)
    assert len(documents) == 3 and sorted(p.name for p in work.root.glob("teacher-text-*")) == [
        "teacher-text-00000.json", "teacher-text-00001.json"]
    for prompt, document in zip(teacher_prompts(3, seed=0), documents):
        # the exchange as the chat template renders it: the prompt is the user's turn, the answer the assistant's
        user, answer = document.split("<|im_start|>assistant\n")
        assert f"<|im_start|>user\n{prompt}<|im_end|>" in user
        answer = answer.removesuffix("<|im_end|>\n")
        # re-tokenising the decoded answer may split a token or two differently
        assert answer.strip() and len(tokenizer(answer)["input_ids"]) <= ANSWER_TOKENS + 2, answer

    # the same seed writes the same documents in another work folder; another seed, others
    assert teacher_documents(model, tokenizer, 3, ANSWER_TOKENS, seed=0, workdir=_workdir(tmp_path / "again"),
                             batch_size=2) == documents
    assert teacher_documents(model, tokenizer, 3, ANSWER_TOKENS, seed=1, workdir=_workdir(tmp_path / "other"),
                             batch_size=2) != documents
    # answers are sampled: the same prompts with another batch seed get other answers
    prompts = teacher_prompts(2, seed=0)
    assert generate_batch(model, tokenizer, prompts, ANSWER_TOKENS, seed=5) != generate_batch(
        model, tokenizer, prompts, ANSWER_TOKENS, seed=6)

    # a rerun reads the batches its work folder holds and writes only the missing ones
    work.write_json("teacher-text-00000.json", ["cached one", "cached two"])
    work.path("teacher-text-00001.json").unlink()
    assert teacher_documents(model, tokenizer, 3, ANSWER_TOKENS, seed=0, workdir=work, batch_size=2) == [
        "cached one", "cached two", documents[2]]
