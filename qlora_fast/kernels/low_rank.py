"""The low-rank term of a LoRA projection, base + s * xa @ B^T, added inside tile kernels.

A LoRA projection's output is base + s * xa @ B^T, xa = x @ A^T of rank r. Added by cuBLAS in place
(`addmm_`) that is one more read and write of the whole output; inside a kernel that reads the base
anyway (SwiGLU), or a tile kernel of its own, each (BLOCK_M, BLOCK_N) tile takes its rank-r term from one
small tensor-core product of xa's rows by B's rows, in fp32, and the sum is rounded once to the
output's dtype (as peft's fp32 LoRA sum is rounded once when added to the base output).
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._utils import INTERPRETER_TILE, INTERPRETING, cdiv, next_power_of_2
from ._utils import round_fp32_to


class LowRank(NamedTuple):
    """The rank-r term scale * xa @ b^T of a (rows, cols) output: xa (rows, r), b (cols, r), any strides."""

    xa: torch.Tensor
    b: torch.Tensor
    scale: float


@triton.jit
def tile(n_rows, n_cols, stride, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, COLS_FAST: tl.constexpr):
    """This program's (BLOCK_M, BLOCK_N) tile: rows, columns, element offsets and mask. COLS_FAST: the
    grid's first axis runs along the columns, so programs launched together read whole rows."""
    if COLS_FAST:
        row_block, col_block = tl.program_id(1), tl.program_id(0)
    else:
        row_block, col_block = tl.program_id(0), tl.program_id(1)
    rows = row_block.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return rows, cols, rows[:, None] * stride + cols[None, :], mask


@triton.jit
def load_fp32(ptr, offs, mask):
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def plus_low_rank(base, rows, cols, n_rows, n_cols, rank, xa_ptr, b_ptr, scale,
                  stride_xm, stride_xr, stride_bn, stride_br, HAS_TERM: tl.constexpr, R: tl.constexpr,
                  UPCAST_DOT: tl.constexpr, SOFTWARE_RTNE: tl.constexpr, dtype: tl.constexpr,
                  ROUND_SUM: tl.constexpr = True):
    """base + scale * xa[rows] @ b[cols]^T in fp32, rounded to dtype as addmm_ rounds it (base as is
    without a term); with ROUND_SUM False the fp32 sum is kept, as peft's fp32 sum of a bf16 base output
    and the LoRA term is when the layer's input is wider than its compute dtype."""
    if HAS_TERM:  # one tensor-core product of xa's rows by b's rows, the rank padded to R >= 16
        r = tl.arange(0, R)
        xa = tl.load(xa_ptr + rows[:, None] * stride_xm + r[None, :] * stride_xr,
                     mask=(rows[:, None] < n_rows) & (r[None, :] < rank), other=0.0)
        b_t = tl.load(b_ptr + cols[None, :] * stride_bn + r[:, None] * stride_br,
                      mask=(cols[None, :] < n_cols) & (r[:, None] < rank), other=0.0)
        if UPCAST_DOT:  # fp32 operands exactly, and the CPU interpreter's dot is wrong on bf16
            term = tl.dot(xa.to(tl.float32), b_t.to(tl.float32), input_precision="ieee")
        else:
            term = tl.dot(xa, b_t)
        if ROUND_SUM:
            return round_fp32_to(base + scale * term, dtype, SOFTWARE_RTNE).to(tl.float32)
        return base + scale * term
    else:
        return base


def term_args(term: LowRank | None, like: torch.Tensor):
    """(xa, b, scale, xa's strides, b's strides) kernel arguments of a term; placeholders (never read)
    without one."""
    if term is None:
        return like, like, 0.0, 0, 0, 0, 0
    rows, cols = like.numel() // like.shape[-1], like.shape[-1]
    if term.xa.shape != (rows, term.b.shape[1]) or term.b.shape[0] != cols or term.xa.dtype != like.dtype \
            or term.b.dtype != like.dtype:
        raise ValueError(f"a LoRA term for a {(rows, cols)} {like.dtype} output needs xa (rows, r) and "
                         f"b (cols, r) in that dtype; got {tuple(term.xa.shape)}, {tuple(term.b.shape)}")
    return term.xa, term.b, float(term.scale), *term.xa.stride(), *term.b.stride()


