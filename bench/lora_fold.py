"""Is it cheaper to fold the LoRA term into the base GEMM's reduction than to add it in place after?

  python bench/lora_fold.py > $OUT/lora_fold.txt

Today y = x @ W^T, then y.addmm_(x @ A^T, B^T, alpha=s): the addmm reads and writes all of y for a
rank-16 update (for the MLP's gate/up at 8192 tokens, 2 x 235 MB). Folded, y = [x | s x A^T] @ [W | B]^T
in one GEMM whose K grows by r; the cost moves to copying x into the wider buffer. The same for the
input gradients (dX = [dy | s dy B] @ [W ; A]). Weights here are dense bf16 (dequantize costs the same
either way); times are medians of CUDA-event timings.
"""

import torch
from triton.testing import do_bench

R = 16
S = 2.0


def ms(fn):
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def rand(*shape):
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * 0.02


def gate_up_forward(m, k=4096, n=14336):
    x, wg, wu = rand(m, k), rand(n, k), rand(n, k)
    ag, au, bg, bu = rand(R, k), rand(R, k), rand(n, R), rand(n, R)

    def stock():
        g = (x @ wg.t()).addmm_(x @ ag.t(), bg.t(), alpha=S)
        u = (x @ wu.t()).addmm_(x @ au.t(), bu.t(), alpha=S)
        return g, u

    w_fold = torch.zeros(2 * n, k + 2 * R, device="cuda", dtype=torch.bfloat16)
    w_fold[:n, :k], w_fold[n:, :k] = wg, wu
    w_fold[:n, k:k + R], w_fold[n:, k + R:] = bg, bu
    a_both = torch.cat([ag, au]) * S

    def folded():
        xp = torch.empty(m, k + 2 * R, device="cuda", dtype=torch.bfloat16)
        xp[:, :k].copy_(x)
        torch.mm(x, a_both.t(), out=xp[:, k:])
        return xp @ w_fold.t()

    g, u = stock()
    y = folded()
    err = max((y[:, :n] - g).float().norm() / g.float().norm(), (y[:, n:] - u).float().norm() / u.float().norm())
    return ms(stock), ms(folded), err.item()


def mlp_input_grad(m, k=4096, n=14336):
    dg, du, wg, wu = rand(m, n), rand(m, n), rand(n, k), rand(n, k)
    ag, au, bg, bu = rand(R, k), rand(R, k), rand(n, R), rand(n, R)

    def stock():
        dx = (dg @ wg).addmm_(du, wu)
        return dx.addmm_(dg @ bg, ag, alpha=S).addmm_(du @ bu, au, alpha=S)

    buf = torch.empty(m, 2 * n + 2 * R, device="cuda", dtype=torch.bfloat16)
    buf[:, :n], buf[:, n:2 * n] = dg, du
    w_stack = torch.cat([wg, wu, ag, au])

    def folded():
        torch.mm(buf[:, :n], bg * S, out=buf[:, 2 * n:2 * n + R])
        torch.mm(buf[:, n:2 * n], bu * S, out=buf[:, 2 * n + R:])
        return buf @ w_stack

    ref = stock()
    err = (folded() - ref).float().norm() / ref.float().norm()
    return ms(stock), ms(folded), err.item()


def down_input_grad(m, k=4096, n=14336):
    """dh = dy @ W_down + s (dy @ B) @ A, W_down (k, n)."""
    dy, w, a, b = rand(m, k), rand(k, n), rand(R, n), rand(k, R)

    def stock():
        return (dy @ w).addmm_(dy @ b, a, alpha=S)

    w_stack = torch.cat([w, a])

    def folded():
        dp = torch.empty(m, k + R, device="cuda", dtype=torch.bfloat16)
        dp[:, :k].copy_(dy)
        torch.mm(dy, b * S, out=dp[:, k:])
        return dp @ w_stack

    ref = stock()
    err = (folded() - ref).float().norm() / ref.float().norm()
    return ms(stock), ms(folded), err.item()


def strided_out_is_direct():
    """Does torch.mm(out=<row-strided view>) write in place (no temporary + copy)?"""
    a, b = rand(256, 64), rand(64, 32)
    buf = torch.zeros(256, 96, device="cuda", dtype=torch.bfloat16)
    view = buf[:, 64:]
    out = torch.mm(a, b, out=view)
    return out.data_ptr() == view.data_ptr() and torch.equal(buf[:, 64:], a @ b)


def main():
    print("mm(out=strided view) writes in place:", strided_out_is_direct())
    print("| what | tokens | stock ms | folded ms | folded / stock | rel diff |")
    print("|---|---|---|---|---|---|")
    for name, fn in [("gate+up forward", gate_up_forward), ("MLP dX", mlp_input_grad), ("down dX", down_input_grad)]:
        for m in (2048, 8192):
            stock, folded, err = fn(m)
            print(f"| {name} | {m} | {stock:.3f} | {folded:.3f} | {folded / stock:.2f} | {err:.1e} |", flush=True)


if __name__ == "__main__":
    main()
