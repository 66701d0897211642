"""Cross-entropy of a chunk of logit rows and, in place over those logits, its gradient.

A program makes two passes over its rows' vocabulary: the first keeps a running max and sum of
exponentials (the log-sum-exp, in fp32), the second overwrites each logit with
(softmax - onehot(target)) * weight in the logits' dtype, where weight is 1 / divisor for a counted row and
0 for an ignored one (target -100). The logits are read as the model rounded them, and nothing of
(rows x vocab) size is allocated beside them: the fp32 upcast, exponentials and one-hot that torch would
materialize stay in registers.

With STATS the first pass also keeps the running sum of exp(z - max) * z, for each row's entropy
lse - sum(p * z), and the first column of the row's maximum; a row's target is its top-1 prediction when
that column is the target (TRL's `is_top1`: a tie with an earlier column does not count). A divisor of -1
makes the written gradient d log p[target] / dz = onehot - p (TRL's per-token log-probabilities).

With SOFTCAP (Gemma-2's final_logit_softcapping c), the loss is of z = c * tanh(x / c), each step rounded
to the logits' dtype as stock's three ops round it, and the gradient written is d/dx = d/dz * (1 - t^2)
with t = tanh(x / c) (fp32, rounded once).
"""

import torch
import triton
import triton.language as tl

from ._utils import INTERPRETER_TILE, INTERPRETING, cdiv, next_power_of_2
from ._utils import round_fp32_to, tanh

IGNORE_INDEX = -100


@triton.jit
def _softcapped(x, softcap, dtype: tl.constexpr, SOFTWARE_RTNE: tl.constexpr):
    """(z, t): z = softcap * t, t = tanh(x / softcap), rounded to dtype after each op as stock computes them."""
    t = round_fp32_to(tanh(round_fp32_to(x / softcap, dtype, SOFTWARE_RTNE).to(tl.float32)), dtype,
                      SOFTWARE_RTNE).to(tl.float32)
    return round_fp32_to(t * softcap, dtype, SOFTWARE_RTNE).to(tl.float32), t


@triton.jit
def _logit_tile(row_ptr, rows_mask, start, n_cols, softcap, SOFTCAP: tl.constexpr, SOFTWARE_RTNE: tl.constexpr,
                BLOCK: tl.constexpr):
    """(columns, fp32 logits (softcapped with SOFTCAP), tanh of the scaled logits (with SOFTCAP; else the
    logits, unused)) of one BLOCK-wide tile of the rows; -inf past the vocabulary."""
    cols = start + tl.arange(0, BLOCK)[None, :]
    x = tl.load(row_ptr + cols, mask=rows_mask & (cols < n_cols), other=0.0).to(tl.float32)
    t = x  # a compiled kernel returns tensors only
    if SOFTCAP:
        x, t = _softcapped(x, softcap, row_ptr.dtype.element_ty, SOFTWARE_RTNE)
    return cols, tl.where(cols < n_cols, x, float("-inf")), t


