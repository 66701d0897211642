"""Timings of the NF4 kernels and their peers (run through the device tool; see bench/RESULTS.md).

  python bench/kernel_timings.py --out $OUT/kernels.md

Correctness on the GPU is bench/gpu_checks.py's job (run it first); these are timings:
1. dequantize time: qlora_fast vs bitsandbytes vs peft (vs unsloth's fast_dequantize when installed);
2. in-GEMM vs dequantize + cuBLAS by token count (sets ops/nf4_linear.py FUSED_MAX_ROWS);
3. LoRA linear forward+backward: stock peft vs patched, time and peak memory;
4. RMSNorm forward+backward: transformers' LlamaRMSNorm vs the Triton kernel;
5. SwiGLU MLP (gate/up/down LoRA on NF4) forward+backward: stock peft vs the fused MLP Function;
6. rotary embedding of q and k forward+backward: transformers' apply_rotary_pos_emb vs the kernel; and
   the fused q/k/v with RoPE inside it against the fused q/k/v followed by the RoPE kernel;
7. the LM loss: transformers' (full logits) vs the chunked loss with the cross-entropy kernel;
8. host cost per call (tiny inputs, so launches and Python dominate): a torch op, Triton launches, a LoRA
   layer and an MLP forward+backward, stock peft vs patched.
"""

import argparse
import datetime
import json
import time

import torch
import triton
from triton.testing import do_bench

import bitsandbytes.functional as F
from qlora_fast import patch_model
from qlora_fast.kernels.nf4_dequantize import CANDIDATE_META, nf4_dequantize, nf4_dequantize_stacked
from qlora_fast.kernels.nf4_matmul import nf4_matmul
from qlora_fast.kernels.low_rank import CANDIDATE_META as TILE_META, LOW_RANK_ADD_META
from qlora_fast.kernels.low_rank import LowRank
from qlora_fast.kernels import swiglu as swiglu_kernels
from qlora_fast.kernels.low_rank_add import low_rank_add_
from qlora_fast.kernels.swiglu import BACKWARD_CANDIDATE_META, swiglu_backward_, swiglu_backward_writing_h_, swiglu_forward
from qlora_fast.nf4 import nf4_weight_from_bnb
from qlora_fast.ops import lora_nf4_mlp
from qlora_fast.testing import forward_backward, make_lora_nf4_linear, make_lora_nf4_mlp, make_nf4_linear

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
DEQUANT_SHAPES = [(4096, 14336), (14336, 4096), (2048, 8192), (1024, 4096)]  # (out, in) = Llama-3 8B/1B MLP


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def median_ms(fn):
    return do_bench(fn, warmup=50, rep=300, return_mode="median")


def random_term(rows: int, cols: int, rank: int = 16) -> LowRank:
    """A bf16 LoRA term s * xa @ B^T on the GPU of the sizes the layers see (s = 0.5, B ~ 0.1 N(0, 1))."""
    return LowRank(torch.randn(rows, rank, device="cuda", dtype=torch.bfloat16),
                   torch.randn(cols, rank, device="cuda", dtype=torch.bfloat16) * 0.1, 0.5)


def time_swiglu(rows):
    """SwiGLU with the gate/up (forward and backward) and dh (backward) LoRA terms, r=16 bf16. Forward per
    tile launch candidate, against cuBLAS' in-place addmm_ of each term followed by the kernel without
    terms, and each candidate's share of elements differing from that reference; backward (which also
    sums the gate and up B and down A gradients) per BACKWARD_CANDIDATE_META, its sums against GEMMs of
    the dg and du it wrote and of forward's h."""
    for tokens in (2048, 8192):
        shape = (tokens, 14336)
        g, u, dh = ((torch.randn(shape, device="cuda") * s).to(torch.bfloat16) for s in (3, 1, 1))
        gate, up, dh_term = (random_term(*shape) for _ in range(3))
        add = lambda base, t: base.addmm_(t.xa, t.b.t(), alpha=t.scale)
        h_ref = swiglu_forward(add(g.clone(), gate), add(u.clone(), up))
        work = [t.clone() for t in (g, u, dh)]  # the timings overwrite it again and again
        rows.append({"tokens": tokens, "meta": "addmm_ + kernel without terms",
                     "fwd_ms": median_ms(lambda: swiglu_forward(add(work[0], gate), add(work[1], up)))})
        rows.append({"tokens": tokens, "meta": "kernel without terms (what the terms cost)",
                     "fwd_ms": median_ms(lambda: swiglu_forward(work[0], work[1]))})
        for meta in TILE_META:
            h = swiglu_forward(g, u, gate, up, meta=meta)
            # addmm_ may round the product before adding it; the kernels round the sum once, as peft does
            rows.append({"tokens": tokens, "meta": str(meta), "differing": round(float((h != h_ref).float().mean()), 6),
                         "rel_err h": round(rel_err(h, h_ref), 6),
                         "fwd_ms": median_ms(lambda: swiglu_forward(work[0], work[1], gate, up, meta))})
        h = swiglu_forward(g, u, gate, up)
        for meta in BACKWARD_CANDIDATE_META:
            dg, du, sums = swiglu_backward_(dh.clone(), g.clone(), u.clone(), dh_term, gate, up, meta=meta)
            products = [left.t().float() @ t.xa.float() for left, t in ((dg, gate), (du, up), (h, dh_term))]
            rows.append({"tokens": tokens, "meta": f"backward {meta}",
                         "rel_err sums": round(max(rel_err(a, b) for a, b in zip(sums, products)), 6),
                         "bwd_ms": median_ms(lambda: swiglu_backward_(work[2], work[0], work[1], dh_term, gate, up,
                                                                      meta=meta))})
        _time_forward_by_rank(rows, tokens, work)
        _time_backward_by_rank(rows, tokens, work)


