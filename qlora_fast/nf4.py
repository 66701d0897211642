"""The tensors that describe one bitsandbytes NF4 weight, as bitsandbytes stores them."""

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class NF4Weight:
    """A `bnb.nn.Params4bit` NF4 weight of logical shape (out_features, in_features).

    Element i of the row-major weight is nibble i of `packed` (even i in the high nibble), scaled by
    the absmax of block i // blocksize. With double quantization (`nested`), that absmax is itself
    stored as uint8 codes: absmax[b] = code2[absmax_q[b]] * absmax2[b // blocksize2] + offset.
    """

    packed: torch.Tensor  # uint8, ceil(numel / 2) bytes
    absmax: torch.Tensor  # fp32 per block, or uint8 codes when nested
    code: torch.Tensor  # fp32[16], the NF4 values
    blocksize: int
    shape: tuple  # (out_features, in_features)
    dtype: torch.dtype  # the dtype bitsandbytes dequantizes to
    absmax2: torch.Tensor | None = None
    code2: torch.Tensor | None = None
    offset: torch.Tensor | None = None  # 0-dim fp32 tensor: read on device, never with .item()
    blocksize2: int = 256

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    @cached_property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @cached_property
    def device(self) -> torch.device:  # a tensor's .device builds a new torch.device per read
        return self.packed.device

    @cached_property
    def launches(self) -> dict:
        """The dequantize kernel's launches on this weight, kept for relaunching: (dtype, launch
        parameters) -> kernels._utils.Relaunch, or None where a launch cannot be relaunched."""
        return {}

    @cached_property
    def output_templates(self) -> dict:
        """dtype -> a one-element tensor on the weight's device, expanded (stride 0) to its shape: outputs are
        allocated as `torch.empty_like` of it (kernels/nf4_dequantize.py `new_output`)."""
        return {}

    def kernel_tensors(self) -> tuple:
        """(packed, code, absmax, absmax2, code2, offset) as the kernels take them. Without double
        quantization the last three are unread, so absmax stands in for them."""
        return self._kernel_tensors

    @cached_property
    def _kernel_tensors(self) -> tuple:  # built once: every layer call launches with them
        if self.numel >= 2**31:
            raise ValueError(f"NF4 weight of {self.numel} elements exceeds the kernels' 32-bit indexing")
        scales = (self.absmax2, self.code2, self.offset) if self.nested else (self.absmax,) * 3
        return self.packed, self.code, self.absmax, *scales


def nf4_rows(weight: NF4Weight, start: int, stop: int) -> NF4Weight | None:
    """Rows start:stop of `weight` as an NF4Weight of views (no copy), or None where they do not begin and
    end on a quantization block (and, double-quantized, on a block of absmax codes): a fused projection's
    halves (Phi-3's gate_up_proj) dequantize on their own only then."""
    width = weight.shape[1]
    first, end = start * width, stop * width
    blocks = (first // weight.blocksize, -(-end // weight.blocksize))
    if first % weight.blocksize or (end % weight.blocksize and stop != weight.shape[0]):
        return None
    if weight.nested and blocks[0] % weight.blocksize2:
        return None
    nested = {}
    if weight.nested:
        nested = dict(absmax2=weight.absmax2[blocks[0] // weight.blocksize2:-(-blocks[1] // weight.blocksize2)],
                      code2=weight.code2, offset=weight.offset, blocksize2=weight.blocksize2)
    return NF4Weight(packed=weight.packed[first // 2:-(-end // 2)], absmax=weight.absmax[blocks[0]:blocks[1]],
                     code=weight.code, blocksize=weight.blocksize, shape=(stop - start, width), dtype=weight.dtype,
                     **nested)


def unsupported_reason(weight) -> str | None:
    """Why `weight` (a bnb Params4bit) cannot be served as NF4, or None if it can."""
    state = getattr(weight, "quant_state", None)
    if state is None:
        return "weight is not quantized"
    if getattr(state, "packing_format_for_cpu", False):
        return "weight repacked by bitsandbytes' CPU inference path"
    if state.quant_type != "nf4":
        return f"quant_type {state.quant_type} (only nf4)"
    if len(state.shape) != 2:
        return f"weight of {len(state.shape)} dims"
    if state.nested and state.state2.absmax.dtype != torch.float32:
        return "nested absmax not float32"
    return None


def nf4_weight_from_bnb(weight) -> NF4Weight:
    """Reads a `bnb.nn.Params4bit` (NF4, nested or not, any quant_storage) without copying."""
    state = weight.quant_state
    packed = weight.data.view(torch.uint8).reshape(-1)  # FSDP-QLoRA stores the bytes as bf16/fp32
    nested = {}
    if state.nested:
        nested = dict(
            absmax2=state.state2.absmax,
            code2=state.state2.code,
            offset=state.offset,
            blocksize2=state.state2.blocksize,
        )
    return NF4Weight(
        packed=packed,
        absmax=state.absmax,
        code=state.code,
        blocksize=state.blocksize,
        shape=tuple(state.shape),
        dtype=state.dtype,
        **nested,
    )


_CACHE = "_qlora_fast_nf4"


def cached_nf4_weight(weight) -> NF4Weight | None:
    """nf4_weight_from_bnb(weight), or None where `unsupported_reason` refuses it, kept on the weight for
    as long as its bytes and quant state stay the same objects (FSDP and `.to()` replace them). Saves the
    per-call checks and dataclass build: a few microseconds, on the host, per layer call."""
    state = getattr(weight, "quant_state", None)
    cached = getattr(weight, _CACHE, None)
    with torch._C.DisableTorchFunctionSubclass():  # Params4bit's __torch_function__ costs more than the read
        address = weight.data_ptr()
    if cached is not None and cached[0] is state and cached[1] == address:
        return cached[2]
    nf4 = None if unsupported_reason(weight) is not None else nf4_weight_from_bnb(weight)
    setattr(weight, _CACHE, (state, address, nf4))
    return nf4
