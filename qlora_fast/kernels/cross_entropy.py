"""Cross-entropy of a chunk of logit rows and, in place over those logits, its gradient.

A program makes two passes over its rows' vocabulary: the first keeps a running max and sum of
exponentials (the log-sum-exp, in fp32), the second overwrites each logit with
(softmax - onehot(target)) * weight in the logits' dtype, where weight is 1 / divisor for a counted row and
0 for an ignored one (target -100). The logits are read as the model rounded them, and nothing of
(rows x vocab) size is allocated beside them: the fp32 upcast, exponentials and one-hot that torch would
materialize stay in registers.
"""

import torch
import triton
import triton.language as tl

from ._utils import INTERPRETER_TILE, INTERPRETING, cdiv, next_power_of_2
from ._utils import round_fp32_to

IGNORE_INDEX = -100


@triton.jit
def _logit_tile(row_ptr, rows_mask, start, n_cols, BLOCK: tl.constexpr):
    """(columns, fp32 logits) of one BLOCK-wide tile of the rows; -inf past the vocabulary."""
    cols = start + tl.arange(0, BLOCK)[None, :]
    x = tl.load(row_ptr + cols, mask=rows_mask & (cols < n_cols), other=0.0).to(tl.float32)
    return cols, tl.where(cols < n_cols, x, float("-inf"))


@triton.jit(do_not_specialize=["n_rows"])  # packed batches change the token count every step
def _cross_entropy_kernel(logits_ptr, targets_ptr, loss_ptr, divisor_ptr, n_rows, n_cols, stride,
                          IGNORE_INDEX: tl.constexpr, SOFTWARE_RTNE: tl.constexpr, ROWS: tl.constexpr,
                          BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    rows_mask = (rows < n_rows)[:, None]
    row_ptr = logits_ptr + rows[:, None] * stride
    running_max = tl.full((ROWS,), float("-inf"), tl.float32)
    running_sum = tl.zeros((ROWS,), tl.float32)
    for start in range(0, n_cols, BLOCK):
        _, x = _logit_tile(row_ptr, rows_mask, start, n_cols, BLOCK)
        new_max = tl.maximum(running_max, tl.max(x, axis=1))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max[:, None]), axis=1)
        running_max = new_max
    lse = running_max + tl.log(running_sum)

    target = tl.load(targets_ptr + rows, mask=rows < n_rows, other=IGNORE_INDEX)
    counted = target != IGNORE_INDEX
    # A label outside the vocabulary (a tokenizer larger than the model's embedding) makes that row's
    # loss and gradient NaN, where torch would raise: never a read past the row, never a quiet number.
    in_vocab = (target >= 0) & (target < n_cols)
    target = tl.where(counted & in_vocab, target, 0)
    target_logit = tl.load(logits_ptr + rows * stride + target, mask=rows < n_rows, other=0.0).to(tl.float32)
    row_loss = tl.where(in_vocab, lse - target_logit, float("nan"))
    tl.store(loss_ptr + rows, tl.where(counted, row_loss, 0.0), mask=rows < n_rows)

    weight = tl.where(counted, tl.where(in_vocab, 1.0 / tl.load(divisor_ptr), float("nan")), 0.0)
    for start in range(0, n_cols, BLOCK):
        cols, x = _logit_tile(row_ptr, rows_mask, start, n_cols, BLOCK)
        p = tl.exp(x - lse[:, None])
        p = tl.where(cols == target[:, None], p - 1.0, p)
        grad = round_fp32_to(p * weight[:, None], logits_ptr.dtype.element_ty, SOFTWARE_RTNE)
        tl.store(row_ptr + cols, grad, mask=rows_mask & (cols < n_cols))


# One row per program on the GPU, a 4096-wide tile per step (not tuned: the kernel overwrites its input,
# so autotuning would need to restore it); many rows per program in the interpreter.
_GPU_META = {"ROWS": 1, "BLOCK": 4096, "num_warps": 8}


def cross_entropy_forward_backward_(logits: torch.Tensor, targets: torch.Tensor, divisor: torch.Tensor,
                        losses: torch.Tensor) -> None:
    """Writes each row's loss, logsumexp(logits) - logits[target] (0 where target is -100, NaN where it is
    outside the vocabulary), into the fp32
    `losses`, and overwrites the (rows, vocab) `logits` with the gradient of sum(losses) / divisor;
    `divisor` is a one-element fp32 tensor on the logits' device (read there, never synchronized)."""
    n_rows, n_cols = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("cross_entropy_forward_backward_: logits rows must be contiguous")
    meta = _GPU_META
    if INTERPRETING:
        block = min(next_power_of_2(n_cols), INTERPRETER_TILE)
        meta = {"ROWS": max(1, INTERPRETER_TILE // block), "BLOCK": block}
    _cross_entropy_kernel[(cdiv(n_rows, meta["ROWS"]),)](
        logits, targets, losses, divisor, n_rows, n_cols, logits.stride(0), IGNORE_INDEX=IGNORE_INDEX,
        SOFTWARE_RTNE=INTERPRETING, **meta)
