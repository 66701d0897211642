"""Correctness of the branches that only a GPU takes, run before every GPU benchmark (CUDA only).

  python bench/gpu_checks.py          # one line per check, PASS/FAIL, exit status 1 on any FAIL

The CPU tests cover every kernel under Triton's interpreter; these are the paths the interpreter never
takes: the fp32-output GEMM of scaled_mm, low_rank_add_'s cuBLAS branch for small outputs, the wide (fp32
out) LoRA term, the stacked q/k/v dequantize's pointer table, the offloaded checkpoints' side-stream
copies, and whole patched models through verify() (step-0 gradients against stock peft, fused calls
counted), in bf16 and under autocast on a prepared model.
"""

import sys

import torch

from qlora_fast.harness.models import add_lora, quantize_to_nf4_, random_causal_lm
from qlora_fast.harness.verify import verify
from qlora_fast.kernels.low_rank import LowRank
from qlora_fast.kernels.low_rank_add import KERNEL_MIN_ELEMENTS, low_rank_add_
from qlora_fast.kernels.nf4_dequantize import nf4_dequantize, nf4_dequantize_stacked
from qlora_fast.nf4 import nf4_weight_from_bnb
from qlora_fast.ops.lora_grads import scaled_mm
from qlora_fast.testing import make_nf4_linear

RESULTS = []


def check(name: str, ok: bool, detail: str = "") -> None:
    RESULTS.append(ok)
    print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}", flush=True)


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def scaled_mm_fp32_out():
    a, b = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16), torch.randn(4096, 4096, device="cuda",
                                                                                    dtype=torch.bfloat16)
    out = scaled_mm(a, b, 0.5, torch.float32)
    err = rel(out, 0.5 * (a.double() @ b.double()))
    check("scaled_mm: fp32 out of a bf16 GEMM, unrounded", out.dtype == torch.float32 and err < 1e-5, f"rel {err:.1e}")


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


def stacked_dequantize():
    for nested in (True, False):
        layers = [make_nf4_linear(o, 4096, torch.bfloat16, nested, device="cuda") for o in (4096, 1024, 1024)]
        weights = [nf4_weight_from_bnb(layer.weight) for layer in layers]
        stacked = nf4_dequantize_stacked(weights, torch.bfloat16)
        each = torch.cat([nf4_dequantize(w, torch.bfloat16) for w in weights])
        check(f"stacked q/k/v dequantize (nested={nested}) == one by one", torch.equal(stacked, each))


def tiny(dtype=torch.bfloat16, shape="tiny-llama"):
    model = quantize_to_nf4_(random_causal_lm(shape, dtype, "cuda"), compute_dtype=dtype)
    return add_lora(model, r=16, lora_alpha=32, alpha_pattern={"down_proj": 8})


def batches(vocab, n=2, batch=2, seq=128):
    return [{"input_ids": (ids := torch.randint(0, vocab, (batch, seq))), "labels": ids} for _ in range(n)]


def whole_models():
    for shape in ("tiny-llama", "tiny-qwen2", "tiny-gemma"):
        model = tiny(shape=shape)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        report = verify(model, batches(512), torch.bfloat16)  # offloaded checkpoints (the default) included
        check(f"verify {shape} bf16, checkpoints offloaded", report.passed, report.verdict())
    from peft import prepare_model_for_kbit_training

    model = quantize_to_nf4_(random_causal_lm("llama-3.2-1b", torch.bfloat16, "cuda"))
    model = add_lora(prepare_model_for_kbit_training(model, use_gradient_checkpointing=False))
    report = verify(model, batches(128256, seq=256), torch.bfloat16, autocast_dtype=torch.bfloat16)
    check("verify llama-3.2-1b prepared (fp32 norms/embeddings/head) under autocast", report.passed, report.verdict())


def main():
    if not torch.cuda.is_available():
        sys.exit("gpu_checks: needs a CUDA GPU")
    torch.manual_seed(0)
    for step in (scaled_mm_fp32_out, low_rank_add_branches, stacked_dequantize, whole_models):
        step()
    print(f"{sum(RESULTS)}/{len(RESULTS)} checks passed on {torch.cuda.get_device_name()}")
    sys.exit(0 if all(RESULTS) else 1)


if __name__ == "__main__":
    main()
