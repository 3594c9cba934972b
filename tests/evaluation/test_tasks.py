"""The offline long-context task pack: lm-eval validation, prompt construction, sizing and scoring."""

import collections
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from hf_effattn.evaluation import synthetic
from hf_effattn.evaluation.harness import PACK_TASKS, TASK_DIR
from hf_effattn.evaluation.scoring import passkey_score, string_match_all

sys.path.insert(0, str(TASK_DIR))
import effattn_tasks


@pytest.fixture(scope="module")
def tokenizer(tiny_teacher):
    return AutoTokenizer.from_pretrained(tiny_teacher)


def _tokens(tokenizer, text):
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_task_pack_passes_lm_eval_validate():
    result = subprocess.run(
        [sys.executable, "-m", "lm_eval", "validate", "--tasks", ",".join(PACK_TASKS), "--include_path", str(TASK_DIR)],
        capture_output=True, text=True, timeout=300, check=False, env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
                                                            "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "All tasks found and valid" in result.stdout + result.stderr


def test_every_yaml_names_a_pack_task():
    names = {re.search(r"^task: (\S+)$", p.read_text(), re.MULTILINE).group(1) for p in Path(TASK_DIR).glob("*.yaml")}
    assert names == set(PACK_TASKS)


@pytest.mark.parametrize(
    ("prediction", "references", "expected"),
    [
        (" 1234567 and 7654321.", ["1234567", "7654321"], 100.0),
        ("1234567", ["1234567", "7654321"], 50.0),
        ("nothing", ["1234567"], 0.0),
        ("The WORDS are: Alpha, beta", ["alpha", "Beta"], 100.0),
        ("\x00\n  7654321\x1f", ["7654321"], 100.0),
    ],
)
def test_string_match_all(prediction, references, expected):
    assert string_match_all(prediction, references) == expected


def test_passkey_score_takes_the_first_number():
    assert passkey_score(" 4242. Remember it.", ["4242"]) == 100.0
    assert passkey_score(" 42 then 4242", ["4242"]) == 0.0
    assert passkey_score(" no number", ["4242"]) == 0.0


@pytest.mark.parametrize(
    "builder",
    ["passkey", "niah_single", "niah_multikey", "niah_uuid", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe"],
)
def test_prompts_fit_the_length_and_hold_their_answers(tiny_teacher, tokenizer, builder):
    length = 900
    rows = getattr(effattn_tasks, builder)(tokenizer=str(tiny_teacher), max_seq_length=length, num_samples=2)["test"]
    budget = synthetic.TOKENS_TO_GENERATE[builder if builder in ("passkey", "vt", "cwe", "fwe") else "niah"]
    for row in rows:
        used = _tokens(tokenizer, row["input"])
        # sized to the budget, and not far below it (the haystack grows until the next unit would not fit)
        assert length - budget - 60 <= used <= length - budget
        assert row["length"] == length and row["answers"]
        if builder.startswith("niah") or builder in ("vt", "passkey"):
            assert all(answer in row["input"] for answer in row["answers"])
    again = getattr(effattn_tasks, builder)(tokenizer=str(tiny_teacher), max_seq_length=length, num_samples=2)["test"]
    assert again["input"] == rows["input"], "same seed, same prompts"
    other = getattr(effattn_tasks, builder)(tokenizer=str(tiny_teacher), max_seq_length=length, num_samples=2, seed=1)
    assert other["test"]["input"] != rows["input"]


def test_niah_needles_and_question(tokenizer):
    sample = synthetic.niah_sample(tokenizer, 800, random.Random(0), num_keys=4, num_queries=2, num_values=2)
    needles = re.findall(r"One of the special magic numbers for (\S+) is: (\d+)\.", sample["prompt"])
    assert len(needles) == 8 and len({k for k, _ in needles}) == 4
    asked = re.search(r"What are all the special magic numbers for (.+?) mentioned", sample["prompt"]).group(1)
    queried = re.split(r", | and ", asked)
    assert len(queried) == 2
    assert sorted(sample["answers"]) == sorted(v for k, v in needles if k in queried)
    single = synthetic.niah_sample(tokenizer, 700, random.Random(0))
    assert single["prompt"].startswith("A special magic number is hidden")
    assert single["prompt"].endswith("The special magic number for " + re.search(r"for (\S+) is:", single["prompt"]).group(1)
                                     + " mentioned in the provided text is")


def test_variable_tracking_chain_resolves_to_the_value(tokenizer):
    sample = synthetic.variable_tracking_sample(tokenizer, 800, random.Random(3))
    value = re.search(r"assigned the value (\d+) in the text", sample["prompt"]).group(1)
    assigned = dict(re.findall(r"VAR (\w+) = (VAR \w+|\d+)\.", sample["prompt"]))
    resolved = set()
    for name, target in assigned.items():
        while target.startswith("VAR "):
            target = assigned[target[4:]]
        if target == value:
            resolved.add(name)
    assert resolved == set(sample["answers"]) and len(resolved) == 5


def test_word_frequency_answers_are_the_most_frequent(tokenizer):
    cwe = synthetic.common_words_sample(tokenizer, 2000, random.Random(1))
    counts = collections.Counter(re.findall(r"\d+\. (\w+)", cwe["prompt"]))
    assert {w for w, _ in counts.most_common(10)} == set(cwe["answers"])
    repeats = cwe["common_repeats"]
    assert all(counts[w] == repeats for w in cwe["answers"]) and set(counts.values()) == {3, repeats}
    assert synthetic.common_words_sample(tokenizer, 4000, random.Random(1))["common_repeats"] == 30
    fwe = synthetic.frequent_words_sample(tokenizer, 1500, random.Random(1))
    coded = fwe["prompt"].split("coded words. ", 1)[1].split("\nQuestion:", 1)[0].split()
    counts = collections.Counter(coded)
    top = [c for _, c in counts.most_common()]
    assert [counts[w] for w in fwe["answers"]] == top[:3]


def test_mqar_queries_ask_keys_of_the_context(tokenizer):
    docs = synthetic.mqar_samples(tokenizer, 600, random.Random(2))
    assert len(docs) == 4
    for doc in docs:
        key = re.search(r"which number goes with (\S+)\?", doc["prompt"]).group(1)
        context = doc["prompt"].split("\nQuestion:")[0]
        assert f"\n{key}:{doc['answers'][0]}\n" in context + "\n"


def test_task_needs_a_tokenizer_and_a_positive_length():
    with pytest.raises(ValueError, match="tokenizer=<folder or hub id>"):
        effattn_tasks.niah_single(max_seq_length=512)
    with pytest.raises(ValueError, match="expected positive numbers"):
        effattn_tasks.niah_single(tokenizer="unused", max_seq_length=512, num_samples=0)


def test_too_short_length_says_so(tokenizer):
    with pytest.raises(ValueError, match="too short"):
        synthetic.niah_sample(tokenizer, 150, random.Random(0))
