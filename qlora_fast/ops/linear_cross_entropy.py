"""Causal-LM loss straight from the last hidden states, a chunk of tokens at a time.

The full logits (tokens x vocab, upcast to fp32: 1 GiB per 2048 tokens of a 128k vocabulary, twice over
with their gradient) are never held: each chunk's logits give its loss and, at once, its share of the
hidden-state gradient, which is all backward returns. Matches transformers' ForCausalLMLoss: labels
shifted left, -100 ignored, sum / num_items_in_batch when given, else the mean over counted tokens.
"""

import torch

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 2**26  # logits per chunk: 64M fp32 = 256 MiB


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, divisor, chunk_tokens: int):
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            h = hidden[start:start + chunk_tokens]
            t = targets[start:start + chunk_tokens]
            logits = (h @ weight.t()).float()  # rounded like the model's logits, then upcast as the loss does
            counted = t != IGNORE_INDEX
            safe_t = t.masked_fill(~counted, 0)
            lse = torch.logsumexp(logits, dim=-1)
            target_logit = logits.gather(1, safe_t[:, None]).squeeze(1)
            loss += ((lse - target_logit) * counted).sum()
            # d loss / d logits = softmax - onehot on counted rows, computed in place over the logits
            grad_logits = logits.sub_(lse[:, None]).exp_()
            grad_logits.scatter_add_(1, safe_t[:, None], -torch.ones_like(lse[:, None]))
            grad_logits *= (counted / divisor)[:, None]
            grad_logits = grad_logits.to(hidden.dtype)
            grad_hidden[start:start + chunk_tokens] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight += (grad_logits.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss / divisor

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_w = None if grad_weight is None else (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden * grad_loss.to(grad_hidden.dtype), grad_w, None, None, None


def causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                   num_items_in_batch=None, chunk_tokens: int | None = None) -> torch.Tensor:
    """loss of logits = hidden @ weight^T against labels shifted by one, without materializing the logits."""
    targets = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    if num_items_in_batch is None:
        divisor = (targets != IGNORE_INDEX).sum().clamp(min=1).float()
    else:
        divisor = torch.as_tensor(num_items_in_batch, device=hidden.device, dtype=torch.float32)
    chunk = chunk_tokens or max(1, CHUNK_ELEMENTS // weight.shape[0])
    return LinearCrossEntropyFunction.apply(hidden, weight, targets.to(hidden.device), divisor, chunk)
