"""Correctness of the branches that only a GPU takes, run before every GPU benchmark (CUDA only).

  python bench/gpu_checks.py [step ...]   # one line per check, PASS/FAIL, exit status 1 on any FAIL;
                                          # steps: the functions main() runs (default: all)

The CPU tests cover every kernel under Triton's interpreter; these run the compiled kernels on the GPU
against independent references (bitsandbytes, float64, torch autograd, stock peft) and the paths the
interpreter never takes: dequantize and the in-GEMM matmul on odd shapes, fp16 and bf16; the stacked
q/k/v dequantize's pointer table; the relaunch's C launch, side streams and launch hooks; the fp32-output
GEMM of scaled_mm; low_rank_add_'s cuBLAS branch for small outputs and the wide (fp32 out) LoRA term; the cross-entropy and SwiGLU kernels (with LoRA terms);
LoRA layers and the fused MLP against peft; TRL's fused-head calls against TRL's head; the offloaded checkpoints' side-stream copies and whole
patched models through verify() (step-0 gradients against stock peft, fused calls counted), in bf16 and
under autocast on a prepared model. bench/kernel_timings.py times the kernels; run this first.
"""

import sys
import traceback

import torch

import bitsandbytes.functional as F
from qlora_fast import patch_model
from qlora_fast.harness.models import add_lora, quantize_to_nf4_, random_causal_lm
from qlora_fast.harness.run import packed_batch
from qlora_fast.harness.verify import verify
from qlora_fast.kernels.cross_entropy import cross_entropy_forward_backward_
from qlora_fast.kernels.low_rank import LowRank
from qlora_fast.kernels.low_rank_add import KERNEL_MIN_ELEMENTS, low_rank_add_
from qlora_fast.kernels.nf4_dequantize import CANDIDATE_META, nf4_dequantize, nf4_dequantize_stacked
from qlora_fast.kernels.nf4_matmul import nf4_matmul
from qlora_fast.kernels.swiglu import swiglu_backward_, swiglu_forward
from qlora_fast.nf4 import nf4_weight_from_bnb
from qlora_fast.ops.lora_grads import scaled_mm
from qlora_fast.testing import forward_backward, make_lora_nf4_linear, make_lora_nf4_mlp, make_nf4_linear

RESULTS = []


def check(name: str, ok: bool, detail: str = "") -> None:
    RESULTS.append(ok)
    print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}", flush=True)


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
ODD_SHAPES = [(70, 130), (4097, 515), (14336, 4096)]


def dequantize_and_in_gemm_matmul():
    """Dequantize bit-exact with bitsandbytes; the in-GEMM matmul (both directions) against dequantize +
    fp32 matmul; odd shapes, nested or not, fp16 and bf16."""
    for (n, k) in ODD_SHAPES:
        for dname, dtype in DTYPES.items():
            for nested in (True, False):
                layer = make_nf4_linear(n, k, dtype, nested, device="cuda")
                w = nf4_weight_from_bnb(layer.weight)
                ref = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
                case = f"{n}x{k} {dname} nested={nested}"
                for i, meta in enumerate(CANDIDATE_META):  # the default (0) and every launch candidate
                    for call in ("launch", "relaunch"):  # the first call launches, later ones relaunch
                        ours = torch.full_like(ref, float("nan"))
                        nf4_dequantize(w, out=ours, meta=meta)
                        check(f"dequantize (launch candidate {i}, {call}) bit-exact with bitsandbytes {case}",
                              torch.equal(ours, ref))
                for transpose, a in ((True, torch.randn(37, k, device="cuda", dtype=dtype)),
                                     (False, torch.randn(37, n, device="cuda", dtype=dtype))):
                    err = rel(nf4_matmul(a, w, transpose), a.float() @ (ref.float().t() if transpose else ref.float()))
                    check(f"in-GEMM {'forward' if transpose else 'backward'} {case}", err < 1e-2, f"rel {err:.1e}")