def _time_forward_by_rank(rows, tokens, work):
    """The forward with its two terms inside, per tile launch candidate, at ranks 16 to 128, against
    cuBLAS adding each term (addmm_) before the kernel without terms: whether large ranks want other tiles,
    or the terms outside the kernel (at r=64 the forward took 0.447 ms a call in the step, 0.245 at r=16;
    bench/RESULTS.md, session 19)."""
    for rank in (16, 32, 64, 128):
        gate, up = (random_term(tokens, work[0].shape[1], rank) for _ in range(2))
        rows.append({"tokens": tokens, "meta": f"forward rank {rank}: addmm_ + kernel without terms",
                     "fwd_ms": median_ms(lambda: swiglu_forward(work[0].addmm_(gate.xa, gate.b.t(), alpha=gate.scale),
                                                                work[1].addmm_(up.xa, up.b.t(), alpha=up.scale)))})
        for meta in TILE_META:
            rows.append({"tokens": tokens, "meta": f"forward rank {rank}: {meta}",
                         "fwd_ms": median_ms(lambda: swiglu_forward(work[0], work[1], gate, up, meta))})


def _time_backward_by_rank(rows, tokens, work):
    """Both backward launches at ranks either side of SUMS_MAX_RANK: the one that sums the LoRA gradients
    in the kernel, and the one that writes h, with the three GEMMs that then form them."""
    for rank in (16, 32, 64, 128):
        terms = [random_term(tokens, work[0].shape[1], rank) for _ in range(3)]
        rows.append({"tokens": tokens, "meta": f"backward summing, rank {rank}",
                     "bwd_ms": median_ms(lambda: swiglu_backward_(work[2], work[0], work[1], *terms))})
        writing_h = lambda: [w.t() @ t.xa for w, t in zip(swiglu_backward_writing_h_(work[2], work[0], work[1], *terms),
                                                           terms[1:] + terms[:1])]
        rows.append({"tokens": tokens, "meta": f"backward writing h + its 3 GEMMs, rank {rank}",
                     "bwd_ms": median_ms(writing_h)})


# Tiles for the SwiGLU kernels at large ranks that ptxas compiles without spills on sm_90 (forward: (BLOCK_M,
# BLOCK_N, warps); backward: (BLOCK_M, BLOCK_N) at 8 warps and the xa budget that lets BLOCK_M stand)
LARGE_RANK_FORWARD_TILES = [(32, 64, 4), (64, 64, 4), (64, 64, 8), (128, 64, 8), (64, 128, 8)]
LARGE_RANK_BACKWARD_TILES = [(16, 64), (32, 64), (64, 64), (64, 32)]


def time_large_rank_tiles(rows):
    """The SwiGLU kernels with their LoRA terms inside at r=64 and 128, (8192 x 14336) bf16, as the
    prepared recipe runs them (wide: fp32 sums): the forward per tile, the h-writing backward per tile,
    each against the kernel without terms (the floor: what the terms cost is the difference). The tiles
    kernels/swiglu.py takes above rank 32 were picked from this (bench/RESULTS.md, session 20)."""
    tokens, cols = 8192, 14336
    g, u, dh = ((torch.randn(tokens, cols, device="cuda") * s).to(torch.bfloat16) for s in (3, 1, 1))
    for rank in (64, 128):
        gate, up, dh_term = (random_term(tokens, cols, rank) for _ in range(3))
        row = {"rank": rank, "forward without terms": median_ms(lambda: swiglu_forward(g, u, wide=True))}
        for bm, bn, warps in LARGE_RANK_FORWARD_TILES:
            meta = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps}
            try:
                row[f"fwd {bm}x{bn}/{warps}"] = median_ms(lambda: swiglu_forward(g, u, gate, up, meta, wide=True))
            except triton.runtime.errors.OutOfResources:
                row[f"fwd {bm}x{bn}/{warps}"] = "out of shared memory"
        rows.append(row)
        row = {"rank": rank, "backward without terms": median_ms(
            lambda: swiglu_backward_writing_h_(dh, g, u, wide=True))}
        budgets = (swiglu_kernels.LARGE_RANK_BACKWARD_BLOCK_M, swiglu_kernels._LARGE_RANK_XA_BUDGET,
                   swiglu_kernels._B_TILES_BUDGET)
        try:
            for bm, bn in LARGE_RANK_BACKWARD_TILES:
                swiglu_kernels.LARGE_RANK_BACKWARD_BLOCK_M, swiglu_kernels._LARGE_RANK_XA_BUDGET = bm, bm * rank
                swiglu_kernels._B_TILES_BUDGET = max(bn * rank, budgets[2])
                meta = dict(swiglu_kernels.SWIGLU_BACKWARD_META, BLOCK_N=bn)
                try:
                    row[f"bwd {bm}x{bn}"] = median_ms(lambda: swiglu_backward_writing_h_(
                        dh, g, u, dh_term, gate, up, meta=meta, wide=True))
                except triton.runtime.errors.OutOfResources:
                    row[f"bwd {bm}x{bn}"] = "out of shared memory"
        finally:
            (swiglu_kernels.LARGE_RANK_BACKWARD_BLOCK_M, swiglu_kernels._LARGE_RANK_XA_BUDGET,
             swiglu_kernels._B_TILES_BUDGET) = budgets
        rows.append(row)


