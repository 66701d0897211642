"""NF4 -> fp16/bf16/fp32 dequantization in one pass, double-quantized absmax decoded on the fly.

Each program takes a tile of whole quantization blocks: it decodes each block's scale once, reads the
packed bytes with wide loads, decodes both nibbles and writes the two values interleaved, so reads
and writes stay contiguous. Bit-exact with bitsandbytes: the same fp32
products, rounded once to the output dtype.

`nf4_dequantize` also writes into the columns of a wider matrix (`out` a view with a longer row stride:
the base weight of a GEMM whose K is widened to carry LoRA factors, ops/terms_in_gemm.py), whole
quantization blocks per row, so each block still lands contiguously.

`nf4_dequantize_stacked` writes several weights (an attention's q, k and v) one under the other in one
launch: the second grid axis picks the weight, whose tensors' addresses the program reads from a small
device table built once per group of weights. A launch costs the host ~15 us, and steps of a few
thousand tokens are bound by the host.
"""

import weakref

import torch
import triton
import triton.language as tl

from ..nf4 import NF4Weight
from ._utils import INTERPRETER_TILE, INTERPRETING, Relaunch, cdiv
from ._utils import round_fp32_to
from .nf4_decode import nf4_block_scale

# Launch parameters, fixed rather than autotuned: tuning at the first call of each weight shape costs a
# 256 MB cache-flush buffer while the model's memory is in use (it set the peak of a whole training run)
# and ~10 us of host time per launch. bench/seed_dequant.py and bench/kernel_timings.py time the candidates; the
# first is the default.
CANDIDATE_META = [
    {"BLOCKS_PER_PROGRAM": 64, "num_warps": 4},
    # 4 packed bytes a thread: the 16-byte stores need no layout change through shared memory (sm_90 PTX)
    {"BLOCKS_PER_PROGRAM": 64, "num_warps": 16},
    {"BLOCKS_PER_PROGRAM": 32, "num_warps": 8},
    {"BLOCKS_PER_PROGRAM": 16, "num_warps": 4},
    {"BLOCKS_PER_PROGRAM": 128, "num_warps": 32},
    {"BLOCKS_PER_PROGRAM": 32, "num_warps": 4},
    # two and four 16-byte loads a thread: more bytes in flight per program
    {"BLOCKS_PER_PROGRAM": 128, "num_warps": 4},
    {"BLOCKS_PER_PROGRAM": 256, "num_warps": 8},
    # the packed bytes read once and the output written once: neither is worth keeping in L2
    {"BLOCKS_PER_PROGRAM": 64, "num_warps": 4, "STREAMING": True},
]


