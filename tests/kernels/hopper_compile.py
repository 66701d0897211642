"""Compiles every kernel for the H100 (sm_90) without a GPU, as the wrappers would launch it.

Run as `python -m tests.kernels.hopper_compile`: each wrapper is called on small CPU tensors with
Triton's launch replaced by a compile for sm_90 (Triton's compiler and ptxas ship in its wheel); prints,
as JSON, each compiled kernel's name with the PTX instructions tests check ("ops": roundings, global
memory accesses by width, and the number of compiled variants), the most bytes
of registers ptxas spilled to local memory per thread in any of its compiled variants ("spills"), and
the arguments Triton does not specialize on ("unspecialized").
Nothing is launched.
"""

import json
import os
import re
import subprocess
import tempfile
from collections import Counter

os.environ["TRITON_INTERPRET"] = "0"  # before the kernels are defined: real JIT functions, not interpreted

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import KernelInterface  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
_OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")
_TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int64: "i64",
                 torch.int32: "i32", torch.uint8: "u8", torch.int8: "i8"}
compiled: dict = {}
spills: dict = {}
unspecialized: dict = {}  # kernel -> its arguments Triton compiles no variant for (do_not_specialize)


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _TRITON_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def _divisible_by_16(value) -> bool:
    """Whether Triton's launch would specialize this argument as 16-divisible (aligned pointer or integer):
    its vectorization of loads and stores follows from it."""
    if isinstance(value, torch.Tensor):
        return value.data_ptr() % 16 == 0
    return isinstance(value, int) and not isinstance(value, bool) and value % 16 == 0


def _compile(fn, args, kwargs):
    bound = dict(zip(fn.arg_names, args), **{k: v for k, v in kwargs.items() if k not in _OPTIONS})
    constexprs = {p.name: bound.get(p.name, p.default) for p in fn.params if p.is_constexpr}
    signature = {name: "constexpr" if name in constexprs else _arg_type(bound[name]) for name in fn.arg_names}
    options = {k: kwargs[k] for k in _OPTIONS if k in kwargs}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if name not in constexprs and _divisible_by_16(bound[name])}
    source = triton.compiler.ASTSource(fn, signature, constexprs, attrs)
    kernel = triton.compile(source, target=HOPPER, options=options)
    ptx = kernel.asm["ptx"]
    ops = Counter(re.findall(r"^\s*((?:fma|add|sub|mul)\.rn\.[a-z0-9]+|fma\.[a-z0-9.]+)", ptx, re.M))
    # access widths (b8 .. v4.b32) with any cache qualifiers (.cs, .L1::evict_first)
    ops.update(re.findall(r"\b((?:ld|st)\.global\.[A-Za-z0-9.:_]+)", ptx))
    ops["variants"] = 1
    compiled.setdefault(fn.__name__, Counter()).update(ops)
    unspecialized[fn.__name__] = sorted(p.name for p in fn.params if p.do_not_specialize)
    spills[fn.__name__] = max(spills.get(fn.__name__, 0), _spill_bytes(kernel.asm["ptx"]))