# Launch parameters of the tile kernels on the GPU, fixed rather than autotuned (they overwrite their
# inputs); bench/kernel_timings.py times the candidates (bench/RESULTS.md).
CANDIDATE_META = [
    # SwiGLU's: the fastest forward and backward with the three LoRA terms (bench/RESULTS.md, session 9),
    # and it fits in registers where 64x64 / 4 warps spills
    {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4},
    # low_rank_add_'s: programs launched together along a row band, 8-10% faster than 64x64 rows-first on
    # (8192 x 4096) outputs on the H100 (bench/NOTES.md, session 13)
    {"BLOCK_M": 32, "BLOCK_N": 128, "num_warps": 4, "COLS_FAST": True},
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4},
    {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 8},
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8},
    {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "COLS_FAST": True},
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "COLS_FAST": True},
]
SWIGLU_META, LOW_RANK_ADD_META = CANDIDATE_META[0], CANDIDATE_META[1]


# Padded ranks up to this are the small ones, whose tiles memory bounds. Above it the term's product, not
# memory, bounds the kernels that carry a term inside a tile, so they take taller tiles: the SwiGLU kernels
# (kernels/swiglu.py), low_rank_add_ and the q/k rotation with its terms (64-row tiles: low_rank_add_ took
# 73 us a call at r=64 in the prepared recipe's step against 44 at r=16, bench/RESULTS.md sessions 19 and
# 21). Spill-free on sm_90 up to r=128 (tests/kernels/hopper_compile.py).
SMALL_RANK_MAX = 32


def takes_large_rank_tiles(rank: int) -> bool:
    return padded_rank(rank) > SMALL_RANK_MAX


def shared_rank(terms) -> int:
    """The one rank of a launch's LoRA terms (None for an absent term; 1 where all are)."""
    ranks = {t.xa.shape[1] for t in terms if t is not None}
    if len(ranks) > 1:
        raise ValueError("LoRA terms of different ranks in one launch")
    return ranks.pop() if ranks else 1


def padded_rank(rank: int) -> int:
    """R, the rank as the tensor-core products take it: a power of two, at least 16."""
    return max(16, next_power_of_2(rank))


def interpreter_blocks(cols: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) under the interpreter, which pays per program: few, large ones."""
    block_n = max(16, min(next_power_of_2(cols), 1024))
    return max(16, INTERPRETER_TILE // block_n), block_n


def launch_tiles(kernel, like: torch.Tensor, terms, meta: dict, *args, **constexprs):
    """Launches a tile kernel over the 2-D `like` with (rows, cols, rank, *term_args) after `args`."""
    rows, cols = like.shape
    rank = shared_rank(terms)
    if INTERPRETING:
        block_m, block_n = interpreter_blocks(cols)
        meta = dict(meta, BLOCK_N=block_n, BLOCK_M=block_m)
    grid = (cdiv(rows, meta["BLOCK_M"]), cdiv(cols, meta["BLOCK_N"]))
    meta = dict(meta)
    # CUDA's second grid axis takes at most 65535 blocks: past that many row blocks, rows go first
    meta["COLS_FAST"] = meta.get("COLS_FAST", False) and grid[0] <= 65535
    if meta["COLS_FAST"]:
        grid = grid[::-1]
    kernel[grid](*args, rows, cols, rank, *constexprs.pop("term_args"), R=padded_rank(rank),
                 UPCAST_DOT=INTERPRETING or like.dtype == torch.float32, SOFTWARE_RTNE=INTERPRETING,
                 **meta, **constexprs)