def time_low_rank_add(rows):
    """y += s * xa @ B^T (r=16, bf16) in place: cuBLAS' addmm_ against the tile kernel per launch candidate,
    on the outputs the LoRA layers update (q as a column block of the stacked q/k/v output); and the MLP's
    down output with the layer's residual added in the same pass or after it."""
    for tokens in (2048, 8192):
        for name, width, cols in (("o_proj / dX", 4096, slice(None)), ("q block of q/k/v", 6144, slice(0, 4096)),
                                  ("k block of q/k/v", 6144, slice(4096, 5120))):
            pristine = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16)
            y = pristine.clone()[:, cols]  # the timings add into it again and again
            term = random_term(tokens, y.shape[1])
            expected = pristine[:, cols].clone().addmm_(term.xa, term.b.t(), alpha=term.scale)
            gb = 2 * y.numel() * 2 / 1e9
            addmm_ms = median_ms(lambda: y.addmm_(term.xa, term.b.t(), alpha=term.scale))
            rows.append({"tokens": tokens, "output": f"{name} {tuple(y.shape)}", "meta": "addmm_",
                         "ms": addmm_ms, "TB_per_s": gb / addmm_ms})
            for meta in TILE_META:
                ours = low_rank_add_(pristine.clone()[:, cols], term, meta)
                kernel_ms = median_ms(lambda: low_rank_add_(y, term, meta))
                rows.append({"tokens": tokens, "output": f"{name} {tuple(y.shape)}", "meta": str(meta),
                             "ms": kernel_ms, "TB_per_s": gb / kernel_ms, "rel_err": rel_err(ours, expected)})
            columns_adjacent = LowRank(term.xa, term.b.t().contiguous().t(), term.scale)
            kernel_ms = median_ms(lambda: low_rank_add_(y, columns_adjacent))
            rows.append({"tokens": tokens, "output": f"{name} {tuple(y.shape)}",
                         "meta": f"{LOW_RANK_ADD_META}, B columns-adjacent", "ms": kernel_ms,
                         "TB_per_s": gb / kernel_ms})
        _time_residual_add(rows, tokens)
        _time_low_rank_add_by_rank(rows, tokens)


def _time_low_rank_add_by_rank(rows, tokens, width=4096):
    """o_proj's (tokens x 4096) output at ranks 16 to 128, per tile launch candidate and with addmm_: whether
    large ranks want other tiles or cuBLAS (at r=64 a call took 73 us in the step, 44 at r=16)."""
    y = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16)
    gb = 2 * y.numel() * 2 / 1e9
    for rank in (16, 64, 128):
        term = random_term(tokens, width, rank)
        candidates = [("addmm_", lambda: y.addmm_(term.xa, term.b.t(), alpha=term.scale))]
        candidates += [(str(meta), lambda meta=meta: low_rank_add_(y, term, meta)) for meta in TILE_META]
        for meta, add in candidates:
            ms = median_ms(add)
            rows.append({"tokens": tokens, "output": f"o_proj {tokens} x {width}, rank {rank}", "meta": meta,
                         "ms": ms, "TB_per_s": gb / ms})


def _time_residual_add(rows, tokens, width=4096):
    """The MLP's down output plus the layer's residual: the term into a new output and torch's add after
    it, against both in one pass (low_rank_add_'s residual); fp32 as on a prepared model, and bf16."""
    y = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16)
    term = random_term(tokens, width)
    for dtype in (torch.float32, torch.bfloat16):
        residual = torch.randn(tokens, width, device="cuda", dtype=dtype)
        out = torch.empty_like(residual)
        two_passes = lambda: residual + low_rank_add_(y, term, out=out)
        one_pass = lambda: low_rank_add_(y, term, out=out, residual=residual)
        same = torch.equal(two_passes(), one_pass().clone())
        for meta, fn in (("term, then torch's add", two_passes), ("residual inside the term pass", one_pass)):
            rows.append({"tokens": tokens, "output": f"MLP down + residual {(tokens, width)} {dtype}", "meta": meta,
                         "ms": median_ms(fn), "same bits": same})