def stacked_dequantize():
    """Llama-3-8B's q, k and v (and an odd-height trio) in one launch, bit-exact with bitsandbytes one by one."""
    for dname, dtype in DTYPES.items():
        for nested in (True, False):
            for heights, k in (((4096, 1024, 1024), 4096), ((333, 70, 1001), 515)):
                layers = [make_nf4_linear(n, k, dtype, nested, device="cuda") for n in heights]
                ref = torch.cat([F.dequantize_4bit(l.weight.data, l.weight.quant_state) for l in layers])
                weights = [nf4_weight_from_bnb(l.weight) for l in layers]
                for call in ("launch", "relaunch"):
                    stacked = nf4_dequantize_stacked(weights, dtype)
                    check(f"stacked q/k/v dequantize ({call}) {heights}x{k} {dname} nested={nested} == bitsandbytes",
                          torch.equal(stacked, ref))


def relaunch_paths():
    """A weight's relaunch through Triton's C launch (where the launcher has the layout kernels/_utils knows),
    on a side stream behind a long kernel (a launch on another stream would be overwritten by the NaN fill
    queued before it), and through Triton's runner while a launch hook is set (the hook must be called)."""
    import triton
    from triton import knobs

    layer = make_nf4_linear(4096, 1024, torch.bfloat16, True, device="cuda")
    w = nf4_weight_from_bnb(layer.weight)
    ref = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    nf4_dequantize(w)
    (relaunch,) = w.launches.values()  # the one launch above
    check(f"relaunch through Triton's C launch (triton {triton.__version__})",
          relaunch is not None and relaunch._c_launch is not None)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        ours = torch.empty_like(ref)
        torch.cuda._sleep(20_000_000)
        ours.fill_(float("nan"))
        nf4_dequantize(w, out=ours)
    side.synchronize()
    check("relaunch on a side stream, queued behind a long kernel, bit-exact", torch.equal(ours, ref))
    seen = []
    hook = lambda metadata: seen.append(metadata)
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        ours = torch.full_like(ref, float("nan"))
        nf4_dequantize(w, out=ours)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    check("relaunch with a launch hook set: through Triton's runner, hook called, bit-exact",
          len(seen) == 1 and torch.equal(ours, ref))


def scaled_mm_outputs():
    """The adapter-gradient GEMM (scale on alpha): fp32 straight out of the GEMM is unrounded."""
    for dname, dtype in DTYPES.items():
        a, b = torch.randn(16, 3000, device="cuda", dtype=dtype), torch.randn(3000, 4096, device="cuda", dtype=dtype)
        for out_dtype in (torch.float32, dtype):
            out = scaled_mm(a, b, 0.5, out_dtype)
            err = rel(out, 0.5 * (a.double() @ b.double()))
            bound = 1e-5 if out_dtype == torch.float32 else 1e-2
            check(f"scaled_mm {dname} -> {out_dtype}", out.dtype == out_dtype and err < bound, f"rel {err:.1e}")


def low_rank_add_branches():
    for rows, cols in ((64, 4096), (8192, 4096)):  # cuBLAS below KERNEL_MIN_ELEMENTS, the kernel above
        y = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
        term = LowRank(torch.randn(rows, 16, device="cuda", dtype=torch.bfloat16),
                       torch.randn(cols, 16, device="cuda", dtype=torch.bfloat16), 2.0)
        ref = y.double() + 2.0 * term.xa.double() @ term.b.double().t()
        wide = low_rank_add_(y, term, out=torch.empty(rows, cols, device="cuda"))
        err_wide = rel(wide, ref)
        err = rel(low_rank_add_(y.clone(), term), ref)
        branch = "cuBLAS" if rows * cols < KERNEL_MIN_ELEMENTS else "kernel"
        check(f"low_rank_add_ {rows}x{cols} ({branch}) in place, bf16", err < 4e-3, f"rel {err:.1e}")
        check(f"low_rank_add_ {rows}x{cols} fp32 out, unrounded", err_wide < 1e-5, f"rel {err_wide:.1e}")


