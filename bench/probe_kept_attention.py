"""GPU probe: kept attention's fused ops against sdpa's autograd and an fp32 reference, for the q/k/v and
dout layouts models hand it (all (batch, heads, len, dim) contiguous; all transposed views of (batch, len,
heads, dim); Phi-3's: q and k rotated into new tensors, v a view of the fused projection's output), per
sdpa backend, each case in a fresh process (torch caches cuDNN graphs per process). In each process sdpa
runs first; "ours" passes dout as it arrives, "ours, dout in out's layout" as the backward used to."""
import subprocess
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

B, L, H, D = 2, 128, 4, 32
LAYOUTS = [("bhld",) * 3, ("blhd",) * 3, ("bhld", "bhld", "blhd"), ("blhd", "bhld", "bhld")]
BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def make(heads, layout):
    if layout == "bhld":
        return torch.randn(B, heads, L, D, device="cuda", dtype=torch.bfloat16)
    return torch.randn(B, L, heads, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)


def fp32_attention(q, k, v):
    """Causal softmax attention in fp32, the reference for every kernel."""
    q, k, v = q.float(), k.float(), v.float()
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], 1) for t in (k, v))
    scores = q @ k.transpose(-1, -2) / D ** 0.5
    mask = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    return (scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v).to(torch.bfloat16)


def grads(fn, q, k, v, dout, dout_like_out=False):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(torch.empty_like(out).copy_(dout) if dout_like_out else dout)
    return out.detach(), q.grad, k.grad, v.grad


def one_case(backend, kv_heads, layouts, dout_layout):
    from qlora_fast.ops import kept_attention as ka

    torch.manual_seed(0)
    q, k, v = make(H, layouts[0]), make(kv_heads, layouts[1]), make(kv_heads, layouts[2])
    dout = make(H, dout_layout)
    exact = grads(fp32_attention, q, k, v, dout)
    with sdpa_kernel(BACKENDS[backend]):
        kernel = ka._fused_kernel(q, k, v, None)
        runs = {"sdpa": grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                              enable_gqa=kv_heads != H), q, k, v, dout)}
        ours = lambda q, k, v: ka._KeptAttention.apply(q, k, v, None, object(), kernel)
        runs["ours"] = grads(ours, q, k, v, dout)
        runs["ours, dout in out's layout"] = grads(ours, q, k, v, dout, dout_like_out=True)
    for label, got in runs.items():
        errs = [((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(got, exact)]
        print(f"{backend} kv_heads {kv_heads} {'/'.join(layouts)} dout {dout_layout} {label}: "
              + " ".join(f"{e:.1e}" for e in errs), "BAD" if max(errs) > 5e-2 else "ok", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        backend, kv_heads, layouts, dout_layout = sys.argv[1:]
        one_case(backend, int(kv_heads), tuple(layouts.split("/")), dout_layout)
    else:
        for backend in BACKENDS:  # every case on the H100's default (cuDNN), Phi-3's and the transposed on the others
            for kv_heads in (H, H // 2) if backend == "cudnn" else (H // 2,):
                for layouts in LAYOUTS if backend == "cudnn" else LAYOUTS[1:3]:
                    for dout_layout in ("bhld", "blhd"):
                        done = subprocess.run([sys.executable, __file__, backend, str(kv_heads), "/".join(layouts),
                                               dout_layout], capture_output=True, text=True)
                        print(done.stdout.strip() or done.stderr.strip().splitlines()[-1], flush=True)