def _qkv_layers(dtype, k=4096, heights=(4096, 1024, 1024)):
    return [make_nf4_linear(n, k, dtype, True, device="cuda") for n in heights]


def time_dequant(rows):
    fast_dequantize = _unsloth_fast_dequantize()
    from peft.utils.integrations import dequantize_bnb_weight

    for (n, k) in DEQUANT_SHAPES:
        for dname, dtype in DTYPES.items():
            layer = make_nf4_linear(n, k, dtype, True, device="cuda")
            p, qs = layer.weight, layer.weight.quant_state
            w = nf4_weight_from_bnb(p)
            out = torch.empty((n, k), dtype=dtype, device="cuda")
            times = {
                "qlora_fast": median_ms(lambda: nf4_dequantize(w, out=out)),
                **{f"qlora_fast {m['BLOCKS_PER_PROGRAM']}/{m['num_warps']}w{' streaming' if m.get('STREAMING') else ''}":
                   median_ms(lambda m=m: nf4_dequantize(w, out=out, meta=m)) for m in CANDIDATE_META[1:]},
                "bnb": median_ms(lambda: F.dequantize_4bit(p.data, qs)),
                "peft": median_ms(lambda: dequantize_bnb_weight(p, state=None)),
            }
            if fast_dequantize is not None:
                times["unsloth"] = median_ms(lambda: fast_dequantize(p, qs))
            moved = p.numel() + qs.absmax.numel() + n * k * out.element_size()
            rows.append({"shape": f"{n}x{k}", "dtype": dname, **{f"{key}_ms": v for key, v in times.items()},
                         "qlora_fast_GBps": moved / times["qlora_fast"] / 1e6})
    for dname, dtype in DTYPES.items():  # Llama-3-8B's q, k, v: one launch, or one each into one buffer
        weights = [nf4_weight_from_bnb(l.weight) for l in _qkv_layers(dtype)]
        buffer = torch.empty(6144, 4096, dtype=dtype, device="cuda")
        each = lambda: [nf4_dequantize(w, out=rows_) for w, rows_ in zip(weights, buffer.split([4096, 1024, 1024]))]
        tiny = [nf4_weight_from_bnb(l.weight) for l in _qkv_layers(dtype, k=256, heights=(256, 64, 64))]
        tiny_buffer = torch.empty(384, 256, dtype=dtype, device="cuda")
        tiny_each = lambda: [nf4_dequantize(w, out=r) for w, r in zip(tiny, tiny_buffer.split([256, 64, 64]))]
        rows.append({"shape": "q/k/v 4096+1024+1024 x 4096", "dtype": dname, "qlora_fast_ms": median_ms(each),
                     "qlora_fast stacked_ms": median_ms(lambda: nf4_dequantize_stacked(weights, dtype)),
                     "tiny q/k/v host us, stacked": host_us_per_call(lambda: nf4_dequantize_stacked(tiny, dtype)),
                     "tiny q/k/v host us, three launches": host_us_per_call(tiny_each)})


def _unsloth_fast_dequantize():
    """unsloth's fast_dequantize when unsloth is installed (WITH_PEERS=1) and imports within 90 s."""
    import subprocess
    import sys

    probe = "import unsloth.kernels.utils as u; u.fast_dequantize"
    try:
        subprocess.run([sys.executable, "-c", probe], check=True, timeout=90, capture_output=True)
        from unsloth.kernels.utils import fast_dequantize
        return fast_dequantize
    except Exception as exc:
        print("unsloth not available:", repr(exc)[-300:], flush=True)
        return None


def time_crossover(rows):
    for (n, k) in [(4096, 4096), (14336, 4096)]:
        layer = make_nf4_linear(n, k, torch.bfloat16, True, device="cuda")
        w = nf4_weight_from_bnb(layer.weight)
        for m in (1, 16, 128, 512):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
            rows.append({
                "shape": f"{n}x{k}", "M": m,
                "fwd_fused_ms": median_ms(lambda: nf4_matmul(x, w, True)),
                "fwd_dequant_cublas_ms": median_ms(lambda: x @ nf4_dequantize(w, x.dtype).t()),
                "bwd_fused_ms": median_ms(lambda: nf4_matmul(dy, w, False)),
                "bwd_dequant_cublas_ms": median_ms(lambda: dy @ nf4_dequantize(w, dy.dtype)),
            })


