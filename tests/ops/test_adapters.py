import pytest
import torch

from qlora_fast.ops.adapters import adapters_in, stacked_rows


def test_adapters_are_cast_into_one_buffer_in_order():
    a_q, a_k, b_q = torch.randn(16, 96), torch.randn(8, 96), torch.randn(40, 16)
    copies = adapters_in(torch.bfloat16, a_q, a_k, b_q)
    for copy, source in zip(copies, (a_q, a_k, b_q)):
        assert copy.dtype == torch.bfloat16 and torch.equal(copy, source.to(torch.bfloat16))
    assert len({c.untyped_storage().data_ptr() for c in copies}) == 1
    stacked = stacked_rows(copies[:2])
    assert stacked.shape == (24, 96) and torch.equal(stacked, torch.cat(copies[:2]))
    assert stacked.untyped_storage().data_ptr() == copies[0].untyped_storage().data_ptr()  # a view


def test_stacked_rows_refuses_matrices_that_are_not_adjacent():
    first, second = adapters_in(torch.float32, torch.randn(4, 8), torch.randn(4, 8))
    with pytest.raises(ValueError, match="not adjacent"):
        stacked_rows((second, first))
    with pytest.raises(ValueError, match="not adjacent"):
        stacked_rows((torch.randn(4, 8), torch.randn(4, 8)))
