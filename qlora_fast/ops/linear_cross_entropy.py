"""Causal-LM loss straight from the last hidden states, a chunk of tokens at a time.

The full logits (tokens x vocab: 1 GiB of fp32 per 2048 tokens of a 128k vocabulary, twice over with
their gradient) are never held. Each chunk's logits, in the model's dtype, go through one Triton kernel
that writes the chunk's per-token losses and overwrites the logits with their gradient; one matmul then
gives the chunk's share of the hidden-state gradient, which is all backward returns. Matches
transformers' ForCausalLMLoss: labels shifted left, -100 ignored, sum / num_items_in_batch when given,
else the mean over counted tokens; with `softcap` (Gemma-2's final_logit_softcapping), of the softcapped
logits, inside the same kernel.

`linear_log_probs` gives TRL's fused-head outputs instead: each token's log-probability of its target, its
entropy and whether the target is its top-1. The gradient of each log-probability with respect to the
token's hidden state, (onehot - p) @ weight, is computed in the forward while the chunk's logits are at
hand; backward scales it by the token's incoming gradient. TRL's own head recomputes the logits in
backward: three (tokens x hidden x vocab) GEMMs against two here.
"""

import math

import torch

from ..kernels.cross_entropy import IGNORE_INDEX, cross_entropy_forward_backward_

# Logits per chunk: 128 MiB in bf16, the only (chunk x vocab) buffer; 512 tokens of a 128k vocabulary, so
# the head's GEMMs run at M = 512 (peak memory of a 4x2048 Llama-3-8B step unchanged: bench/NOTES.md).
CHUNK_ELEMENTS = 2**26


def default_chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk: the power of two nearest (in ratio) to CHUNK_ELEMENTS / vocab_size, so a chunk is
    whole GEMM tiles of 128 or 256 rows, not, say, 261 rows of a 128k vocabulary padded to 384."""
    return 1 << max(0, round(math.log2(CHUNK_ELEMENTS / vocab_size)))


def in_head_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> tuple:
    """(hidden, weight) in the dtype the head's matmul runs in, as stock's (and TRL's head) computes it:
    autocast's where autocast is on, else the hidden states' (a weight held in bf16 by hold_in_bf16 is exact
    in fp32)."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return hidden.to(dtype), weight.to(dtype)
    return hidden, weight.to(hidden.dtype)


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, divisor, chunk_tokens: int, softcap: float | None):
        n_tokens = hidden.shape[0]
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        losses = torch.empty(n_tokens, dtype=torch.float32, device=hidden.device)
        logits = hidden.new_empty(min(chunk_tokens, n_tokens), weight.shape[0])
        for start in range(0, n_tokens, chunk_tokens):
            end = min(start + chunk_tokens, n_tokens)
            h = hidden[start:end]
            chunk_logits = torch.mm(h, weight.t(), out=logits[:end - start])
            cross_entropy_forward_backward_(chunk_logits, targets[start:end], divisor, losses[start:end], softcap)
            torch.mm(chunk_logits, weight, out=grad_hidden[start:end])
            if grad_weight is not None:
                grad_weight += (chunk_logits.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return losses.sum() / divisor

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_w = None if grad_weight is None else (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden * grad_loss.to(grad_hidden.dtype), grad_w, None, None, None, None


@torch.compiler.disable  # the kernel runs as is; torch.compile traces the model around it
def causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                   num_items_in_batch=None, chunk_tokens: int | None = None,
                   softcap: float | None = None) -> torch.Tensor:
    """loss of logits = hidden @ weight^T (softcap * tanh(logits / softcap) with `softcap`) against labels
    shifted by one, without materializing the logits."""
    targets = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    if num_items_in_batch is None:
        divisor = (targets != IGNORE_INDEX).sum().clamp(min=1).float()
    else:
        divisor = torch.as_tensor(num_items_in_batch, device=hidden.device, dtype=torch.float32).reshape(())
    chunk = chunk_tokens or default_chunk_tokens(weight.shape[0])
    targets = targets.to(hidden.device).contiguous()
    return LinearCrossEntropyFunction.apply(hidden.contiguous(), weight, targets, divisor, chunk, softcap)


class LinearLogProbFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens: int, softcap: float | None, with_grad: bool):
        ctx.set_materialize_grads(False)  # the entropy is mostly logged, not differentiated
        n_tokens = hidden.shape[0]
        # d log p[target] / d hidden per token, where a gradient will be asked (not under no_grad, where TRL
        # reads the outputs for metrics); the kernel writes d log p / d logits for a divisor of -1
        grad_log_prob = torch.empty_like(hidden) if with_grad else None
        minus_one = torch.full((), -1.0, dtype=torch.float32, device=hidden.device)
        neg_log_probs = torch.empty(n_tokens, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty_like(neg_log_probs)
        top1 = torch.empty(n_tokens, dtype=torch.int8, device=hidden.device)
        logits = hidden.new_empty(min(chunk_tokens, n_tokens), weight.shape[0])
        for start in range(0, n_tokens, chunk_tokens):
            end = min(start + chunk_tokens, n_tokens)
            chunk_logits = torch.mm(hidden[start:end], weight.t(), out=logits[:end - start])
            cross_entropy_forward_backward_(chunk_logits, targets[start:end], minus_one, neg_log_probs[start:end],
                                            softcap, entropy[start:end], top1[start:end])
            if grad_log_prob is not None:
                torch.mm(chunk_logits, weight, out=grad_log_prob[start:end])
        ctx.save_for_backward(grad_log_prob, hidden, weight, targets, entropy)
        ctx.chunk_tokens, ctx.softcap = chunk_tokens, softcap
        top1 = top1.view(torch.bool)
        ctx.mark_non_differentiable(top1)
        return neg_log_probs.neg_(), entropy, top1

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy, _):
        grad_log_prob, hidden, weight, targets, entropy = ctx.saved_tensors
        grad = None
        if grad_log_probs is not None:  # the product in fp32, rounded once to the hidden states' dtype
            grad = torch.mul(grad_log_prob, grad_log_probs[:, None], out=torch.empty_like(grad_log_prob))
        if grad_entropy is not None:
            from_entropy = _entropy_backward(hidden, weight, targets, entropy, grad_entropy, ctx.chunk_tokens,
                                             ctx.softcap)
            grad = from_entropy.to(hidden.dtype) if grad is None else (from_entropy + grad).to(hidden.dtype)
        return grad, None, None, None, None, None


