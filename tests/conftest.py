import os

# Kernels run on the CPU through Triton's interpreter; it must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs per test, but reproducible from the test's name."""
    torch.manual_seed(abs(hash(request.node.nodeid)) % 2**31)
