"""The LoRA adapters of a fused Function in its compute dtype, cast together.

peft keeps adapters in fp32 and a bf16 step casts each A and B before its GEMMs: a launch and an
allocation per matrix, ~14 per decoder layer in each pass, which is what steps of a few thousand
tokens are bound by. Here one foreach copy (one launch on CUDA where the sources share a dtype) writes
all of a Function's adapters into one buffer, one after another. Matrices that lie side by side there
and share a width, like the A matrices of q, k and v, are then also one row-stacked matrix, a view:
x @ [A_q; A_k; A_v]^T takes one GEMM without a concatenation.
"""

import torch

from ..kernels.low_rank_add import low_rank_add_


def adapters_in(dtype: torch.dtype, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Copies of `tensors` in `dtype`, laid out one after another in one new buffer."""
    sizes = [t.numel() for t in tensors]
    buffer = torch.empty(sum(sizes), dtype=dtype, device=tensors[0].device)
    copies = [chunk.view(t.shape) for chunk, t in zip(buffer.split_with_sizes(sizes), tensors)]
    torch._foreach_copy_(copies, tensors)
    return copies


def stacked_rows(matrices) -> torch.Tensor:
    """The row concatenation of contiguous matrices of one width that lie one after another in memory
    (as adapters_in lays them out), as a view of that memory."""
    first = matrices[0]
    cols = first.shape[1]
    for previous, matrix in zip(matrices, matrices[1:]):
        if matrix.shape[1] != cols or matrix.data_ptr() != previous.data_ptr() + previous.nbytes:
            raise ValueError("stacked_rows: the matrices are not adjacent rows of one buffer")
    return first.as_strided((sum(m.shape[0] for m in matrices), cols), (cols, 1))


def wider(dtype: torch.dtype, compute_dtype: torch.dtype) -> bool:
    """Whether a layer's input dtype is wider than its compute dtype (fp32 hidden states of a model
    `prepare_model_for_kbit_training` upcast, bf16 compute): stock peft then returns the bf16 base output
    plus the LoRA term summed in fp32, unrounded, and so do the fused Functions."""
    return dtype.is_floating_point and torch.finfo(dtype).bits > torch.finfo(compute_dtype).bits


def plus_low_rank_terms(y: torch.Tensor, blocks, out_dtype: torch.dtype, fresh: bool = False) -> torch.Tensor:
    """y with each (column block of y, LowRank term) in `blocks` added: in place, rounded once to y's dtype,
    or into a new tensor (unrounded when out_dtype is wider than y's; always with `fresh`, which leaves y
    as it was)."""
    if not (fresh or wider(out_dtype, y.dtype)):
        for block, term in blocks:
            low_rank_add_(block, term)
        return y
    out = torch.empty(y.shape, dtype=out_dtype if wider(out_dtype, y.dtype) else y.dtype, device=y.device)
    start = 0
    for block, term in blocks:
        width = block.shape[1]
        low_rank_add_(block, term, out=out[:, start:start + width])
        start += width
    return out
