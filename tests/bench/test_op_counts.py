"""bench/op_counts.py: the CPU count of a step's activation-sized aten work, per stack."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import op_counts  # noqa: E402


def test_counts_what_patching_moves_into_kernels():
    """Once patched, stock's NF4 GEMMs (bitsandbytes' gemm_4bit) are gone, and so are the zero-filled
    gradients of Phi-3's sliced qkv output (its q, k and v row blocks go through the fused Function)."""
    results = {s: op_counts.count(s, "tiny-phi3", 256, "bare") for s in ("stock", "qlora_fast")}
    ops = {s: {op for op, _ in r} for s, r in results.items()}
    assert "gemm_4bit" in ops["stock"] and "gemm_4bit" not in ops["qlora_fast"]
    assert "slice_backward" in ops["stock"] and "slice_backward" not in ops["qlora_fast"]
    from qlora_fast.harness.models import MODEL_SHAPES

    assert MODEL_SHAPES["tiny-phi3"][1]["hidden_size"] != 256  # the shape table is left as it was
    lines = op_counts.table(results)
    assert lines[0].startswith("| op | dtype | stock") and len(lines) == 2 + len(set().union(*results.values()))
