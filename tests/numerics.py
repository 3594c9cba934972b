"""Error measures shared by the tests (no triton needed)."""

import torch


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """rms(actual - expected) / rms(expected), in fp64."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt().clamp_min(1e-300)).item()


def max_rel_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|actual - expected| / max|expected|."""
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()
