import os

# Kernels run on the CPU through Triton's interpreter; it must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Different random inputs for every test, reproducible from the test's name (crc32, not the
    per-process randomized hash)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def _stock_rotary_after_each_test():
    """patch_model's rotary drop-in is a module global: a test that leaves a model patched must not
    turn the next test's stock reference into the fused path."""
    yield
    import sys

    for name, module in list(sys.modules.items()):
        # vars(), not getattr: transformers' lazy modules would import on attribute lookup
        fn = vars(module).get("apply_rotary_pos_emb") if name.startswith("transformers.models.") else None
        if hasattr(fn, "qlora_fast_stock"):
            module.apply_rotary_pos_emb = fn.qlora_fast_stock
