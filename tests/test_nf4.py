import copy

import pytest
import torch

from qlora_fast.nf4 import cached_nf4_weight
from qlora_fast.testing import make_nf4_linear


def test_cached_weight_is_reused_until_its_bytes_or_state_change():
    weight = make_nf4_linear(64, 128).weight
    first = cached_nf4_weight(weight)
    assert cached_nf4_weight(weight) is first

    weight.quant_state = copy.copy(weight.quant_state)  # as FSDP re-attaches a state
    second = cached_nf4_weight(weight)
    assert second is not first and second.absmax is weight.quant_state.absmax

    weight.data = weight.data.clone()  # new bytes, e.g. after resharding
    third = cached_nf4_weight(weight)
    assert third is not second and third.packed.data_ptr() == weight.data_ptr()


def test_unsupported_weight_caches_none():
    weight = make_nf4_linear(64, 128, quant_type="fp4").weight
    assert cached_nf4_weight(weight) is None and cached_nf4_weight(weight) is None


@pytest.mark.parametrize("nested", [True, False])
def test_row_ranges_dequantize_as_their_rows(nested):
    from qlora_fast.kernels.nf4_dequantize import nf4_dequantize
    from qlora_fast.nf4 import nf4_rows, nf4_weight_from_bnb

    weight = nf4_weight_from_bnb(make_nf4_linear(1024, 32, torch.bfloat16, nested).weight)  # 2 rows a block
    whole = nf4_dequantize(weight)
    for start, stop in ((0, 512), (512, 1024)):  # 256 blocks each: one block of absmax codes
        assert torch.equal(nf4_dequantize(nf4_rows(weight, start, stop)), whole[start:stop])
    assert nf4_rows(weight, 1, 1024) is None  # row 1 starts mid-block
    rows = nf4_rows(weight, 256, 1024)  # block 128: mid absmax-code block when nested
    assert rows is None if nested else torch.equal(nf4_dequantize(rows), whole[256:])
