"""Direct measurements on a loaded model, without lm-eval: passkey accuracy and perplexity on held-out text.

Used by the conversion report and the fast checks; `hf-effattn eval` runs the same probes through lm-eval.
"""

import math

import torch

from .synthetic import passkey_correct, passkey_samples


@torch.no_grad()
def greedy_continuation(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(model.device)
    output = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    return tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)


def passkey_accuracy(model, tokenizer, lengths, num_samples: int = 6, seed: int = 0, max_new_tokens: int = 8) -> dict:
    """{length: {"correct": n, "total": m, "accuracy": n / m}} over `num_samples` needle depths per length."""
    results = {}
    for length in lengths:
        samples = passkey_samples(tokenizer, length, num_samples, seed)
        correct = sum(
            passkey_correct(greedy_continuation(model, tokenizer, s["prompt"], max_new_tokens), s["answer"])
            for s in samples
        )
        results[int(length)] = {"correct": correct, "total": len(samples), "accuracy": correct / len(samples)}
    return results


@torch.no_grad()
def perplexity(model, token_blocks: torch.Tensor, batch_size: int = 1) -> float:
    """exp(mean next-token loss) over `[N, T]` blocks of token ids (every position after the first is scored)."""
    if token_blocks.dim() != 2 or token_blocks.shape[1] < 2:
        raise ValueError(f"token_blocks must be [N, T] with T >= 2, got shape {tuple(token_blocks.shape)}.")
    total, count = 0.0, 0
    for start in range(0, token_blocks.shape[0], batch_size):
        batch = token_blocks[start : start + batch_size].to(model.device)
        logits = model(batch, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += batch[:, 1:].numel()
    return math.exp(total / count)