def _spill_bytes(ptx: str) -> int:
    """Bytes per thread ptxas stores to local memory for lack of registers (`ptxas -v`)."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        report = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                                capture_output=True, text=True, check=True)
    return sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", report.stdout + report.stderr))


def _compile_instead_of_launch(self, grid):
    def launch(*args, **kwargs):
        if isinstance(self, Autotuner):
            for config in self.configs:
                _compile(self.fn, args, {**kwargs, **config.all_kwargs()})
        else:
            _compile(self, args, kwargs)

    return launch


def main():
    KernelInterface.__getitem__ = _compile_instead_of_launch
    from qlora_fast.kernels.cross_entropy import cross_entropy_forward_backward_
    from qlora_fast.kernels.nf4_dequantize import CANDIDATE_META, nf4_dequantize, nf4_dequantize_stacked
    from qlora_fast.kernels.nf4_matmul import nf4_matmul
    from qlora_fast.kernels.rms_norm import add_rms_norm_forward, rms_norm_forward, rms_norm_backward
    from qlora_fast.kernels.rope import rope_backward, rope_forward, rope_plus_low_rank
    from qlora_fast.kernels.low_rank import CANDIDATE_META as TILE_META, LowRank
    from qlora_fast.kernels.low_rank_add import low_rank_add_
    from qlora_fast.kernels.swiglu import swiglu_backward_, swiglu_backward_writing_h_, swiglu_forward
    from qlora_fast.nf4 import nf4_weight_from_bnb
    from qlora_fast.testing import make_nf4_linear

    for dtype in (torch.bfloat16, torch.float16):
        for nested in (True, False):
            weight = nf4_weight_from_bnb(make_nf4_linear(64, 128, dtype, nested).weight)
            nf4_dequantize(weight)
            nf4_dequantize_stacked([weight, weight], dtype)
            nf4_dequantize(weight, out=torch.empty(64, 128 + 64, dtype=dtype)[:, 64:])  # a widened GEMM's
            for meta in CANDIDATE_META[1:]:  # the launch candidates bench/seed_dequant.py times
                nf4_dequantize(weight, meta=meta)
            nf4_matmul(torch.randn(8, 128, dtype=dtype), weight)
        x = torch.randn(8, 64, dtype=dtype)
        y, rstd = rms_norm_forward(x, torch.ones(64, dtype=dtype), 1e-6)
        rms_norm_backward(x, x, torch.ones(64, dtype=dtype), rstd)
        add_rms_norm_forward(x, x, torch.ones(64, dtype=dtype), 1e-6)
        rms_norm_backward(x, x, torch.ones(64, dtype=dtype), rstd, residual_grad=x)
        rms_norm_backward(x, x, torch.ones(64, dtype=dtype), rstd, residual_grad=x,
                          narrow_copy=torch.empty_like(x, dtype=torch.bfloat16))
        swiglu_forward(x, x)
        term = LowRank(torch.randn(8, 16, dtype=dtype), torch.randn(64, 16, dtype=dtype), 2.0)
        swiglu_forward(x, x, term, term)
        swiglu_backward_(x.clone(), x.clone(), x.clone(), LowRank(term.xa, term.b.t().contiguous().t(), 0.5),
                         term, term)
        swiglu_forward(x, x, term, term, wide=True)
        large = LowRank(torch.randn(8, 64, dtype=dtype), torch.randn(64, 64, dtype=dtype), 2.0)  # taller tiles
        swiglu_forward(x, x, large, large, wide=True)
        swiglu_backward_writing_h_(x.clone(), x.clone(), x.clone(), LowRank(large.xa, large.b, 0.5), large, large,
                                   wide=True)
        swiglu_backward_(x.clone(), x.clone(), x.clone(), term, term, term, wide=True)
        swiglu_forward(x, x, term, term, activation="gelu_tanh")
        swiglu_backward_(x.clone(), x.clone(), x.clone(), term, term, term, activation="gelu_tanh")
        swiglu_backward_(x.clone(), x.clone(), x.clone(), term, term, term, wide=True, activation="gelu_tanh")
        for rank in (64, 128) if dtype == torch.bfloat16 else []:  # the tiles narrowed to stay in registers
            wide_term = LowRank(torch.randn(8, rank, dtype=dtype), torch.randn(64, rank, dtype=dtype), 2.0)
            swiglu_backward_(x.clone(), x.clone(), x.clone(), wide_term, wide_term, wide_term)
            swiglu_backward_writing_h_(x.clone(), x.clone(), x.clone(), wide_term, wide_term, wide_term)
        low_rank_add_(torch.randn(8, 96, dtype=dtype)[:, 16:80], term)
        low_rank_add_(x, term, out=torch.empty(8, 64))
        low_rank_add_(x, term, out=torch.empty(8, 64), residual=torch.randn(8, 64))  # MLP output + residual
        for meta in TILE_META[1:] if dtype == torch.bfloat16 else []:  # what bench/kernel_timings.py times
            swiglu_forward(x, x, term, term, meta=meta)
            low_rank_add_(x.clone(), term, meta)
        q, k, cos = torch.randn(2, 4, 8, 16, dtype=dtype), torch.randn(2, 2, 8, 16, dtype=dtype), torch.randn(2, 8, 16, dtype=dtype)
        rope_forward(q, k, cos, cos.clone())
        rope_backward(q, k, cos, cos.clone())
        wide_q, wide_k, wide_cos = q.float(), k.float(), cos.float()  # a prepared model's fp32 q, k
        rope_forward(wide_q, wide_k, wide_cos, wide_cos.clone(), out_dtype=dtype)
        rope_backward(q, k, wide_cos, wide_cos.clone(), out_dtype=torch.float32)
        qk = torch.randn(16, 6 * 32, dtype=dtype)  # 4 q heads and 2 k heads of 32, rotated with their terms
        xa, b = torch.randn(16, 3 * 16, dtype=dtype), torch.randn(6 * 32, 16, dtype=dtype)
        terms = LowRank(xa[:, :16], b[:128], 2.0), LowRank(xa[:, 16:32], b[128:], 0.5)
        trig = torch.randn(2, 8, 32, dtype=dtype)
        rope_plus_low_rank(qk, *terms, trig, trig.clone(), 8, qk, dtype)
        rope_plus_low_rank(qk, *terms, trig.float(), trig.float(), 8, qk, torch.float32)  # a prepared model's
        xa64, b64 = torch.randn(16, 128, dtype=dtype), torch.randn(6 * 32, 64, dtype=dtype)  # large-rank tiles
        rope_plus_low_rank(qk, LowRank(xa64[:, :64], b64[:128], 2.0), LowRank(xa64[:, 64:], b64[128:], 0.5),
                           trig.float(), trig.float(), 8, qk, torch.float32)
        low_rank_add_(x, large, out=torch.empty(8, 64))
        add_rms_norm_forward(x.float(), x, torch.ones(64), 1e-6, out_dtype=dtype)  # bf16 delta, fp32 stream
        for softcap in (None, 30.0):
            cross_entropy_forward_backward_(torch.randn(4, 100, dtype=dtype), torch.zeros(4, dtype=torch.int64),
                                            torch.ones(()), torch.empty(4), softcap)
        cross_entropy_forward_backward_(torch.randn(4, 100, dtype=dtype), torch.zeros(4, dtype=torch.int64),
                                        torch.ones(()), torch.empty(4), None, torch.empty(4),
                                        torch.empty(4, dtype=torch.int8))  # TRL's entropy and top-1
    print(json.dumps({"ops": {name: dict(ops) for name, ops in compiled.items()}, "spills": spills,
                      "unspecialized": unspecialized}))


if __name__ == "__main__":
    main()
