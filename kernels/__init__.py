"""Triton kernels for hf_effattn's mixers (installed as `hf_effattn.kernels`).

Each op has a pure-PyTorch reference in `hf_effattn.ops_reference`; the mixers fall back to it when Triton or a
GPU is missing.
"""
