"""Dataset builders and scoring hooks of hf_effattn's lm-eval task pack (referenced from the YAML files here).

Every builder is called by lm-eval as `builder(**metadata)` and returns `{"test": datasets.Dataset}`. Metadata
(from `TaskManager(metadata=...)` or `--metadata` on lm-eval's command line):
    tokenizer / pretrained  the evaluated model's tokenizer (folder or hub id): prompts are sized in its tokens
    gguf_file               optional, when the tokenizer lives in a GGUF file inside that folder
    max_seq_length          target length in tokens, prompt plus answer budget (or max_seq_lengths: a list)
    num_samples             samples per length (default 50)
    seed                    (default 0): the same seed and tokenizer give the same prompts
"""

import functools
import random

import datasets

from hf_effattn.evaluation import synthetic
from hf_effattn.evaluation.scoring import passkey_score, string_match_all

DEFAULT_LENGTH = 4096
DEFAULT_SAMPLES = 50


@functools.cache
def _tokenizer(name: str, gguf_file: str | None):
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoTokenizer.from_pretrained(name, **kwargs)


def _lengths_and_samples(metadata: dict) -> tuple[list[int], int, int]:
    lengths = metadata.get("max_seq_lengths") or [metadata.get("max_seq_length", DEFAULT_LENGTH)]
    lengths = [int(length) for length in lengths]
    num_samples = int(metadata.get("num_samples", DEFAULT_SAMPLES))
    if num_samples <= 0 or any(length <= 0 for length in lengths):
        raise ValueError(f"num_samples = {num_samples}, lengths = {lengths}: expected positive numbers.")
    return lengths, num_samples, int(metadata.get("seed", 0))


def _metadata_tokenizer(metadata: dict):
    name = metadata.get("tokenizer") or metadata.get("pretrained")
    if not isinstance(name, str) or not name:
        raise ValueError(
            "hf_effattn's long-context tasks size their prompts in the evaluated model's tokens and need its "
            "tokenizer: pass metadata tokenizer=<folder or hub id> (hf-effattn eval does it for you)."
        )
    return _tokenizer(name, metadata.get("gguf_file"))


def _dataset(task: str, metadata: dict, make_one) -> dict:
    lengths, num_samples, seed = _lengths_and_samples(metadata)
    tokenizer = _metadata_tokenizer(metadata)
    rows = []
    for length in lengths:
        rng = random.Random(f"{task}-{length}-{seed}")
        for index in range(num_samples):
            sample = make_one(tokenizer, length, rng, index, num_samples)
            for doc in sample if isinstance(sample, list) else [sample]:
                rows.append({"input": doc["prompt"], "answers": doc["answers"], "length": length})
    return {"test": datasets.Dataset.from_list(rows)}


def passkey(**metadata):
    samples_by_length = {}

    def make(tokenizer, length, rng, index, total):
        # needle depths spread evenly over the context, as in the direct probe; the prompt leaves room for the
        # answer, like every task of the pack. All samples of a length are built at once, on its first index.
        if length not in samples_by_length:
            budget = length - synthetic.TOKENS_TO_GENERATE["passkey"]
            samples_by_length[length] = synthetic.passkey_samples(tokenizer, budget, total, seed=metadata.get("seed", 0))
        sample = samples_by_length[length][index]
        return {"prompt": sample["prompt"], "answers": [sample["answer"]]}

    return _dataset("passkey", metadata, make)


def _niah(task, **options):
    def builder(**metadata):
        return _dataset(task, metadata, lambda tok, length, rng, i, n: synthetic.niah_sample(tok, length, rng, **options))

    return builder


niah_single = _niah("niah_single")
niah_multikey = _niah("niah_multikey", num_keys=4)
niah_uuid = _niah("niah_uuid", haystack="needle", key_kind="uuids", value_kind="uuids")
niah_multivalue = _niah("niah_multivalue", num_values=4)
niah_multiquery = _niah("niah_multiquery", num_keys=4, num_queries=4)


def vt(**metadata):
    return _dataset("vt", metadata, lambda tok, length, rng, i, n: synthetic.variable_tracking_sample(tok, length, rng))


def cwe(**metadata):
    return _dataset("cwe", metadata, lambda tok, length, rng, i, n: synthetic.common_words_sample(tok, length, rng))


def fwe(**metadata):
    return _dataset("fwe", metadata, lambda tok, length, rng, i, n: synthetic.frequent_words_sample(tok, length, rng))


def mqar(**metadata):
    return _dataset("mqar", metadata, lambda tok, length, rng, i, n: synthetic.mqar_samples(tok, length, rng))


def heldout_text(**metadata):
    """Held-out local text for `loglikelihood_rolling`: the standard library files that conversion never trains on."""
    from hf_effattn.conversion.data import stdlib_documents

    lengths, num_samples, seed = _lengths_and_samples(metadata)
    documents = stdlib_documents("heldout")
    random.Random(f"ppl-{seed}").shuffle(documents)
    # about four characters per token: each document is cut near the longest length evaluated
    limit = 4 * max(lengths)
    rows = [{"text": doc[:limit], "length": max(lengths)} for doc in documents if len(doc) >= 200][:num_samples]
    return {"test": datasets.Dataset.from_list(rows)}


def score_string_match_all(doc, results):
    return {"score": string_match_all(results[0], doc["answers"])}


def score_passkey(doc, results):
    return {"score": passkey_score(results[0], doc["answers"])}