@triton.jit(do_not_specialize=["n_rows"])  # packed batches change the token count every step
def _cross_entropy_kernel(logits_ptr, targets_ptr, loss_ptr, divisor_ptr, entropy_ptr, top1_ptr, n_rows, n_cols,
                          stride, softcap, IGNORE_INDEX: tl.constexpr, SOFTCAP: tl.constexpr, STATS: tl.constexpr,
                          SOFTWARE_RTNE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    rows_mask = (rows < n_rows)[:, None]
    row_ptr = logits_ptr + rows[:, None] * stride
    running_max = tl.full((ROWS,), float("-inf"), tl.float32)
    running_sum = tl.zeros((ROWS,), tl.float32)
    running_zsum = tl.zeros((ROWS,), tl.float32)  # sum of exp(z - running_max) * z, with STATS
    argmax = tl.zeros((ROWS,), tl.int32)  # the first column of the row's maximum, with STATS
    for start in range(0, n_cols, BLOCK):
        cols, x, _ = _logit_tile(row_ptr, rows_mask, start, n_cols, softcap, SOFTCAP, SOFTWARE_RTNE, BLOCK)
        tile_max = tl.max(x, axis=1)
        new_max = tl.maximum(running_max, tile_max)
        rescale = tl.exp(running_max - new_max)
        e = tl.exp(x - new_max[:, None])
        running_sum = running_sum * rescale + tl.sum(e, axis=1)
        if STATS:
            running_zsum = running_zsum * rescale + tl.sum(e * tl.where(cols < n_cols, x, 0.0), axis=1)
            argmax = tl.where(tile_max > running_max, start + tl.argmax(x, axis=1), argmax)
        running_max = new_max
    lse = running_max + tl.log(running_sum)

    target = tl.load(targets_ptr + rows, mask=rows < n_rows, other=IGNORE_INDEX)
    counted = target != IGNORE_INDEX
    # A label outside the vocabulary (a tokenizer larger than the model's embedding) makes that row's
    # loss and gradient NaN, where torch would raise: never a read past the row, never a quiet number.
    in_vocab = (target >= 0) & (target < n_cols)
    target = tl.where(counted & in_vocab, target, 0)
    target_logit = tl.load(logits_ptr + rows * stride + target, mask=rows < n_rows, other=0.0).to(tl.float32)
    if SOFTCAP:
        target_logit, _ = _softcapped(target_logit, softcap, logits_ptr.dtype.element_ty, SOFTWARE_RTNE)
    row_loss = tl.where(in_vocab, lse - target_logit, float("nan"))
    tl.store(loss_ptr + rows, tl.where(counted, row_loss, 0.0), mask=rows < n_rows)
    if STATS:
        entropy = lse - running_zsum / running_sum
        tl.store(entropy_ptr + rows, tl.where(counted, entropy, 0.0), mask=rows < n_rows)
        tl.store(top1_ptr + rows, (counted & in_vocab & (argmax == target)).to(tl.int8), mask=rows < n_rows)

    weight = tl.where(counted, tl.where(in_vocab, 1.0 / tl.load(divisor_ptr), float("nan")), 0.0)
    for start in range(0, n_cols, BLOCK):
        cols, x, t = _logit_tile(row_ptr, rows_mask, start, n_cols, softcap, SOFTCAP, SOFTWARE_RTNE, BLOCK)
        p = tl.exp(x - lse[:, None])
        p = tl.where(cols == target[:, None], p - 1.0, p)
        grad = p * weight[:, None]
        if SOFTCAP:
            grad = grad * (1.0 - t * t)
        grad = round_fp32_to(grad, logits_ptr.dtype.element_ty, SOFTWARE_RTNE)
        tl.store(row_ptr + cols, grad, mask=rows_mask & (cols < n_cols))


# One row per program on the GPU, a 4096-wide tile per step (not tuned: the kernel overwrites its input,
# so autotuning would need to restore it); many rows per program in the interpreter.
_GPU_META = {"ROWS": 1, "BLOCK": 4096, "num_warps": 8}


def cross_entropy_forward_backward_(logits: torch.Tensor, targets: torch.Tensor, divisor: torch.Tensor,
                                    losses: torch.Tensor, softcap: float | None = None,
                                    entropy: torch.Tensor | None = None, top1: torch.Tensor | None = None) -> None:
    """Writes each row's loss, logsumexp(z) - z[target] (0 where target is -100, NaN where it is outside the
    vocabulary), into the fp32 `losses`, and overwrites the (rows, vocab) `logits` with the gradient of
    sum(losses) / divisor; z = logits, or softcap * tanh(logits / softcap) when `softcap` is given. `divisor`
    is a one-element fp32 tensor on the logits' device (read there, never synchronized). With `entropy`
    (fp32) and `top1` (int8), also each row's entropy of softmax(z) and whether its target is the first
    maximum of z (both 0 where target is -100)."""
    n_rows, n_cols = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("cross_entropy_forward_backward_: logits rows must be contiguous")
    meta = _GPU_META
    if INTERPRETING:
        block = min(next_power_of_2(n_cols), INTERPRETER_TILE)
        meta = {"ROWS": max(1, INTERPRETER_TILE // block), "BLOCK": block}
    stats = entropy is not None
    _cross_entropy_kernel[(cdiv(n_rows, meta["ROWS"]),)](
        logits, targets, losses, divisor, entropy if stats else losses, top1 if stats else losses, n_rows, n_cols,
        logits.stride(0), float(softcap or 1.0), IGNORE_INDEX=IGNORE_INDEX, SOFTCAP=softcap is not None,
        STATS=stats, SOFTWARE_RTNE=INTERPRETING, **meta)
