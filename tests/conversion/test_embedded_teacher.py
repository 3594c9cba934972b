"""The real embedded teacher (SmolLM2-135M-Instruct from its GGUF file) through our weight map and pipeline."""

import pytest
import torch
from transformers import pipeline

from hf_effattn.checkpoint import save_checkpoint
from hf_effattn.conversion import effattn_from_teacher, select_full_layers

pytestmark = pytest.mark.teacher


def test_all_full_matches_teacher_logits(embedded_teacher):
    model, tokenizer = embedded_teacher
    hybrid, new_parameters = effattn_from_teacher(model)
    assert new_parameters == [] and hybrid.config.mixer_types == ["full"] * 30
    text = ["The grass is green. The sky is blue. The sun is yellow. " * 12, "Paris is the capital of"]
    # left padding for this call only: the tokenizer is shared with the other tests
    batch = tokenizer(text, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        expected = model(**batch).logits
        got = hybrid(**batch).logits
    real = batch["attention_mask"].bool()
    assert (got[real] - expected[real]).abs().max().item() <= 1e-4


def test_hybrid_pipeline_and_generation(embedded_teacher, tmp_path):
    model, tokenizer = embedded_teacher
    mixer_types = ["full" if i in select_full_layers(30, 0.25) else "gdn" for i in range(30)]
    hybrid, _ = effattn_from_teacher(model, mixer_types=mixer_types)
    folder = save_checkpoint(hybrid, tmp_path / "hybrid", tokenizer)
    generator = pipeline("text-generation", model=str(folder), trust_remote_code=True)
    out = generator("The capital of France is", max_new_tokens=5, do_sample=False)
    assert out[0]["generated_text"].startswith("The capital of France is")
    # greedy generation through the pipeline equals the in-package model's
    ids = tokenizer("The capital of France is", return_tensors="pt")
    direct = hybrid.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out[0]["generated_text"] == tokenizer.decode(direct[0], skip_special_tokens=True)
