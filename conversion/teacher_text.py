"""Text the teacher writes itself: documents sampled from seeded prompts, cached in the work folder.

A prompt pairs an instruction with a topic (`teacher_prompts`); the teacher answers it with sampling, through its
chat template when it has one, and the document is the whole exchange as the template renders it. Documents are
generated in batches, each with a seed of its own, so a batch never depends on another: the processes of a
multi-process run share the batches out, and a rerun generates only the batches that its work folder lacks.
"""

import math
import random

import torch
from transformers import GenerationConfig

GENERATION_BATCH = 16  # prompts per generate() call
TEMPERATURE, TOP_P, TOP_K = 0.8, 0.95, 50

_INSTRUCTIONS = [
    "Write a short story about {topic}.",
    "Explain {topic} to someone who has never heard of it.",
    "Write a short Python program about {topic}, then explain how it works.",
    "List five facts about {topic}, one sentence each.",
    "Write a dialogue between two friends who disagree about {topic}.",
    "Summarise what people should know about {topic} in one paragraph.",
    "Write an email to a colleague asking for help with {topic}.",
    "Give step-by-step instructions for a beginner project involving {topic}.",
    "Write a poem about {topic}.",
    "Answer the question: why does {topic} matter? Give three reasons.",
    "Write a news report about a surprising discovery in {topic}.",
    "Compare two different approaches to {topic} and say which you prefer.",
]
_TOPICS = [
    "the water cycle", "baking bread", "sorting algorithms", "the Roman empire", "volcanoes", "learning a language",
    "bicycles", "prime numbers", "bees and pollination", "writing unit tests", "the night sky", "saving money",
    "ocean currents", "chess openings", "photosynthesis", "train timetables", "recursion", "ancient Egypt",
    "growing tomatoes", "the immune system", "databases", "mountain hiking", "climate and weather", "jazz music",
    "electric circuits", "a small village market", "maps and navigation", "friendship", "the printing press",
    "regular expressions",
]


def teacher_prompts(count: int, seed: int) -> list[str]:
    """`count` prompts, each an instruction about a topic, the same for the same seed."""
    rng = random.Random(f"teacher-prompts-{seed}")
    return [rng.choice(_INSTRUCTIONS).format(topic=rng.choice(_TOPICS)) for _ in range(count)]


def _render(tokenizer, prompt: str, response: str | None = None) -> str:
    """The prompt (and the response) as the teacher sees them: its chat template, or plain text without one."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        if response is not None:
            messages.append({"role": "assistant", "content": response})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=response is None)
    return f"{prompt}\n\n" + (response or "")


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: list[str], max_new_tokens: int, seed: int) -> list[str]:
    """One sampled answer to each prompt, batched with left padding; returns the rendered exchanges."""
    templated = bool(getattr(tokenizer, "chat_template", None))
    # a chat template writes its own special tokens
    rows = [tokenizer(_render(tokenizer, p), add_special_tokens=not templated)["input_ids"] for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(row) for row in rows)
    device = next(model.parameters()).device
    input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows], device=device)
    attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], device=device)
    eos = {tokenizer.eos_token_id}
    configured = model.generation_config.eos_token_id
    eos |= set(configured if isinstance(configured, list) else [configured])
    config = GenerationConfig(do_sample=True, temperature=TEMPERATURE, top_p=TOP_P, top_k=TOP_K,
                              max_new_tokens=max_new_tokens, pad_token_id=pad,
                              eos_token_id=sorted(e for e in eos if e is not None))
    # sampling draws from the global generator: seed it for this batch, and leave it as it was for training
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    answers = tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
    return [_render(tokenizer, prompt, answer.strip()) for prompt, answer in zip(prompts, answers)]


def teacher_documents(model, tokenizer, count: int, max_new_tokens: int, seed: int, workdir, accelerator=None,
                      batch_size: int = GENERATION_BATCH, progress=None) -> list[str]:
    """`count` documents written by the teacher, read from `workdir` where an earlier run wrote them.

    With an `accelerator`, each process generates every world-th batch and all of them wait for the others."""
    world, rank = (accelerator.num_processes, accelerator.process_index) if accelerator is not None else (1, 0)
    prompts = teacher_prompts(count, seed)
    names = [f"teacher-text-{k:05d}.json" for k in range(math.ceil(count / batch_size))]
    for k, name in enumerate(names):
        if k % world == rank and workdir.read_json(name) is None:
            chunk = prompts[k * batch_size : (k + 1) * batch_size]
            workdir.write_json(name, generate_batch(model, tokenizer, chunk, max_new_tokens, seed * 1_000_003 + k))
        if progress is not None:
            progress.update(1)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return [document for name in names for document in workdir.read_json(name)]
