"""Every kernel compiles for the H100 (sm_90) here, without a GPU, and the PTX keeps the roundings the
GPU results depend on. The interpreter runs the kernels' arithmetic in CI but not the compiler's rules."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

KERNELS = {"_nf4_dequantize_kernel", "_nf4_dequantize_stacked_kernel", "_nf4_matmul_kernel", "_rms_norm_forward_kernel",
           "_rms_norm_backward_kernel", "_swiglu_forward_kernel", "_swiglu_backward_kernel",
           "_rope_kernel",
           "_cross_entropy_kernel", "_low_rank_add_kernel", "_rope_lora_kernel"}


@pytest.fixture(scope="module")
def compiled():
    done = subprocess.run([sys.executable, "-m", "tests.kernels.hopper_compile"], capture_output=True, text=True,
                          cwd=Path(__file__).parents[2], timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def ptx_ops(compiled):
    return compiled["ops"]


def test_every_kernel_compiles_for_sm90(ptx_ops):
    assert set(ptx_ops) == KERNELS


# The in-GEMM dequantize (off by default) spills.
SPILLING = {"_nf4_matmul_kernel"}


@pytest.mark.parametrize("kernel", sorted(KERNELS - SPILLING))
def test_kernel_fits_in_registers(kernel, compiled):
    """Bandwidth-bound kernels lose to local-memory traffic when ptxas spills their registers."""
    assert compiled["spills"][kernel] == 0


@pytest.mark.parametrize("kernel", ["_nf4_dequantize_kernel", "_nf4_dequantize_stacked_kernel", "_rope_kernel",
                                    "_rope_lora_kernel"])
def test_bit_exact_kernels_round_every_product(kernel, ptx_ops):
    """bitsandbytes and torch round a product before adding to it: a fused multiply-add would not."""
    assert not [op for op in ptx_ops[kernel] if op.startswith("fma")]


@pytest.mark.parametrize("kernel", ["_nf4_dequantize_kernel", "_nf4_dequantize_stacked_kernel"])
def test_dequantize_moves_wide_vectors(kernel, ptx_ops):
    """A weight of whole quantization blocks (every model's) is read and written in vectors: one byte load
    per variant at most (the block's absmax code), no 1- to 4-byte stores. Bytes loaded one by one held
    the kernel at 71% of copy bandwidth; the stacked kernel stored 2 bytes at a time."""
    ops = ptx_ops[kernel]
    assert sum(n for op, n in ops.items() if op.startswith("ld.global.") and op.endswith(".b8")) <= ops["variants"]
    vector = lambda op: any(part[:1] == "v" and part[1:].isdigit() for part in op.split("."))  # st.global[.cs].v4
    assert not [op for op in ops if op.startswith("st.global.") and not vector(op)]


def test_streaming_dequantize_candidate_carries_its_cache_hints(ptx_ops):
    """The STREAMING launch candidate (bench/seed_dequant.py times it) reads the packed bytes evict-first
    and writes the output with streaming stores; without the hints it would time the default again."""
    ops = ptx_ops["_nf4_dequantize_kernel"]
    assert [op for op in ops if op.startswith("st.global.cs.")]
    assert [op for op in ops if op.startswith("ld.global.") and "evict_first" in op]


# The token count changes every step with packed (padding-free) batches: a kernel specialized on it (its
# divisibility by 16) compiles again mid-training. The NF4 kernels see only weight shapes.
TOKEN_COUNT_ARGS = {"_rms_norm_forward_kernel": {"n_rows"}, "_rms_norm_backward_kernel": {"n_rows"},
                    "_swiglu_forward_kernel": {"n_rows"},
                    "_swiglu_backward_kernel": {"n_rows", "chunk_rows"},
                    "_low_rank_add_kernel": {"n_rows"}, "_cross_entropy_kernel": {"n_rows"},
                    "_rope_kernel": {"n_rows", "seq_len", "qs_b", "ks_b", "qo_b", "ko_b", "cs_b"},
                    "_rope_lora_kernel": {"n_rows", "seq_len"}}


@pytest.mark.parametrize("kernel", sorted(TOKEN_COUNT_ARGS))
def test_token_counts_are_runtime_arguments(kernel, compiled):
    assert TOKEN_COUNT_ARGS[kernel] <= set(compiled["unspecialized"][kernel])
