"""Offline long-context probes, generated from a seed: passkey retrieval (landmark-attention's prompt).

Every sample is a dict with `prompt` (text), `answer` (the string to find) and `length` (the target length in
tokens). Prompts are sized with the evaluated model's tokenizer, so "1k" means about 1,024 of *its* tokens.
"""

import random
import re

PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"


def passkey_prompt(key: int, n_filler: int, depth: float) -> str:
    """The passkey prompt with `n_filler` filler sentences-groups and the needle at relative `depth` in [0, 1]."""
    before = round(n_filler * depth)
    lines = [PASSKEY_INTRO, " ".join([PASSKEY_FILLER] * before), PASSKEY_NEEDLE.format(key=key)]
    lines += [" ".join([PASSKEY_FILLER] * (n_filler - before)), PASSKEY_QUESTION]
    return "\n".join(line for line in lines if line)


def filler_count_for_length(tokenizer, length: int) -> int:
    """How many filler groups make a passkey prompt of about `length` tokens for this tokenizer."""
    base = len(tokenizer(passkey_prompt(12345, 0, 0.0))["input_ids"])
    per_filler = len(tokenizer(" ".join([PASSKEY_FILLER] * 16))["input_ids"]) / 16
    return max(int((length - base) / per_filler), 1)


def passkey_samples(tokenizer, length: int, num_samples: int, seed: int = 0) -> list[dict]:
    """`num_samples` passkey prompts of about `length` tokens, needle depths spread evenly over the context."""
    if num_samples <= 0:
        raise ValueError(f"num_samples = {num_samples}: expected a positive count.")
    if length < 64:
        raise ValueError(f"length = {length}: a passkey prompt needs at least 64 tokens.")
    rng = random.Random(f"passkey-{length}-{seed}")
    n_filler = filler_count_for_length(tokenizer, length)
    samples = []
    for i in range(num_samples):
        key = rng.randint(1, 50000)
        depth = i / max(num_samples - 1, 1)
        samples.append({"prompt": passkey_prompt(key, n_filler, depth), "answer": str(key), "length": length, "depth": depth})
    return samples


def passkey_correct(generation: str, answer: str) -> bool:
    """The first number in the generation equals the key (landmark-attention's scoring)."""
    found = re.search(r"\d+", generation)
    return found is not None and found.group(0) == answer
