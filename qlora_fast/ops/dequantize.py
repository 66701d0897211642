"""`dequantize_nf4`: the public NF4 dequantization, eager and torch.compile-traceable."""

import torch

from ..kernels.nf4_dequantize import nf4_dequantize
from ..nf4 import NF4Weight, cached_nf4_weight, nf4_weight_from_bnb, unsupported_reason


@torch.library.custom_op("qlora_fast::dequantize_nf4", mutates_args=())
def _dequantize_nf4_op(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                       absmax2: torch.Tensor | None, code2: torch.Tensor | None, offset: torch.Tensor | None,
                       blocksize: int, blocksize2: int, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    weight = NF4Weight(packed=packed, absmax=absmax, code=code, blocksize=blocksize, shape=tuple(shape),
                       dtype=dtype, absmax2=absmax2, code2=code2, offset=offset, blocksize2=blocksize2)
    return nf4_dequantize(weight, dtype)


@_dequantize_nf4_op.register_fake
def _(packed, absmax, code, absmax2, code2, offset, blocksize, blocksize2, shape, dtype):
    return packed.new_empty(shape, dtype=dtype)


def dequantize_nf4(weight, quant_state=None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantizes a bitsandbytes NF4 weight; bit-exact with `bitsandbytes.functional.dequantize_4bit`.

    `weight` is a `bnb.nn.Linear4bit`, its `Params4bit` weight, or the packed data with `quant_state`
    given; `dtype` defaults to the quant state's. No host sync. Eager calls launch the kernel straight
    from a view of the weight cached on it (a few microseconds of host time); under `torch.compile` the
    call is a custom op the compiler traces.
    """
    if isinstance(weight, torch.nn.Module):  # the parameter dict read directly: nn.Module's lookup is slower
        weight = weight._parameters["weight"] if "weight" in weight._parameters else weight.weight
    if quant_state is not None:
        weight = _WithState(weight, quant_state)
    if torch.compiler.is_compiling():
        _raise_if_unsupported(weight)
        w = nf4_weight_from_bnb(weight)
        return _dequantize_nf4_op(w.packed, w.absmax, w.code, w.absmax2, w.code2, w.offset, w.blocksize,
                                  w.blocksize2, list(w.shape), dtype or w.dtype)
    w = cached_nf4_weight(weight) if quant_state is None else None
    if w is None:
        _raise_if_unsupported(weight)
        w = nf4_weight_from_bnb(weight)
    return nf4_dequantize(w, dtype or weight.quant_state.dtype)  # the state's dtype may be set after caching


def _raise_if_unsupported(weight) -> None:
    reason = unsupported_reason(weight)
    if reason is not None:
        raise ValueError(f"dequantize_nf4: unsupported weight: {reason}")


class _WithState:
    """Packed data plus a QuantState, read like a Params4bit."""

    def __init__(self, data: torch.Tensor, quant_state):
        self.data = data
        self.quant_state = quant_state
