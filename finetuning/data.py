"""Fine-tuning data: JSONL records checked line by line, tokenized with labels, split, packed and batched.

One JSON object per line, in either format (a file may mix them):

- `{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}`: rendered with the tokenizer's
  chat template; the loss covers the assistant turns only.
- `{"text": "..."}`: plain text followed by the end-of-sequence token; the loss covers every token.

Assistant turns are located by rendering prefixes of the conversation: turn `i` spans from the end of
`render(messages[:i], add_generation_prompt=True)` to the end of `render(messages[:i + 1])`, so the span holds the
reply and the template's end-of-turn marker (the model learns to stop). The text between span boundaries is
tokenized piece by piece, so a prompt gets exactly the tokens it gets at generation time. A template that rewrites
earlier turns when a later one is added (every prefix must start the full rendering) is refused with an error.
"""

import hashlib
import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100
MESSAGES_EXAMPLE = '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}'
TEXT_EXAMPLE = '{"text": "Some text to learn."}'
FORMATS = f"one JSON object per line, either {MESSAGES_EXAMPLE} or {TEXT_EXAMPLE}"


class FinetuneDataError(ValueError):
    pass


@dataclass
class Example:
    input_ids: list[int]
    # the target of each position (IGNORE_INDEX: no loss); position 0 is never a target
    labels: list[int]


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _check_messages(messages, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise FinetuneDataError(f"{where}: 'messages' must be a non-empty list of turns, e.g. {MESSAGES_EXAMPLE}.")
    for index, turn in enumerate(messages):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise FinetuneDataError(
                f"{where}: messages[{index}] must be an object with 'role' and 'content', got {json.dumps(turn)[:80]}."
            )
        if turn["role"] not in ROLES:
            raise FinetuneDataError(
                f"{where}: messages[{index}] has role {turn['role']!r}; allowed roles: {', '.join(ROLES)}."
            )
        if not isinstance(turn["content"], str):
            raise FinetuneDataError(f"{where}: messages[{index}]['content'] must be a string.")
    if messages[0]["role"] == "assistant":
        raise FinetuneDataError(f"{where}: messages[0] is an assistant turn: start with a user (or system) turn.")
    if not any(turn["role"] == "assistant" for turn in messages):
        raise FinetuneDataError(
            f"{where}: the conversation has no assistant turn, so nothing would be learned from it: add the reply "
            "as {\"role\": \"assistant\", \"content\": \"...\"}."
        )


def check_record(record, where: str) -> None:
    """Raises FinetuneDataError naming `where` when `record` is neither a messages nor a text record."""
    if not isinstance(record, dict):
        raise FinetuneDataError(f"{where}: expected a JSON object, got {type(record).__name__}. Expected {FORMATS}.")
    if "messages" in record and "text" in record:
        raise FinetuneDataError(f"{where}: a record has either 'messages' or 'text', not both.")
    if "messages" in record:
        _check_messages(record["messages"], where)
    elif "text" in record:
        if not isinstance(record["text"], str) or not record["text"].strip():
            raise FinetuneDataError(f"{where}: 'text' must be a non-empty string.")
    else:
        raise FinetuneDataError(
            f"{where}: the record has neither a 'messages' list nor a 'text' string (keys: {sorted(record)}). "
            f"Expected {FORMATS}."
        )


def read_jsonl(path: str | Path) -> list[dict]:
    """Every record of a JSONL file, checked; raises FinetuneDataError naming the line of the first bad record."""
    path = Path(path)
    if not path.is_file():
        raise FinetuneDataError(f"{path} does not exist or is not a file: expected a JSONL file with {FORMATS}.")
    records = []
    with path.open(encoding="utf-8") as handle:
        try:
            lines = list(handle)
        except UnicodeDecodeError as error:
            raise FinetuneDataError(f"{path} is not UTF-8 text ({error.reason}): expected a JSONL file.") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise FinetuneDataError(
                f"{path}, line {number}: not valid JSON ({error.msg}, column {error.colno}). Expected {FORMATS}."
            ) from None
        check_record(record, f"{path}, line {number}")
        records.append(record)
    if not records:
        raise FinetuneDataError(f"{path} holds no records: expected {FORMATS}.")
    return records


def check_chat_template(tokenizer, records: list[dict], source: str) -> None:
    if any("messages" in record for record in records) and not getattr(tokenizer, "chat_template", None):
        raise FinetuneDataError(
            f"{source} holds chat 'messages' but the model's tokenizer has no chat template to render them. Add one "
            "to the model folder (set tokenizer.chat_template, then tokenizer.save_pretrained(folder)) or write the "
            f"records as {TEXT_EXAMPLE}."
        )


def _render(tokenizer, messages: list[dict], generation_prompt: bool, where: str) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except TemplateError as error:
        # e.g. a template whose roles must alternate
        raise FinetuneDataError(f"{where}: the chat template refused the conversation: {error}") from None


def assistant_spans(tokenizer, messages: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the `(start, end)` character span of every assistant turn in it."""
    full = _render(tokenizer, messages, False, where)
    spans = []
    for index, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:index], True, where)
        through = _render(tokenizer, messages[: index + 1], False, where)
        if not (full.startswith(through) and through.startswith(prompt)):
            raise FinetuneDataError(
                f"{where}: the chat template renders earlier turns differently once later turns follow (it is not "
                "prefix-stable), so the assistant tokens cannot be located. Use a template that renders each turn "
                "the same way whatever follows, or plain 'text' records."
            )
        spans.append((len(prompt), len(through)))
    return full, spans


def tokenize_messages(tokenizer, messages: list[dict], where: str) -> Example:
    full, spans = assistant_spans(tokenizer, messages, where)
    cuts = sorted({0, len(full), *(bound for span in spans for bound in span)})
    starts = {start for start, _ in spans}
    ids, labels = [], []
    for start, end in itertools.pairwise(cuts):
        piece = tokenizer(full[start:end], add_special_tokens=False)["input_ids"]
        inside = any(s <= start and end <= e for s, e in spans)
        ids += piece
        labels += piece if inside else [IGNORE_INDEX] * len(piece)
        if start in starts and not piece:
            raise FinetuneDataError(f"{where}: an assistant turn renders to no tokens.")
    return Example(ids, labels)


def tokenize_text(tokenizer, text: str) -> Example:
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids = ids + [tokenizer.eos_token_id]
    return Example(ids, list(ids))


def truncate_examples(examples: list[Example], max_length: int, source: str) -> tuple[list[Example], int, int]:
    """Examples cut to `max_length` tokens, those left with no target dropped: (examples, truncated, dropped)."""
    kept, truncated, dropped = [], 0, 0
    for example in examples:
        if len(example.input_ids) > max_length:
            truncated += 1
            example = Example(example.input_ids[:max_length], example.labels[:max_length])
        if all(label == IGNORE_INDEX for label in example.labels[1:]):
            dropped += 1
            continue
        kept.append(example)
    if not kept:
        raise FinetuneDataError(
            f"{source}: no record keeps a token to learn within max_length = {max_length} (assistant replies start "
            "after the cut): raise --max-length."
        )
    return kept, truncated, dropped


def tokenize_records(tokenizer, records: list[dict], max_length: int | None, source: str) -> tuple[list[Example], dict]:
    """Examples cut to `max_length` tokens (None: uncut); those left with no target are dropped.

    Returns (examples, counts)."""
    check_chat_template(tokenizer, records, source)
    examples = [
        tokenize_messages(tokenizer, record["messages"], f"{source}, record {number}")
        if "messages" in record
        else tokenize_text(tokenizer, record["text"])
        for number, record in enumerate(records, start=1)
    ]
    truncated = dropped = 0
    if max_length is not None:
        examples, truncated, dropped = truncate_examples(examples, max_length, source)
    counts = {"records": len(records), "examples": len(examples), "truncated": truncated, "dropped": dropped}
    return examples, counts


def split_examples(examples: list[Example], eval_share: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, eval): a seeded random `eval_share` of the examples (at least one when the share is positive)."""
    if eval_share <= 0:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    count = max(1, round(eval_share * len(examples)))
    if count >= len(examples):
        raise FinetuneDataError(
            f"eval_share = {eval_share} of {len(examples)} examples leaves none for training: lower --eval-share or "
            "add examples."
        )
    held_out = set(order[:count])
    train = [example for i, example in enumerate(examples) if i not in held_out]
    return train, [example for i, example in enumerate(examples) if i in held_out]


def pack_examples(examples: list[Example], block_length: int) -> list[Example]:
    """Concatenates the examples and cuts the stream into blocks of `block_length` tokens (the last may be shorter).

    The first token of every example is no target, so no example learns to follow the one before it. An example
    still attends to the examples before it in its block (the recurrent state of linear mixers carries over), as
    in pretraining on concatenated documents.
    """
    ids, labels = [], []
    for example in examples:
        ids += example.input_ids
        labels += [IGNORE_INDEX] + example.labels[1:]
    return [Example(ids[i : i + block_length], labels[i : i + block_length]) for i in range(0, len(ids), block_length)]


def collate(examples: list[Example], pad_token_id: int) -> dict:
    """Right-padded `[B, T]` input_ids, attention_mask and labels (IGNORE_INDEX on padding)."""
    length = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        size = len(example.input_ids)
        input_ids[row, :size] = torch.tensor(example.input_ids)
        labels[row, :size] = torch.tensor(example.labels)
        attention_mask[row, :size] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def count_targets(labels: torch.Tensor) -> int:
    """Positions that carry a loss (the first position of a row never does)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
