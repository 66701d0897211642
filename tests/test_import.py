"""On a machine without a GPU, importing qlora_fast turns on Triton's CPU interpreter, which only works
if triton itself was not imported before: that order gets a warning that says what to do."""

import os
import subprocess
import sys

import pytest
import torch


def import_warnings(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is only turned on without a GPU")
def test_triton_imported_first_is_named_with_the_fix():
    assert "import qlora_fast first" in import_warnings("import triton; import qlora_fast")
    assert "import qlora_fast first" not in import_warnings("import qlora_fast; import triton")
