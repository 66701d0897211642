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