def _entropy_backward(hidden, weight, targets, entropy, grad_entropy, chunk_tokens: int,
                      softcap: float | None) -> torch.Tensor:
    """d(sum(grad_entropy * entropy)) / d hidden, in fp32, the logits recomputed chunk by chunk:
    dH/dz = -p * (log p + H), times 1 - tanh^2 through a softcap."""
    grad = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
    scale = torch.where(targets != IGNORE_INDEX, grad_entropy, 0.0)
    for start in range(0, hidden.shape[0], chunk_tokens):
        end = min(start + chunk_tokens, hidden.shape[0])
        z = (hidden[start:end] @ weight.t()).float()
        if softcap is not None:
            t = torch.tanh(z / softcap)
            z = softcap * t
        log_p = torch.log_softmax(z, dim=-1)
        grad_z = -log_p.exp() * (log_p + entropy[start:end, None]) * scale[start:end, None]
        if softcap is not None:
            grad_z = grad_z * (1 - t * t)
        grad[start:end] = grad_z.to(weight.dtype) @ weight
    return grad


@torch.compiler.disable
def linear_log_probs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                     softcap: float | None = None, chunk_tokens: int | None = None):
    """(log p[target], entropy, target is the first argmax) per row of hidden (tokens, hidden_size), for
    p = softmax(hidden @ weight^T) (softcapped with `softcap`); 0, 0 and False where the target is -100."""
    chunk = chunk_tokens or default_chunk_tokens(weight.shape[0])
    with_grad = torch.is_grad_enabled() and hidden.requires_grad  # Function.forward runs without grad mode
    return LinearLogProbFunction.apply(hidden.contiguous(), weight, targets.contiguous(), chunk, softcap, with_grad)
