"""Training and held-out text for conversions, offline by default.

Sources:
- `stdlib`: the Python standard library's own sources and docstrings, which every machine running this has;
  files are split into training and held-out sets by a hash of their path, so the split never changes.
- local `.txt` / `.jsonl` files (`text` field) or folders of them;
- a `datasets` name (`hf:NAME[:CONFIG]`), when the Hub is reachable.
Synthetic long-context retrieval samples (a keyed needle in filler text, asked for at the end) are mixed in
so that the student learns to keep recall: they use their own templates, never the evaluation's prompts.
"""

import hashlib
import json
import random
import sysconfig
from pathlib import Path

import torch

HELD_OUT_EVERY = 20  # one stdlib file in 20 is held out for perplexity


class DataError(ValueError):
    pass


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__", "turtledemo"}
    files = [p for p in root.rglob("*.py") if not (set(p.relative_to(root).parts[:-1]) & skip)]
    return sorted(files, key=lambda p: str(p.relative_to(root)))


def _is_held_out(name: str) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % HELD_OUT_EVERY == 0


def stdlib_documents(split: str) -> list[str]:
    """The standard library's sources, `split` = "train" or "heldout"."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split = {split!r}: expected 'train' or 'heldout'.")
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in _stdlib_files():
        if _is_held_out(str(path.relative_to(root))) == (split == "heldout"):
            try:
                docs.append(path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, OSError):
                continue
    return docs


def _read_local(path: Path) -> list[str]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl"))
        if not files:
            raise DataError(f"{path} holds no .txt or .jsonl files.")
        return [doc for file in files for doc in _read_local(file)]
    if path.suffix == ".txt":
        return [path.read_text(encoding="utf-8")]
    if path.suffix == ".jsonl":
        docs = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                record = json.loads(line)
                if "text" not in record:
                    raise DataError(f"{path}:{number} has no 'text' field; expected one JSON object per line with 'text'.")
                docs.append(record["text"])
        return docs
    raise DataError(f"{path}: expected a .txt or .jsonl file, or a folder of them.")


def load_documents(source: str, split: str = "train") -> list[str]:
    """Documents of a data source: `stdlib`, a local file/folder, or `hf:NAME[:CONFIG]`."""
    if source == "stdlib":
        docs = stdlib_documents(split)
    elif source.startswith("hf:"):
        try:
            import datasets
        except ImportError as error:
            raise DataError(f"{source}: the `datasets` package is needed for Hub datasets (pip install datasets).") from error
        name, _, config = source[3:].partition(":")
        rows = datasets.load_dataset(name, config or None, split="train" if split == "train" else "validation")
        docs = [row["text"] for row in rows]
    else:
        path = Path(source)
        if not path.exists():
            raise DataError(f"Data source {source!r} does not exist: give 'stdlib', a .txt/.jsonl file or folder, or hf:NAME.")
        docs = _read_local(path)
    docs = [doc for doc in docs if doc.strip()]
    if not docs:
        raise DataError(f"Data source {source!r} ({split}) holds no text.")
    return docs


def pack(tokenizer, documents: list[str], seq_len: int, max_blocks: int, seed: int = 0) -> torch.Tensor:
    """Shuffles documents, joins them with EOS and cuts `[N, seq_len]` blocks (N <= max_blocks)."""
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    eos = tokenizer.eos_token_id
    buffer, blocks = [], []
    for index in order:
        buffer.extend(tokenizer(documents[index])["input_ids"])
        if eos is not None:
            buffer.append(eos)
        while len(buffer) >= seq_len and len(blocks) < max_blocks:
            blocks.append(buffer[:seq_len])
            buffer = buffer[seq_len:]
        if len(blocks) >= max_blocks:
            break
    if not blocks:
        raise DataError(f"The data holds fewer than {seq_len} tokens: give more text or a shorter sequence length.")
    return torch.tensor(blocks, dtype=torch.long)


_NAMES = ["amber", "birch", "cobalt", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper", "kestrel",
          "lagoon", "meadow", "nimbus", "orchid", "pepper", "quartz", "raven", "saffron", "tundra", "umber", "violet"]
# (statement, question, answer) templates; {name} is a key word, {value} a number
_FACT_TEMPLATES = [
    ("The {name} code is {value}. Keep the {name} code in mind.", "What is the {name} code? The {name} code is", " {value}."),
    ("Note: the {name} number is {value}.", "Question: what is the {name} number? Answer: the {name} number is", " {value}."),
    ("Remember this: {name} = {value}.", "Recall the value of {name}. {name} =", " {value}."),
    ("The secret word for {name} is {value}. {value} is the secret for {name}.",
     "What is the secret for {name}? The secret for {name} is", " {value}."),
]
_PLAIN_FILLER = [
    "The river runs past the old mill.", "Leaves fall in the autumn wind.", "A cat sleeps on the warm stones.",
    "The road bends toward the hills.", "Clouds drift over the quiet town.", "Bread is baked every morning.",
    "The clock in the square strikes noon.", "Boats rest in the harbor at night.",
]


def _filler_tokens(tokenizer, filler_docs, budget: int, rng: random.Random) -> list[int]:
    if rng.random() < 0.5:
        # repetitive plain sentences, the usual haystack of retrieval probes
        sentences = rng.sample(_PLAIN_FILLER, rng.randint(2, 5))
        unit = tokenizer(" " + " ".join(sentences))["input_ids"]
        return (unit * (budget // max(len(unit), 1) + 1))[:budget]
    filler = []
    while len(filler) < budget:
        filler.extend(tokenizer(rng.choice(filler_docs))["input_ids"])
    return filler[:budget]


def retrieval_sample(tokenizer, filler_docs: list[str], seq_len: int, rng: random.Random) -> list[int]:
    """One `seq_len`-token sample: filler (repetitive sentences or real text) with 1-3 keyed facts inside, then
    a question about one of them and its answer, which can only be predicted by looking far back."""
    return _retrieval_sample(tokenizer, filler_docs, seq_len, rng)[0]


def _retrieval_sample(tokenizer, filler_docs, seq_len: int, rng: random.Random) -> tuple[list[int], int]:
    """(sample, number of answer tokens at its end)."""
    statement, question, answer = rng.choice(_FACT_TEMPLATES)
    facts = {name: str(rng.randint(10, 99999)) for name in rng.sample(_NAMES, rng.randint(1, 3))}
    asked = rng.choice(list(facts))
    asked_text = "\n" + question.format(name=asked)
    tail = tokenizer(asked_text + answer.format(value=facts[asked]))["input_ids"]
    answer_length = max(len(tail) - len(tokenizer(asked_text)["input_ids"]), 1)
    pieces = [tokenizer("\n" + statement.format(name=name, value=value) + "\n")["input_ids"] for name, value in facts.items()]
    budget = seq_len - len(tail) - sum(len(p) for p in pieces)
    if budget < 16:
        raise DataError(
            f"seq_len = {seq_len} is too short for retrieval samples: their facts and question take "
            f"{seq_len - budget} tokens with this tokenizer; use sequences of at least {seq_len - budget + 64} tokens."
        )
    filler = _filler_tokens(tokenizer, filler_docs, budget, rng)
    cuts = sorted(rng.randint(0, budget) for _ in pieces)
    ids, last = [], 0
    for cut, piece in zip(cuts, pieces):
        ids += filler[last:cut] + piece
        last = cut
    ids += filler[last:] + tail
    return ids[:seq_len], answer_length


def training_blocks(tokenizer, documents: list[str], seq_len: int, num_blocks: int, retrieval_share: float, seed: int):
    """`[num_blocks, seq_len]` token blocks: packed text, with a `retrieval_share` of synthetic retrieval samples."""
    return training_blocks_with_answers(tokenizer, documents, seq_len, num_blocks, retrieval_share, seed)[0]


def training_blocks_with_answers(tokenizer, documents, seq_len: int, num_blocks: int, retrieval_share: float,
                                 seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`training_blocks` and a `[num_blocks, seq_len]` bool mask, True at the positions that predict an answer
    token of a retrieval sample (the position before each answer token)."""
    if not 0.0 <= retrieval_share <= 1.0:
        raise DataError(f"retrieval_share = {retrieval_share}: expected a fraction in [0, 1].")
    n_retrieval = round(num_blocks * retrieval_share)
    text = pack(tokenizer, documents, seq_len, num_blocks - n_retrieval, seed) if num_blocks > n_retrieval else None
    rng = random.Random(f"retrieval-{seed}-{seq_len}")
    samples = [_retrieval_sample(tokenizer, documents, seq_len, rng) for _ in range(n_retrieval)]
    parts = ([text] if text is not None else []) + ([torch.tensor([ids for ids, _ in samples])] if samples else [])
    blocks = torch.cat(parts)
    answers = torch.zeros_like(blocks, dtype=torch.bool)
    first = 0 if text is None else text.shape[0]
    for row, (_, length) in enumerate(samples, start=first):
        answers[row, seq_len - length - 1 : seq_len - 1] = True
    order = torch.randperm(blocks.shape[0], generator=torch.Generator().manual_seed(seed))
    return blocks[order], answers[order]