def cross_entropy(rows=300, vocab=128256):
    """Losses and in-place gradient of the kernel against float64 torch, ignored rows included."""
    for dname, dtype in DTYPES.items():
        logits = (torch.randn(rows, vocab, device="cuda") * 4).to(dtype)
        targets = torch.randint(0, vocab, (rows,), device="cuda")
        targets[::7] = -100
        divisor = torch.tensor(float(rows), device="cuda")
        x, counted = logits.double(), targets != -100
        safe = targets.masked_fill(~counted, 0)
        ref_losses = (torch.logsumexp(x, 1) - x.gather(1, safe[:, None]).squeeze(1)) * counted
        ref_grad = (torch.softmax(x, 1) - torch.nn.functional.one_hot(safe, vocab)) * (counted / divisor)[:, None]
        losses = torch.full((rows,), float("nan"), device="cuda")
        cross_entropy_forward_backward_(logits, targets, divisor, losses)
        errs = rel(losses, ref_losses), rel(logits, ref_grad)
        check(f"cross-entropy kernel {rows}x{vocab} {dname}: losses, gradient vs float64",
              errs[0] < 1e-5 and errs[1] < 1e-2, "rel {:.1e}, {:.1e}".format(*errs))


def softcapped_cross_entropy(rows=300, vocab=256000, softcap=30.0):
    """Gemma-2's final_logit_softcapping inside the kernel against stock's three ops and float64 cross-entropy
    through torch autograd."""
    for dname, dtype in DTYPES.items():
        logits = (torch.randn(rows, vocab, device="cuda") * 40).to(dtype)
        targets = torch.randint(0, vocab, (rows,), device="cuda")
        targets[::7] = -100
        divisor = torch.tensor(float(rows), device="cuda")
        x = logits.clone().requires_grad_(True)
        ref_losses = torch.nn.functional.cross_entropy((torch.tanh(x / softcap) * softcap).double(), targets,
                                                       reduction="none")
        (ref_losses.sum() / divisor).backward()
        losses = torch.full((rows,), float("nan"), device="cuda")
        cross_entropy_forward_backward_(logits, targets, divisor, losses, softcap=softcap)
        errs = rel(losses, ref_losses.detach()), rel(logits, x.grad)
        check(f"softcapped cross-entropy kernel {rows}x{vocab} {dname}: losses, gradient vs stock",
              errs[0] < 1e-4 and errs[1] < 1e-2, "rel {:.1e}, {:.1e}".format(*errs))


def _plain_swiglu_backward(dh, g, u, activation="silu"):
    """swiglu_backward_ with terms that add exact zeros (B = 0): (dg, du) of the plain activation, and the
    relative error of its h^T @ xa sum against float64 products of forward's h (backward recomputes h)."""
    zero = lambda: LowRank(torch.randn(g.shape[0], 1, device="cuda", dtype=g.dtype),
                           torch.zeros(g.shape[1], 1, device="cuda", dtype=g.dtype), 1.0)
    terms = zero(), zero(), zero()
    dg, du, (_, _, h_sum) = swiglu_backward_(dh.clone(), g.detach().clone(), u.detach().clone(), *terms,
                                             activation=activation)
    h = swiglu_forward(g.detach(), u.detach(), activation=activation)
    return dg, du, rel(h_sum, h.double().t() @ terms[0].xa.double())


