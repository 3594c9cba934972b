"""The pieces the mixers share: the padding summary of a 2-D attention mask and the Triton/reference dispatch."""

import torch

from hf_effattn.mixer_common import Padding, TritonOps


def test_padding_of_left_and_right_padded_rows():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    padding = Padding(mask, batch=2, seq_len=2, device="cpu")
    assert padding.first_real.tolist() == [2, 0]
    assert padding.bounds.tolist() == [[2, 5], [0, 3]]
    assert not padding.left_only
    assert padding.current.tolist() == [[True, True], [False, False]]
    assert padding.length == 5


def test_padding_of_rows_that_are_not_one_run():
    padding = Padding(torch.tensor([[1, 0, 1, 1], [0, 1, 1, 1]]), batch=2, seq_len=4, device="cpu")
    assert padding.bounds is False
    assert not padding.left_only
    assert padding.first_real.tolist() == [0, 1]


def test_padding_without_padding():
    for mask in (None, torch.ones(3, 6, dtype=torch.long)):
        padding = Padding(mask, batch=3, seq_len=1, device="cpu")
        assert padding.first_real.tolist() == [0, 0, 0]
        assert padding.current is None and padding.bounds is None and padding.left_only
    # only the current tokens are real: the earlier padding still counts for the bounds
    padding = Padding(torch.tensor([[0, 1, 1]]), batch=1, seq_len=2, device="cpu")
    assert padding.current is None and padding.bounds.tolist() == [[1, 3]] and padding.left_only


def test_triton_ops_import_once_and_fall_back_to_the_reference():
    calls = []

    def load():
        calls.append(1)
        raise ImportError("No module named 'triton'")

    ops = TritonOps("test", load)
    x = torch.zeros(2)
    assert ops.get() is None and ops.get() is None and len(calls) == 1
    assert not ops.use(x, None)
    assert ops.use(x, "triton") and not ops.use(x, "reference")


def test_triton_ops_keep_what_they_imported():
    ops = TritonOps("test", lambda: ("prefill", "decode"))
    assert ops.ops is None
    assert ops.get() == ("prefill", "decode") and ops.ops == ("prefill", "decode")
    # CPU tensors run the reference unless forced
    assert not ops.use(torch.zeros(2), None)
