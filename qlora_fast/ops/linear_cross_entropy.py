"""Causal-LM loss straight from the last hidden states, a chunk of tokens at a time.

The full logits (tokens x vocab: 1 GiB of fp32 per 2048 tokens of a 128k vocabulary, twice over with
their gradient) are never held. Each chunk's logits, in the model's dtype, go through one Triton kernel
that writes the chunk's per-token losses and overwrites the logits with their gradient; one matmul then
gives the chunk's share of the hidden-state gradient, which is all backward returns. Matches
transformers' ForCausalLMLoss: labels shifted left, -100 ignored, sum / num_items_in_batch when given,
else the mean over counted tokens; with `softcap` (Gemma-2's final_logit_softcapping), of the softcapped
logits, inside the same kernel.
"""

import torch

from ..kernels.cross_entropy import IGNORE_INDEX, cross_entropy_forward_backward_

CHUNK_ELEMENTS = 2**25  # logits per chunk: 64 MiB in bf16, the only (chunk x vocab) buffer


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
    chunk = chunk_tokens or max(1, CHUNK_ELEMENTS // weight.shape[0])
    targets = targets.to(hidden.device).contiguous()
    return LinearCrossEntropyFunction.apply(hidden.contiguous(), weight, targets, divisor, chunk, softcap)