def swiglu(shape=(1000, 1337)):
    """Bit-exact with torch's silu(g) * u and its autograd gradients in bf16. fp16 (finer): Triton's exp and
    CUDA's expf differ in the last bit, which moves a few roundings by one fp16 ulp, so relative errors."""
    for dname, dtype in DTYPES.items():
        g = (torch.randn(shape, device="cuda") * 3).to(dtype).requires_grad_(True)
        u = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
        dh = torch.randn(shape, device="cuda", dtype=dtype)
        h = torch.nn.functional.silu(g) * u
        h.backward(dh)
        dg, du, h_sum_err = _plain_swiglu_backward(dh, g, u)
        pairs = ((swiglu_forward(g.detach(), u.detach()), h), (du, u.grad), (dg, g.grad))
        differing = [int((a != b).sum()) for a, b in pairs]
        errs = [rel(a, b) for a, b in pairs]
        ok = (max(differing[:2]) == 0 and errs[2] < 1e-2) if dtype == torch.bfloat16 else max(errs) < 1e-3
        check(f"SwiGLU h, du, dg {dname} vs torch; h's LoRA sum", ok and h_sum_err < 1e-5,
              f"differing {differing}, rel " + ", ".join(f"{e:.1e}" for e in errs) + f", h sum {h_sum_err:.1e}")


def geglu(shape=(1000, 1337)):
    """GeGLU (Gemma's gelu_pytorch_tanh) against torch's gelu(approximate="tanh") * u and its autograd
    gradients: tanh from exp here, CUDA's tanhf in torch, so a few elements one ulp apart (counted)."""
    for dname, dtype in DTYPES.items():
        g = (torch.randn(shape, device="cuda") * 4).to(dtype).requires_grad_(True)
        u = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
        dh = torch.randn(shape, device="cuda", dtype=dtype)
        h = torch.nn.functional.gelu(g, approximate="tanh") * u
        h.backward(dh)
        dg, du, h_sum_err = _plain_swiglu_backward(dh, g, u, "gelu_tanh")
        pairs = ((swiglu_forward(g.detach(), u.detach(), activation="gelu_tanh"), h), (du, u.grad), (dg, g.grad))
        differing = [int((a != b).sum()) for a, b in pairs]
        errs = [rel(a, b) for a, b in pairs]
        check(f"GeGLU h, du, dg {dname} vs torch; h's LoRA sum", max(errs) < 1e-2 and h_sum_err < 1e-5,
              f"differing {differing} of {g.numel()}, rel " + ", ".join(f"{e:.1e}" for e in errs)
              + f", h sum {h_sum_err:.1e}")


def swiglu_with_lora_terms(shape=(1000, 1337), rank=16):
    """The LoRA terms added inside the SwiGLU kernels against cuBLAS' addmm_ followed by the plain kernels."""
    for dname, dtype in DTYPES.items():
        g, u, dh = ((torch.randn(shape, device="cuda") * s).to(dtype) for s in (3, 1, 1))
        term = lambda: LowRank(torch.randn(shape[0], rank, device="cuda", dtype=dtype),
                               torch.randn(shape[1], rank, device="cuda", dtype=dtype) * 0.1, 0.5)
        gate, up, dh_term = term(), term(), term()
        full = lambda base, t: base.clone().addmm_(t.xa, t.b.t(), alpha=t.scale)
        g_ref, u_ref, dh_ref = full(g, gate), full(u, up), full(dh, dh_term)
        h_ref = swiglu_forward(g_ref, u_ref)
        dg_ref, du_ref, _ = _plain_swiglu_backward(dh_ref, g_ref, u_ref)
        dg, du, (gate_sum, up_sum, h_sum) = swiglu_backward_(dh.clone(), g.clone(), u.clone(), dh_term, gate, up)
        sums = ((gate_sum, dg_ref, gate), (up_sum, du_ref, up), (h_sum, h_ref, dh_term))
        pairs = ((swiglu_forward(g, u, gate, up), h_ref), (dg, dg_ref), (du, du_ref),
                 *((got, left.double().t() @ t.xa.double()) for got, left, t in sums))
        errs = [rel(a, b) for a, b in pairs]
        check(f"SwiGLU + LoRA terms h, dg, du, LoRA sums {dname} vs addmm_ and products",
              max(errs) < (1e-2 if dtype == torch.bfloat16 else 1e-3), "rel " + ", ".join(f"{e:.1e}" for e in errs))


