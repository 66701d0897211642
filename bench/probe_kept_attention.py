"""GPU probe: kept attention's fused ops against sdpa's autograd for the q/k/v layouts models hand it
(all (batch, heads, len, dim) contiguous; all transposed views of (batch, len, heads, dim); Phi-3's: q and k
rotated into new contiguous tensors, v a transposed view of the fused projection's output)."""
import torch
import torch.nn.functional as F

from qlora_fast.ops import kept_attention as ka

torch.manual_seed(0)
B, L, H, KV, D = 2, 128, 4, 2, 32


def make(heads, layout):
    if layout == "bhld":
        return torch.randn(B, heads, L, D, device="cuda", dtype=torch.bfloat16)
    return torch.randn(B, L, heads, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)


def _fp32_attention(q, k, v):
    """Causal softmax attention in fp32, the reference for every kernel."""
    q, k, v = q.float(), k.float(), v.float()
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], 1) for t in (k, v))
    scores = q @ k.transpose(-1, -2) / D ** 0.5
    mask = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    return (scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v).to(torch.bfloat16)


def grads(fn, q, k, v, dout):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


for kv_heads in (H, KV):
    for layouts in (("bhld",) * 3, ("blhd",) * 3, ("bhld", "bhld", "blhd"), ("blhd", "bhld", "bhld")):
        q, k, v = make(H, layouts[0]), make(kv_heads, layouts[1]), make(kv_heads, layouts[2])
        for dout_layout in ("bhld", "blhd"):
            dout = make(H, dout_layout)
            ref = grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                        enable_gqa=kv_heads != H), q, k, v, dout)
            exact = grads(_fp32_attention, q, k, v, dout)
            kernel = ka._fused_kernel(q, k, v, None)
            name = next(n for n, kk in ka._KERNELS.items() if kk is kernel) if kernel else None
            ours = grads(lambda q, k, v: ka._KeptAttention.apply(q, k, v, None, object(), kernel), q, k, v, dout)
            same = grads(lambda q, k, v: ka._KeptAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), None,
                                                                 object(), kernel), q, k, v, dout)
            for label, got in (("sdpa", ref), ("as handed", ours), ("all contiguous", same)):
                errs = [((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(got, exact)]
                print(f"kv_heads {kv_heads} layouts {layouts} dout {dout_layout} kernel {name} {label}: "
                      + " ".join(f"{e:.1e}" for e in errs), "BAD" if max(errs) > 5e-2 else "ok")
