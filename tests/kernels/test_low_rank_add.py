import pytest
import torch

from qlora_fast.kernels.low_rank import LOW_RANK_ADD_META, LowRank
from qlora_fast.kernels.low_rank_add import LARGE_RANK_ADD_META, low_rank_add_
from tests.helpers import rel_err


def _reference(y, term):
    """y + s * xa @ b^T in float64, rounded once to y's dtype (what peft's fp32 LoRA sum gets)."""
    return (y.double() + term.scale * (term.xa.double() @ term.b.double().t())).to(y.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rank", [16, 48, 5])
def test_adds_the_term_into_a_column_block_in_place(dtype, rank):
    wide = torch.randn(37, 300).to(dtype)  # rows and columns not multiples of the tiles
    before = wide.clone()
    block = wide[:, 100:233]
    # b as the transpose of A, as the input gradients pass it
    term = LowRank(torch.randn(37, rank).to(dtype), torch.randn(rank, 133).to(dtype).t(), 0.75)
    expected = _reference(block, term)
    version = block._version
    assert low_rank_add_(block, term) is block
    assert block._version > version
    assert rel_err(block, expected) < (1e-6 if dtype == torch.float32 else 1e-2)
    if dtype != torch.float32:  # fp32 rounding inside the kernel moves few 16-bit roundings
        assert (block == expected).float().mean() > 0.99
    outside = torch.ones_like(wide, dtype=torch.bool)
    outside[:, 100:233] = False
    assert torch.equal(wide[outside], before[outside])


def test_rejects_a_transposed_output():
    y = torch.randn(8, 4).t()
    with pytest.raises(ValueError, match="unit column stride"):
        low_rank_add_(y, LowRank(torch.randn(4, 2), torch.randn(8, 2), 1.0))


@pytest.mark.parametrize("cols_fast", [False, True])
def test_tiles_launched_along_rows_or_columns_cover_the_output(cols_fast, monkeypatch):
    """Small tiles (the interpreter's large ones would cover the output in one program): each launch order
    adds the term to every element once, into a column block."""
    from qlora_fast.kernels import low_rank

    monkeypatch.setattr(low_rank, "INTERPRETING", False)  # keep the tiles asked for
    wide = torch.randn(37, 300)
    block = wide[:, 100:233]
    term = LowRank(torch.randn(37, 16), torch.randn(133, 16), 0.75)
    expected = _reference(block, term)
    low_rank_add_(block, term, {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "COLS_FAST": cols_fast})
    assert rel_err(block, expected) < 1e-6


@pytest.mark.parametrize("dtype,out_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                             (torch.bfloat16, torch.float32)])
def test_a_residual_is_added_after_the_sum_is_rounded(dtype, out_dtype):
    """residual + (y + term) as torch computes the two adds: the term's sum rounded to out's dtype first.
    Rounding only the final sum (one rounding instead of two) must show on 16-bit outputs."""
    y = torch.randn(37, 133).to(dtype)
    term = LowRank(torch.randn(37, 16).to(dtype), (torch.randn(133, 16) * 0.1).to(dtype), 2.0)
    residual = torch.randn(37, 133).to(out_dtype)
    out = low_rank_add_(y.clone(), term, out=torch.empty_like(residual), residual=residual)
    summed = low_rank_add_(y.clone(), term, out=torch.empty_like(residual))
    assert out.dtype == out_dtype and torch.equal(out, residual + summed)
    once = (residual.double() + y.double() + term.scale * (term.xa.double() @ term.b.double().t())).to(out_dtype)
    if out_dtype != torch.float32:
        assert (once != out).float().mean() > 0.1
    with pytest.raises(ValueError, match="residual"):
        low_rank_add_(y.clone(), term, out=torch.empty_like(residual), residual=residual.double())


@pytest.mark.parametrize("rank, tile", [(16, LOW_RANK_ADD_META), (32, LOW_RANK_ADD_META), (40, LARGE_RANK_ADD_META),
                                        (128, LARGE_RANK_ADD_META)])
def test_tiles_by_rank(rank, tile, monkeypatch):
    """Above rank 32 the term's product bounds the kernel: 64-row tiles (kernels/low_rank_add.py)."""
    from qlora_fast.kernels import low_rank_add

    launched = []
    monkeypatch.setattr(low_rank_add, "launch_tiles", lambda kernel, y, terms, meta, *a, **k: launched.append(meta))
    low_rank_add_(torch.zeros(8, 16), LowRank(torch.zeros(8, rank), torch.zeros(16, rank), 1.0))
    assert launched == [tile]