def trl_fused_head(shape="tiny-llama", steps_dtype=torch.bfloat16):
    """TRL's fused-head call (SFTTrainer's) answered by the chunked kernel against TRL's own head on the
    GPU (its fp32-accumulating cuBLAS path), under autocast: outputs and the LoRA gradients."""
    from trl.trainer.utils import add_fused_lm_head

    from qlora_fast.patching.core import CALLS

    results = []
    for patched in (False, True):
        model = tiny(steps_dtype, shape, init_b_std=0.02)  # B != 0: every adapter gets a gradient
        add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))
        if patched:
            patch_model(model, verbose=False)
        CALLS.clear()
        ids = torch.randint(0, model.config.vocab_size, (2, 128), device="cuda",
                            generator=torch.Generator("cuda").manual_seed(1))
        labels = ids.clone()
        labels[:, :16] = -100
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads, CALLS["trl_head"]))
    (theirs, their_grads, _), (ours, our_grads, served) = results
    errs = [rel(getattr(ours, f).detach(), getattr(theirs, f).detach()) for f in ("loss", "log_probs", "entropy")]
    grad_err = max(rel(our_grads[n], their_grads[n]) for n in their_grads)
    top1 = (ours.is_top1 == theirs.is_top1).float().mean().item()
    check(f"TRL fused head served ({shape}, autocast bf16) vs TRL's own", served == 1 and max(errs) < 2e-2
          and grad_err < 5e-2 and top1 > 0.99, "rel loss/log_probs/entropy {:.1e}/{:.1e}/{:.1e}, grads {:.1e}, "
          "top-1 agree {:.3f}".format(*errs, grad_err, top1))


def patched_against_peft(name, module, x, grad_out, bound=2e-2, seed=1):
    """Output, input gradient and every adapter gradient of `module` before and after patch_model."""
    torch.manual_seed(seed)
    stock = [t.clone() for t in forward_backward(module, x, grad_out)]
    patch_model(module)
    torch.manual_seed(seed)  # the same dropout mask
    errs = [rel(f, s) for f, s in zip(forward_backward(module, x, grad_out), stock)]
    check(f"{name} vs peft: output, dX, adapter grads", len(errs) == len(stock) and max(errs) < bound,
          "rel " + ", ".join(f"{e:.1e}" for e in errs))


def lora_layers_and_mlp():
    for dname, dtype in DTYPES.items():
        for (n, k) in [(4096, 4096), (333, 1000)][: 1 if dtype == torch.float16 else 2]:
            for dropout in (0.0, 0.1):
                layer = make_lora_nf4_linear(n, k, dtype=dtype, device="cuda", lora_dropout=dropout)
                x = torch.randn(4, 300, k, device="cuda", dtype=dtype, requires_grad=True)
                patched_against_peft(f"LoRA layer {n}x{k} {dname} dropout {dropout}", layer, x,
                                     torch.randn(4, 300, n, device="cuda", dtype=dtype))
        x = torch.randn(4, 300, 1024, device="cuda", dtype=dtype, requires_grad=True)
        # gradients summed in the SwiGLU kernel; h written for cuBLAS' GEMMs, the terms in the kernels (3000
        # columns: partial quantization blocks) or in the GEMMs (ops/terms_in_gemm.py)
        for rank, intermediate in ((16, 3000), (64, 3000), (64, 3072)):
            mlp = make_lora_nf4_mlp(1024, intermediate, r=rank, dtype=dtype, device="cuda")
            patched_against_peft(f"SwiGLU MLP 1024x{intermediate} r={rank} {dname}", mlp, x, torch.randn_like(x))