def time_lora_layer(rows):
    for (n, k) in [(14336, 4096), (4096, 14336), (4096, 4096)]:
        for m in (512, 2048, 8192):
            layer = make_lora_nf4_linear(n, k, r=16, dtype=torch.bfloat16, device="cuda")
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            gy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)

            def step():
                x.grad = None
                layer.zero_grad(set_to_none=True)
                layer(x).backward(gy)

            row = {"shape": f"{n}x{k}", "M": m}
            for name in ("peft", "qlora_fast"):
                if name == "qlora_fast":
                    patch_model(layer)
                step()
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                step()
                torch.cuda.synchronize()
                row[f"{name}_peak_MiB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
                row[f"{name}_ms"] = median_ms(step)
            row["speedup"] = row["peft_ms"] / row["qlora_fast_ms"]
            rows.append(row)


def time_rms_norm(rows):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from qlora_fast.ops.rms_norm import rms_norm

    for tokens in (2048, 8192):
        norm = LlamaRMSNorm(4096).to("cuda", torch.bfloat16).requires_grad_(False)
        x = torch.randn(tokens, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        gy = torch.randn_like(x)
        hf = lambda: norm(x).backward(gy)
        ours = lambda: rms_norm(x, norm.weight, norm.variance_epsilon).backward(gy)
        x.grad = None
        hf()
        ref = x.grad.clone()
        x.grad = None
        ours()
        dx_rel_err = rel_err(x.grad, ref)  # before timing, which accumulates into x.grad
        rows.append({"tokens x hidden": f"{tokens}x4096", "hf_fwd_bwd_ms": median_ms(hf),
                     "qlora_fast_fwd_bwd_ms": median_ms(ours), "dx_rel_err": dx_rel_err})


def time_add_rms_norm(rows):
    """A decoder layer's `residual + delta` then RMSNorm, forward and backward with the gradient the
    sum gets from the residual path: torch's add, the norm kernel and autograd's gradient sum, against
    add_rms_norm (one kernel each way); bit-for-bit equal on the GPU too."""
    from qlora_fast.ops.rms_norm import add_rms_norm, rms_norm

    for tokens in (2048, 8192):
        weight = torch.randn(4096, device="cuda").mul(0.2).add(1.0).to(torch.bfloat16)
        residual, delta = (torch.randn(tokens, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                           for _ in range(2))
        grads = [torch.randn(tokens, 4096, device="cuda", dtype=torch.bfloat16) for _ in range(2)]

        def separate():
            total = residual + delta
            torch.autograd.backward([total, rms_norm(total, weight, 1e-5)], grads)

        def fused():
            torch.autograd.backward(list(add_rms_norm(residual, delta, weight, 1e-5)), grads)

        results = []
        for step in (separate, fused):
            residual.grad = delta.grad = None
            step()
            results.append(residual.grad.clone())
        rows.append({"tokens x hidden": f"{tokens}x4096", "add_then_norm_fwd_bwd_ms": median_ms(separate),
                     "add_rms_norm_fwd_bwd_ms": median_ms(fused), "ok": torch.equal(*results)})


def _sdpa_case(backend, gqa: str, q, k, v):
    """One causal SDPA call on `backend`: k/v heads shared through enable_gqa, or repeated first (as
    transformers' repeat_kv does when SDPA cannot take GQA)."""
    from torch.nn.attention import sdpa_kernel

    def call():
        with sdpa_kernel([backend]):
            if gqa == "enable_gqa":
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            groups = q.shape[1] // k.shape[1]
            return torch.nn.functional.scaled_dot_product_attention(
                q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), is_causal=True)

    return call


def time_attention(rows):
    """Causal attention of Llama-3-8B's heads (32 query, 8 key/value, head_dim 128, bf16) per SDPA
    backend: a first pass's forward (no grad) and forward+backward, and the output's largest difference
    from the flash backend's. An attention of our own would pick the fastest that is exact enough."""
    from torch.nn.attention import SDPBackend

    cases = [(SDPBackend.FLASH_ATTENTION, "enable_gqa"), (SDPBackend.FLASH_ATTENTION, "repeat_kv"),
             (SDPBackend.CUDNN_ATTENTION, "enable_gqa"), (SDPBackend.CUDNN_ATTENTION, "repeat_kv"),
             (SDPBackend.EFFICIENT_ATTENTION, "enable_gqa")]
    for batch, seq in ((1, 2048), (4, 512), (4, 2048)):
        q = torch.randn(batch, 32, seq, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(batch, 8, seq, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                for _ in range(2))
        grad = torch.randn_like(q)
        with torch.no_grad():
            reference = _sdpa_case(SDPBackend.FLASH_ATTENTION, "enable_gqa", q, k, v)()
        for backend, gqa in cases:
            row = {"batch x seq": f"{batch}x{seq}", "backend": f"{backend.name} ({gqa})"}
            call = _sdpa_case(backend, gqa, q, k, v)
            try:
                with torch.no_grad():
                    row["max_abs_diff_vs_flash"] = (call() - reference).abs().max().item()
                    row["forward_ms"] = median_ms(call)
                row["fwd_bwd_ms"] = median_ms(lambda: call().backward(grad))
            except RuntimeError as error:  # a backend that refuses these inputs
                row["error"] = str(error).splitlines()[0][:80]
            rows.append(row)


def _peak_mib_and_ms(mlp, x, gy):
    """Peak MiB above what was allocated before, and median ms, of the MLP's forward + backward."""
    forward_backward(mlp, x, gy)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    forward_backward(mlp, x, gy)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20, median_ms(lambda: forward_backward(mlp, x, gy))


def time_mlp(rows):
    """peft's MLP against ours at r=16 and 64, its input in bf16 (the bf16 recipes) or fp32 (the prepared
    recipe's hidden states, bf16 compute); at r=64 with bf16 input also ours with the terms kept in the
    SwiGLU kernels instead of the GEMMs (ops/terms_in_gemm.py), what the default was before."""
    for rank in (16, 64):
        for m in (2048, 8192):
            for input_dtype in (torch.bfloat16, torch.float32):
                mlp = make_lora_nf4_mlp(4096, 14336, r=rank, dtype=torch.bfloat16, device="cuda")
                x = torch.randn(m, 4096, device="cuda", dtype=input_dtype, requires_grad=True)
                gy = torch.randn_like(x)
                row = {"shape": "4096x14336", "r": rank, "M": m, "input": str(input_dtype)[6:]}
                row["peft_peak_MiB"], row["peft_ms"] = _peak_mib_and_ms(mlp, x, gy)
                patch_model(mlp)
                row["qlora_fast_peak_MiB"], row["qlora_fast_ms"] = _peak_mib_and_ms(mlp, x, gy)
                row["speedup"] = row["peft_ms"] / row["qlora_fast_ms"]
                if rank > 32 and input_dtype == torch.bfloat16:
                    default, lora_nf4_mlp.terms_fit_in_gemm = lora_nf4_mlp.terms_fit_in_gemm, lambda *a: False
                    try:
                        _, row["terms in SwiGLU kernels ms"] = _peak_mib_and_ms(mlp, x, gy)
                    finally:
                        lora_nf4_mlp.terms_fit_in_gemm = default
                rows.append(row)


def time_rope(rows):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from qlora_fast.ops.rope import RoPEFunction

    for batch, seq in ((1, 2048), (4, 2048)):  # Llama-3-8B attention: 32 q heads, 8 kv heads, head_dim 128
        q = torch.randn(batch, seq, 32, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        k = torch.randn(batch, seq, 8, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        angles = torch.rand(batch, seq, 128, device="cuda") * 100
        cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
        dq, dk = torch.randn_like(q), torch.randn_like(k)
        q.requires_grad_(True)
        k.requires_grad_(True)

        def run(fn):
            q.grad = k.grad = None
            outs = fn(q, k, cos, sin)
            torch.autograd.backward(outs, [dq, dk])
            return [o.detach() for o in outs] + [q.grad, k.grad]

        pairs = list(zip(run(RoPEFunction.apply), run(apply_rotary_pos_emb)))
        differing = [int((a != b).sum()) for a, b in pairs]
        max_diff = [float((a.float() - b.float()).abs().max()) for a, b in pairs]
        rows.append({"batch x seq": f"{batch}x{seq}", "q/k/dq/dk elements differing": differing,
                     "max abs diff": max_diff,
                     "hf_fwd_bwd_ms": median_ms(lambda: run(apply_rotary_pos_emb)),
                     "qlora_fast_fwd_bwd_ms": median_ms(lambda: run(RoPEFunction.apply))})


def time_loss(rows):
    """The LM loss of (tokens x 4096) bf16 hidden states over Llama-3's 128256-token vocabulary."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    from qlora_fast.ops.linear_cross_entropy import causal_lm_loss

    vocab = 128256
    weight = torch.randn(vocab, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
    for tokens in (2048, 8192):
        hidden = torch.randn(1, tokens, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        labels = torch.randint(0, vocab, (1, tokens), device="cuda")
        hf = lambda: ForCausalLMLoss(hidden @ weight.t(), labels, vocab)
        ours = lambda: causal_lm_loss(hidden, weight, labels)
        row = {"tokens": tokens}
        results = {}
        for name, fn in (("hf", hf), ("qlora_fast", ours)):
            hidden.grad = None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            loss = fn()
            loss.backward()
            torch.cuda.synchronize()
            results[name] = (loss.detach(), hidden.grad.clone())
            row[f"{name}_peak_MiB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            row[f"{name}_fwd_bwd_ms"] = median_ms(lambda: fn().backward())
        row["loss_rel_diff"] = rel_err(results["qlora_fast"][0], results["hf"][0])
        row["grad_rel_err"] = rel_err(results["qlora_fast"][1], results["hf"][1])
        rows.append(row)


def host_us_per_call(fn, calls=200):
    """Wall microseconds per call over `calls` back-to-back calls; with tiny inputs the GPU keeps up, so
    this is the host's cost (Python, dispatch, launches)."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / calls * 1e6


def time_host(rows):
    from qlora_fast.kernels.rms_norm import rms_norm_forward

    x = torch.randn(16, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.ones(64, device="cuda", dtype=torch.bfloat16)
    small = nf4_weight_from_bnb(make_nf4_linear(64, 64, torch.bfloat16, True, device="cuda").weight)
    rows.append({"call": "torch.add (one aten launch)", "us": host_us_per_call(lambda: torch.add(x, 1))})
    rows.append({"call": "nf4_dequantize 64x64 (autotuned Triton launch)",
                 "us": host_us_per_call(lambda: nf4_dequantize(small))})
    rows.append({"call": "rms_norm_forward 16x64 (plain Triton launch)",
                 "us": host_us_per_call(lambda: rms_norm_forward(x, w, 1e-6))})
    layer = make_lora_nf4_linear(4096, 4096, dtype=torch.bfloat16, device="cuda")
    xl = torch.randn(1, 16, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    mlp = make_lora_nf4_mlp(4096, 14336, dtype=torch.bfloat16, device="cuda")
    for name in ("stock peft", "patched"):
        if name == "patched":
            patch_model(layer)
            patch_model(mlp)
        rows.append({"call": f"LoRA layer fwd+bwd, 16 tokens, {name}",
                     "us": host_us_per_call(lambda: layer(xl).sum().backward())})
        rows.append({"call": f"SwiGLU MLP fwd+bwd, 16 tokens, {name}",
                     "us": host_us_per_call(lambda: mlp(xl).sum().backward())})


def markdown(title, rows):
    if not rows:
        return ""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
    lines = [f"### {title}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n\n"


def time_terms_in_gemm(rows):
    """What carrying LoRA terms inside the base GEMM would cost: x @ W^T (bf16, 8192 tokens) with the
    rank-r factors appended along K ([x | xa] @ [W | s B]^T, operands as column slices of wider buffers,
    as a norm writing x into a wider buffer would leave them), against the plain GEMM; the passes that add
    the terms today are the swiglu and low_rank_add sections'."""
    tokens = 8192
    for name, n, k in (("gate or up", 14336, 4096), ("gate/up stacked", 28672, 4096), ("down", 4096, 14336),
                       ("o_proj", 4096, 4096), ("q/k/v (stacked)", 6144, 4096),
                       ("Qwen2.5-7B gate or up", 18944, 3584), ("Qwen2.5-7B down", 3584, 18944)):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
        plain = median_ms(lambda: x @ w.t())
        row = {"product": f"{name} ({tokens} x {k}) @ ({k} x {n})", "plain ms": plain,
               "TFLOP/s": 2 * tokens * n * k / (plain * 1e-3) / 1e12}
        for extra in (16, 32, 64, 128, 256):  # r, or 2r (gate and up's factors side by side), r up to 128
            w_wide = torch.randn(n, k + extra, device="cuda", dtype=torch.bfloat16)
            x_wide = torch.randn(tokens, k + extra, device="cuda", dtype=torch.bfloat16)
            row[f"K + {extra} ms"] = median_ms(lambda: x_wide @ w_wide.t())
        # the GEMM reading x as the first k columns of a wider buffer (the norm's output written there)
        x_in_wider = torch.randn(tokens, k + 64, device="cuda", dtype=torch.bfloat16)[:, :k]
        row["x strided ms"] = median_ms(lambda: x_in_wider @ w.t())
        # the dequantize writing W contiguously, and into the trailing columns of [B | W] at r=64
        nf4 = nf4_weight_from_bnb(make_nf4_linear(n, k, torch.bfloat16, device="cuda").weight)
        row["dequantize ms"] = median_ms(lambda: nf4_dequantize(nf4))
        into_wider = torch.empty(n, k + 64, device="cuda", dtype=torch.bfloat16)[:, 64:]
        row["dequantize into [B | W] ms"] = median_ms(lambda: nf4_dequantize(nf4, out=into_wider))
        rows.append(row)


def time_rotated_qkv(rows):
    """Llama-3-8B's fused q/k/v (NF4, r=16) forward+backward at 4x2048 with q and k rotated inside it, per
    launch candidate of the rotating kernel, against the same Function unrotated and then the RoPE kernel;
    a bf16 model and a prepared one (bf16 compute, fp32 q and k in stock, bf16 into attention)."""
    from qlora_fast.kernels import rope
    from qlora_fast.nf4 import cached_nf4_weight
    from qlora_fast.ops.lora_nf4_qkv import Rotary, lora_nf4_qkv
    from qlora_fast.ops.rope import RoPEFunction

    layers = [make_lora_nf4_linear(n, 4096, r=16, lora_alpha=32, dtype=torch.bfloat16, device="cuda")
              for n in (4096, 1024, 1024)]
    args = [(l.lora_A["default"].weight, l.lora_B["default"].weight, l.scaling["default"],
             cached_nf4_weight(l.base_layer.weight)) for l in layers]
    batch, seq = 4, 2048
    x = torch.randn(batch, seq, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    angles = torch.arange(seq, device="cuda")[:, None] * torch.rand(64, device="cuda")[None, :]
    angles = torch.cat([angles, angles], -1)[None]
    heads = lambda t: t.view(batch, seq, -1, 128).transpose(1, 2)
    for recipe, q_dtype in (("bf16 model", torch.bfloat16), ("prepared", torch.float32)):
        cos, sin = angles.cos().to(q_dtype), angles.sin().to(q_dtype)
        options = dict(compute_dtype=torch.bfloat16, out_dtype=q_dtype, v_dtype=torch.bfloat16)
        grads = [torch.randn(batch, 32 if i == 0 else 8, seq, 128, device="cuda", dtype=torch.bfloat16)
                 for i in range(3)]

        def unrotated():
            q, k, v = lora_nf4_qkv(x, *args, **options)
            q, k = RoPEFunction.apply(heads(q), heads(k), cos, sin, torch.bfloat16)
            return q, k, heads(v)

        def rotated():
            q, k, v = lora_nf4_qkv(x, *args, **options, rotary=Rotary(cos, sin, torch.bfloat16))
            return heads(q), heads(k), heads(v)

        def run(fn):
            x.grad = None
            for layer in layers:
                layer.zero_grad(set_to_none=True)
            outs = fn()
            torch.autograd.backward(outs, grads)
            return [o.detach() for o in outs] + [x.grad] + [l.lora_A["default"].weight.grad for l in layers]

        pairs = list(zip(run(rotated), run(unrotated)))
        differing = [int((a != b).sum()) for a, b in pairs]
        max_diff = max(float((a.float() - b.float()).abs().max()) for a, b in pairs)
        rows.append({"recipe": recipe, "path": "unrotated + RoPE kernel",
                     "fwd_bwd_ms": median_ms(lambda: run(unrotated))})
        default = dict(rope.ROPE_LORA_META)
        for meta in ({"BLOCK_M": 32, "num_warps": 4}, {"BLOCK_M": 64, "num_warps": 4},
                     {"BLOCK_M": 128, "num_warps": 8}, {"BLOCK_M": 64, "num_warps": 8}):
            rope.ROPE_LORA_META.update(meta)
            rows.append({"recipe": recipe, "path": f"rotated inside {meta}",
                         "fwd_bwd_ms": median_ms(lambda: run(rotated)),
                         "q/k/v/dX/dA elements differing": differing, "max abs diff": max_diff})
        rope.ROPE_LORA_META.update(default)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="kernels.md")
    parser.add_argument("--skip", nargs="*", default=[],
                        help="sections to skip: dequant crossover lora rmsnorm add_rms_norm mlp rope "
                             "rotated_qkv attention loss host swiglu low_rank_add terms_in_gemm "
                             "large_rank_tiles")
    parser.add_argument("--only", nargs="*", default=None, help="sections to run (default: all but --skip)")
    args = parser.parse_args()
    import bitsandbytes, peft
    header = (f"Date {datetime.date.today()}, GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, "
              f"triton {triton.__version__}, bitsandbytes {bitsandbytes.__version__}, peft {peft.__version__}\n\n")
    sections = [("dequant", "NF4 dequantize (median ms)", time_dequant),
                ("crossover", "In-GEMM vs dequantize + cuBLAS (median ms, bf16)", time_crossover),
                ("lora", "LoRA linear forward+backward, r=16 bf16 (median ms, peak MiB)", time_lora_layer),
                ("rmsnorm", "RMSNorm forward+backward, bf16, frozen weight (median ms)", time_rms_norm),
                ("add_rms_norm", "Residual add + RMSNorm forward+backward, bf16 (median ms; ok: same dX bits)",
                 time_add_rms_norm),
                ("mlp", "SwiGLU MLP forward+backward, LoRA on NF4 gate/up/down, bf16 compute (median ms, peak MiB)",
                 time_mlp),
                ("rope", "Rotary embedding of q and k forward+backward, bf16 (median ms)", time_rope),
                ("rotated_qkv", "Fused q/k/v forward+backward with RoPE inside, Llama-3-8B 4x2048 r=16 (median ms)",
                 time_rotated_qkv),
                ("attention", "Causal SDPA per backend, Llama-3-8B heads, bf16 (median ms)", time_attention),
                ("loss", "LM loss forward+backward, hidden 4096, vocab 128256, bf16 (median ms, peak MiB)",
                 time_loss),
                ("host", "Host cost per call, tiny inputs (wall us per call, back-to-back)", time_host),
                ("swiglu", "SwiGLU with LoRA terms per launch candidate, (tokens x 14336) bf16 r=16 (median ms)",
                 time_swiglu),
                ("low_rank_add", "LoRA term added in place, r=16 bf16 (median ms)", time_low_rank_add),
                ("terms_in_gemm", "The base GEMM with K widened for LoRA factors, bf16 (median ms)",
                 time_terms_in_gemm),
                ("large_rank_tiles", "SwiGLU kernels with their terms at large ranks per tile, wide (median ms)",
                 time_large_rank_tiles)]
    report, results = header, {}
    for key, title, fn in sections:
        if key in args.skip or (args.only is not None and key not in args.only):
            continue
        rows = []
        started = time.time()
        fn(rows)
        print(f"{key}: {time.time() - started:.0f} s", flush=True)
        results[key] = rows
        report += markdown(title, rows)
        print(markdown(title, rows), flush=True)
        with open(args.out, "w") as f:  # after every section, so that a later failure keeps these
            f.write(report)
        with open(args.out.replace(".md", ".json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
