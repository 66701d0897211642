import copy

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