def packed_attention_kernels():
    """Attention within each sequence of a packed 4096-token row (Llama-3-8B heads, bf16) on the GPU's
    backend, against float32 attention of each sequence alone: output and q/k/v gradients."""
    from qlora_fast.ops.packed_attention import backend, find_packed_sequences, packed_attention

    torch.manual_seed(0)
    lengths = [int(n) for n in torch.randint(100, 900, (12,))]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None].cuda()
    total = position_ids.shape[1]
    q = torch.randn(1, 32, total, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, 8, total, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    grad = torch.randn(1, total, 32, 128, device="cuda", dtype=torch.bfloat16)
    out = packed_attention(q, k, v, find_packed_sequences(position_ids, 1))
    out.backward(grad)
    ours = [out.detach(), q.grad, k.grad, v.grad]
    ref_inputs = [t.detach().float().requires_grad_(True) for t in (q, k, v)]
    pieces, start = [], 0
    for n in lengths:
        one = [t[:, :, start:start + n] for t in ref_inputs]
        pieces.append(torch.nn.functional.scaled_dot_product_attention(*one, is_causal=True, enable_gqa=True))
        start += n
    ref = torch.cat(pieces, dim=2).transpose(1, 2)
    ref.backward(grad.float())
    errs = [rel(a, b) for a, b in zip(ours, [ref] + [t.grad for t in ref_inputs])]
    check(f"packed attention ({backend(q.transpose(1, 2))}) {len(lengths)} sequences, {total} tokens, bf16: "
          "out, dq, dk, dv vs each sequence alone in fp32", max(errs) < 1e-2,
          "rel " + ", ".join(f"{e:.1e}" for e in errs))


def kept_attention_kernels():
    """Causal attention through two offloaded-checkpoint layers with its output kept for the recompute
    (ops/kept_attention.py), against sdpa under torch's checkpoint (Llama-3-8B heads, bf16, grouped and
    repeated k/v; q and k also as transformers' RoPE hands them, new (batch, heads, len, dim) tensors beside
    v's view of the projection, Phi-3's case: the output then takes q's layout and dout another, which the
    backward must pass on as sdpa does, torch's cuDNN graph cache ignoring dout's layout): the same fused
    kernel runs both, so the outputs must be the same bits; the gradients agree to cuDNN's own run-to-run
    spread (its dq sums with atomics: 3e-5..6e-5 relative measured)."""
    import functools

    from torch.utils.checkpoint import checkpoint

    from qlora_fast.ops.kept_attention import _fused_kernel, kept_attention
    from qlora_fast.ops.offloaded_checkpoint import keep_outcomes, offloaded_checkpoint

    def sdpa(key, q, k, v, scale):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                                enable_gqa=k.shape[1] != q.shape[1])

    for kv_heads, rotated in ((8, False), (32, False), (8, True)):
        torch.manual_seed(0)
        wq = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
        wkv = torch.randn(2 * kv_heads * 128, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        x0 = torch.randn(2, 4096, 4096, device="cuda", dtype=torch.bfloat16)

        def layer(x, attend):
            q = (x @ wq.T).view(2, 4096, 32, 128).transpose(1, 2)
            k, v = (x @ (wkv * 0.02).T).view(2, 4096, 2, kv_heads, 128).unbind(2)
            k = k.transpose(1, 2)
            if rotated:
                q, k = q.contiguous(), k.contiguous()
            out = attend(wq, q, k, v.transpose(1, 2), 128 ** -0.5)
            return x + out.transpose(1, 2).reshape(2, 4096, 4096)

        def run(attend, checkpoint_fn):
            x = x0.clone().requires_grad_(True)
            wkv.grad = None
            h = checkpoint_fn(functools.partial(layer, attend=attend), x)
            h = checkpoint_fn(functools.partial(layer, attend=attend), h)
            h.float().square().sum().backward()
            return [h.detach(), x.grad, wkv.grad]

        reference = run(sdpa, functools.partial(checkpoint, use_reentrant=False))
        keep_outcomes(reset=True)
        ours = run(kept_attention, offloaded_checkpoint)
        kept = keep_outcomes(reset=True).get("kept", 0)
        errs = [rel(a, b) for a, b in zip(ours, reference)]
        q = torch.empty(2, 32, 4096, 128, device="cuda", dtype=torch.bfloat16)
        kv = torch.empty(2, kv_heads, 4096, 128, device="cuda", dtype=torch.bfloat16)
        kernel = _fused_kernel(q, kv, kv, None)
        check(f"kept attention, {kv_heads} k/v heads{', q and k rotated apart' if rotated else ''} "
              f"({kernel.forward.__name__ if kernel else 'sdpa math'}): "
              "out bit-equal to sdpa under torch's checkpoint, dx and dW_kv within 1e-3; outputs kept",
              torch.equal(ours[0], reference[0]) and max(errs[1:]) < 1e-3 and kept == 2,
              f"kept {kept}, rel " + ", ".join(f"{e:.1e}" for e in errs))


def tiny(dtype=torch.bfloat16, shape="tiny-llama", init_b_std=0.0):
    model = quantize_to_nf4_(random_causal_lm(shape, dtype, "cuda"), compute_dtype=dtype)
    return add_lora(model, r=16, lora_alpha=32, alpha_pattern={"down_proj": 8}, init_b_std=init_b_std)


def batches(vocab, n=2, batch=2, seq=128):
    return [{"input_ids": (ids := torch.randint(0, vocab, (batch, seq))), "labels": ids} for _ in range(n)]


def packed_batches(vocab, n=2, lengths=(100, 37, 300, 75, 12)):
    """Padding-free rows as TRL's packing hands them over (harness.run.packed_batch)."""
    return [packed_batch(torch.randint(0, vocab, (sum(lengths),)).split(lengths)) for _ in range(n)]


def whole_models():
    for shape in ("tiny-llama", "tiny-qwen2", "tiny-gemma", "tiny-phi3"):
        model = tiny(shape=shape)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        report = verify(model, batches(512), torch.bfloat16)  # offloaded checkpoints (the default) included
        check(f"verify {shape} bf16, checkpoints offloaded", report.passed, report.verdict())
        report = verify(model, packed_batches(512), torch.bfloat16)
        check(f"verify {shape} bf16, packed rows", report.passed and report.calls.get("packed_attention", 0) > 0,
              f"{report.verdict()} packed attention calls {report.calls.get('packed_attention', 0)}")
    model = tiny(shape="tiny-gemma2")  # softcapped loss (chunked) and attention (stock), four Gemma norms a layer
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    report = verify(model, batches(512), torch.bfloat16)
    check("verify tiny-gemma2 bf16, checkpoints offloaded", report.passed, report.verdict())
    from peft import prepare_model_for_kbit_training

    model = quantize_to_nf4_(random_causal_lm("llama-3.2-1b", torch.bfloat16, "cuda"))
    model = add_lora(prepare_model_for_kbit_training(model, use_gradient_checkpointing=False))
    report = verify(model, batches(128256, seq=256), torch.bfloat16, autocast_dtype=torch.bfloat16)
    check("verify llama-3.2-1b prepared (fp32 norms/embeddings/head) under autocast", report.passed, report.verdict())
    # r=64, checkpointed: the recompute's MLP takes its terms in the base GEMMs (ops/terms_in_gemm.py) and
    # skips the output where the layer only adds it (Llama, Phi-3); Gemma-2's tied embedding held in bf16
    for shape in ("tiny-llama", "tiny-phi3", "tiny-gemma2"):
        model = quantize_to_nf4_(random_causal_lm(shape, torch.bfloat16, "cuda"))
        model = add_lora(prepare_model_for_kbit_training(model, use_gradient_checkpointing=False), r=64,
                         lora_alpha=64)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        report = verify(model, batches(512), torch.bfloat16, autocast_dtype=torch.bfloat16)
        check(f"verify {shape} prepared r=64 under autocast, checkpoints offloaded", report.passed, report.verdict())
    phi3_qkv_proj_row_blocks()


def phi3_qkv_proj_row_blocks():
    """Phi-3's attention over the fused q/k/v Function (qkv_proj's row blocks), on a tiny Phi-3 256 wide
    (q's, k's and v's rows on blocks of absmax codes, as Phi-3's are), bf16 and prepared."""
    from peft import prepare_model_for_kbit_training
    from qlora_fast.harness.models import MODEL_SHAPES

    family, config = MODEL_SHAPES["tiny-phi3"]
    MODEL_SHAPES["tiny-phi3-256"] = (family, {**config, "hidden_size": 256})
    try:
        model = tiny(shape="tiny-phi3-256")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        report = verify(model, batches(512), torch.bfloat16)
        check("verify tiny-phi3-256 bf16, qkv_proj row blocks", report.passed and report.calls.get("qkv", 0) > 0,
              f"{report.verdict()} qkv calls {report.calls.get('qkv', 0)}")
        model = quantize_to_nf4_(random_causal_lm("tiny-phi3-256", torch.bfloat16, "cuda"))
        model = add_lora(prepare_model_for_kbit_training(model, use_gradient_checkpointing=False))
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        report = verify(model, batches(512), torch.bfloat16, autocast_dtype=torch.bfloat16)
        check("verify tiny-phi3-256 prepared under autocast, qkv_proj row blocks",
              report.passed and report.calls.get("qkv", 0) > 0, report.verdict())
    finally:
        del MODEL_SHAPES["tiny-phi3-256"]


def pinned_buffers_across_lengths():
    """Offloaded checkpoints over steps whose length changes (packed rows): a shorter step's copies reuse the
    pinned buffers of a longer one, where their sizes fall below a power of two (64 wide: a layer input of
    500 tokens is 64,000 bytes, of 200 tokens 25,600, of 100 tokens 12,800)."""
    from qlora_fast.ops import offloaded_checkpoint

    model = tiny().train()
    model.enable_input_require_grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    report = patch_model(model, verbose=False)
    pool = offloaded_checkpoint._pinned_buffers

    def step(length):
        ids = torch.randint(0, model.config.vocab_size, (1, length), device="cuda")
        model(input_ids=ids, labels=ids).loss.backward()
        torch.cuda.synchronize()

    step(500)
    made = pool.allocated
    for length in (300, 200, 100, 500):
        step(length)
    check("offloaded copies reuse their pinned buffers as steps get shorter",
          report.offloaded_checkpoints and made > 0 and pool.allocated == made,
          f"buffers made after the first step {made}, after five {pool.allocated}")


def main():
    if not torch.cuda.is_available():
        sys.exit("gpu_checks: needs a CUDA GPU")
    torch.manual_seed(0)
    steps = (dequantize_and_in_gemm_matmul, stacked_dequantize, relaunch_paths, scaled_mm_outputs, low_rank_add_branches,
             cross_entropy, softcapped_cross_entropy, swiglu, geglu, swiglu_with_lora_terms, lora_layers_and_mlp,
             packed_attention_kernels, kept_attention_kernels, trl_fused_head, whole_models,
             pinned_buffers_across_lengths)
    chosen = sys.argv[1:] or [step.__name__ for step in steps]  # `gpu_checks.py stacked_dequantize ...`: those only
    for step in steps:
        if step.__name__ in chosen:
            try:
                step()
            except Exception as error:  # one step's crash is its failure, not the end of the others
                traceback.print_exc()
                check(f"{step.__name__} ran to its end", False, f"{type(error).__name__}: {error}")
    print(f"{sum(RESULTS)}/{len(RESULTS)} checks passed on {torch.cuda.get_device_name()}")
    sys.exit(0 if all(RESULTS) else 1)


if __name__ == "__main__":
    main()