@triton.jit
def _dequantize_blocks(pid, packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr,
                       n_elements, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                       SOFTWARE_RTNE: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr, WHOLE_BLOCKS: tl.constexpr,
                       STREAMING: tl.constexpr, blocks_per_row, out_row_stride, ROWS_STRIDED: tl.constexpr):
    # A tile of whole quantization blocks: one scale per row, decoded once and broadcast. With ROWS_STRIDED
    # each weight row of blocks_per_row blocks starts out_row_stride elements after the previous one.
    HALF: tl.constexpr = BLOCKSIZE // 2  # bytes per block
    block = pid * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
    block_mask = block * BLOCKSIZE < n_elements
    scale = nf4_block_scale(block, block_mask, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                            BLOCKSIZE2, NESTED)
    byte_idx = block[:, None] * HALF + tl.arange(0, HALF)[None, :]
    if ROWS_STRIDED:
        block_start = (block // blocks_per_row).to(tl.int64) * out_row_stride + (block % blocks_per_row) * BLOCKSIZE
    else:
        block_start = block * BLOCKSIZE
    out_idx = block_start[:, None] + tl.arange(0, BLOCKSIZE)[None, :]
    if WHOLE_BLOCKS:  # one mask per block: wide loads and stores
        byte_mask = block_mask[:, None]
        out_mask = block_mask[:, None]
    else:
        byte_mask = byte_idx < (n_elements + 1) // 2
        out_mask = out_idx < n_elements
    if STREAMING:
        byte = tl.load(packed_ptr + byte_idx, mask=byte_mask, other=0, eviction_policy="evict_first").to(tl.int32)
    else:
        byte = tl.load(packed_ptr + byte_idx, mask=byte_mask, other=0).to(tl.int32)
    high = tl.load(code_ptr + (byte >> 4)) * scale[:, None]
    low = tl.load(code_ptr + (byte & 15)) * scale[:, None]
    values = round_fp32_to(tl.interleave(high, low), out_ptr.dtype.element_ty, SOFTWARE_RTNE)
    if STREAMING:
        tl.store(out_ptr + out_idx, values, mask=out_mask, cache_modifier=".cs")
    else:
        tl.store(out_ptr + out_idx, values, mask=out_mask)


@triton.jit
def _nf4_dequantize_kernel(packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr,
                           n_elements, blocks_per_row, out_row_stride,
                           BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                           SOFTWARE_RTNE: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr, WHOLE_BLOCKS: tl.constexpr,
                           STREAMING: tl.constexpr, ROWS_STRIDED: tl.constexpr):
    _dequantize_blocks(tl.program_id(0), packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                       out_ptr, n_elements, BLOCKSIZE, BLOCKSIZE2, NESTED, SOFTWARE_RTNE, BLOCKS_PER_PROGRAM,
                       WHOLE_BLOCKS, STREAMING, blocks_per_row, out_row_stride, ROWS_STRIDED)


@triton.jit
def _nf4_dequantize_stacked_kernel(table_ptr, out_ptr, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr,
                                   NESTED: tl.constexpr, SOFTWARE_RTNE: tl.constexpr,
                                   BLOCKS_PER_PROGRAM: tl.constexpr, WHOLE_BLOCKS: tl.constexpr,
                                   STREAMING: tl.constexpr):
    # Weight program_id(1)'s table row: the addresses of its packed, code, absmax, absmax2, code2 and
    # offset tensors, where its rows start in out (in elements), and its element count.
    row = table_ptr + tl.program_id(1) * 8
    n_elements = tl.load(row + 7)
    if tl.program_id(0) * BLOCKS_PER_PROGRAM * BLOCKSIZE < n_elements:  # the grid spans the largest weight
        absmax_type: tl.constexpr = tl.uint8 if NESTED else tl.float32
        packed_ptr = tl.load(row + 0).to(tl.pointer_type(tl.uint8))
        out_start = tl.load(row + 6)
        if WHOLE_BLOCKS:  # checked on the host: the alignment that lets loads and stores be 16 bytes wide
            packed_ptr = tl.multiple_of(packed_ptr, 16)
            out_start = tl.multiple_of(out_start, 16)
        _dequantize_blocks(tl.program_id(0), packed_ptr,
                           tl.load(row + 1).to(tl.pointer_type(tl.float32)),
                           tl.load(row + 2).to(tl.pointer_type(absmax_type)),
                           tl.load(row + 3).to(tl.pointer_type(tl.float32)),
                           tl.load(row + 4).to(tl.pointer_type(tl.float32)),
                           tl.load(row + 5).to(tl.pointer_type(tl.float32)),
                           out_ptr + out_start, n_elements,
                           BLOCKSIZE, BLOCKSIZE2, NESTED, SOFTWARE_RTNE, BLOCKS_PER_PROGRAM, WHOLE_BLOCKS, STREAMING,
                           1, 0, False)


OUT_POSITION = 6  # out_ptr among _nf4_dequantize_kernel's arguments


def _launch_meta(meta: dict, blocksize: int) -> dict:
    """`meta`, or in the interpreter (which pays per program) programs of INTERPRETER_TILE elements."""
    return dict(meta, BLOCKS_PER_PROGRAM=INTERPRETER_TILE // blocksize) if INTERPRETING else meta


def new_output(templates: dict, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty(shape, dtype=dtype, device=device), contiguous, as `torch.empty_like` of a template kept in
    `templates` per dtype: a one-element tensor expanded to `shape`. empty_like takes shape, dtype and device
    from it instead of parsing them (about half of torch.empty's host time), and gives an overlapping
    (stride-0) input contiguous strides."""
    template = templates.get(dtype)
    if template is None:
        template = templates[dtype] = torch.empty(1, dtype=dtype, device=device).expand(shape)
    return torch.empty_like(template)


def _check_out(out: torch.Tensor, weight: NF4Weight, dtype: torch.dtype) -> bool:
    """Whether `out` (a valid output) has rows further apart than the weight's; raises for an invalid one:
    one not of the weight's shape and `dtype`, or whose rows are not contiguous, or strided rows that do
    not hold whole quantization blocks."""
    rows, cols = weight.shape
    if out.shape != weight.shape or out.dtype != dtype or (out.stride(1) != 1 and cols > 1) \
            or out.stride(0) < cols:
        raise ValueError(f"out must be a {tuple(weight.shape)} {dtype} tensor with contiguous rows")
    strided = out.stride(0) != cols and rows > 1
    if strided and cols % weight.blocksize:
        raise ValueError(f"out with strided rows needs rows of whole quantization blocks: {cols} columns "
                         f"are not a multiple of the blocksize {weight.blocksize}")
    return strided


def nf4_dequantize(weight: NF4Weight, dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
                   meta: dict = CANDIDATE_META[0]):
    """The (out_features, in_features) weight in `dtype` (default: the dtype bitsandbytes would give);
    `meta`: launch parameters, one of CANDIDATE_META. `out`, where given, may be the leading or trailing
    columns of a wider matrix (contiguous rows, any row stride) when the rows hold whole quantization
    blocks. The first launch per dtype, parameters and row stride is kept on the weight and relaunched
    (kernels/_utils.Relaunch)."""
    dtype = dtype or weight.dtype
    if out is None:
        out = new_output(weight.output_templates, weight.shape, dtype, weight.device)
    strided = _check_out(out, weight, dtype)
    key = (dtype, id(meta), out.stride(0) if strided else None)
    relaunch = weight.launches.get(key)
    if relaunch is not None and relaunch.takes(out):
        return relaunch(out)
    meta = _launch_meta(meta, weight.blocksize)
    grid = (cdiv(cdiv(weight.numel, weight.blocksize), meta["BLOCKS_PER_PROGRAM"]),)
    cols = weight.shape[1]
    args = (*weight.kernel_tensors(), out, weight.numel, max(cols // weight.blocksize, 1), out.stride(0),
            weight.blocksize, weight.blocksize2, weight.nested, INTERPRETING, meta["BLOCKS_PER_PROGRAM"],
            weight.numel % weight.blocksize == 0, meta.get("STREAMING", False), strided)
    compiled = _nf4_dequantize_kernel[grid](*args, num_warps=meta["num_warps"], enable_fp_fusion=False)
    weight.launches[key] = Relaunch.of(compiled, grid, args, OUT_POSITION)
    return out


_tables: dict = {}  # ids of a group's NF4Weights -> (weak references to them, their device table, relaunches,
#                     output templates)


def _stacked_table(weights) -> tuple:
    """The (weights, 8) int64 table of a stacked launch, the group's relaunches (dtype, launch parameters
    -> Relaunch) and its output templates (new_output), built once per group while its weights live."""
    key = tuple(id(w) for w in weights)
    cached = _tables.get(key)
    if cached is not None and all(ref() is w for ref, w in zip(cached[0], weights)):
        return cached[1:]
    for stale in [k for k, (refs, *_) in _tables.items() if any(ref() is None for ref in refs)]:
        del _tables[stale]
    rows, start = [], 0
    for w in weights:
        packed, code, absmax, absmax2, code2, offset = w.kernel_tensors()
        rows.append([t.data_ptr() for t in (packed, code, absmax, absmax2, code2, offset)] + [start, w.numel])
        start += w.numel
    table = torch.tensor(rows, dtype=torch.int64, device=weights[0].device)
    _tables[key] = (tuple(weakref.ref(w) for w in weights), table, {}, {})
    return _tables[key][1:]


def stackable(weights) -> bool:
    """Whether nf4_dequantize_stacked takes these weights: one width, block sizes, double quantization
    or its absence, and device."""
    layout = lambda w: (w.shape[1], w.blocksize, w.blocksize2, w.nested, w.device)
    return len({layout(w) for w in weights}) == 1


def nf4_dequantize_stacked(weights, dtype: torch.dtype, meta: dict = CANDIDATE_META[0]) -> torch.Tensor:
    """The weights' rows one under the other, one (sum of out_features, in_features) tensor, in one launch."""
    if not stackable(weights):
        raise ValueError("nf4_dequantize_stacked: the weights differ in width, block sizes, double "
                         "quantization or device")
    first = weights[0]
    table, relaunches, templates = _stacked_table(weights)
    out = new_output(templates, (sum(w.shape[0] for w in weights), first.shape[1]), dtype, first.device)
    key = (dtype, id(meta))
    relaunch = relaunches.get(key)
    if relaunch is not None and relaunch.takes(out):
        return relaunch(out)
    meta = _launch_meta(meta, first.blocksize)
    largest = max(w.numel for w in weights)
    grid = (cdiv(cdiv(largest, first.blocksize), meta["BLOCKS_PER_PROGRAM"]), len(weights))
    # Whole blocks everywhere: each weight's rows start in out on a block, so 16-byte aligned like out.
    whole_blocks = all(w.numel % first.blocksize == 0 and w.packed.data_ptr() % 16 == 0 for w in weights)
    args = (table, out, first.blocksize, first.blocksize2, first.nested, INTERPRETING, meta["BLOCKS_PER_PROGRAM"],
            whole_blocks, meta.get("STREAMING", False))
    compiled = _nf4_dequantize_stacked_kernel[grid](*args, num_warps=meta["num_warps"], enable_fp_fusion=False)
    relaunches[key] = Relaunch.of(compiled, grid, args, 1)
    return out
