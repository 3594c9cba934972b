"""Measuring hybrids against their teachers (installed as `hf_effattn.evaluation`)."""
