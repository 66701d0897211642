"""On a machine without a GPU, importing qlora_fast turns on Triton's CPU interpreter. Scripts import
transformers, peft, trl or bitsandbytes (which import triton) first, as their docs do: the kernels must
still run, in a process with a user's environment."""

import subprocess
import sys

import pytest
import torch

from tests.helpers import user_environment

# A tiny patched training step, imports in the docs' order.
STEP = """
import torch, transformers, peft, trl, bitsandbytes, triton
import qlora_fast
from qlora_fast.harness.models import add_lora, quantize_to_nf4_, random_causal_lm
model = add_lora(quantize_to_nf4_(random_causal_lm("tiny-llama", torch.float32), compute_dtype=torch.float32),
                 init_b_std=0.02)
report = qlora_fast.patch_model(model, verbose=False)
ids = torch.randint(0, 512, (1, 16))
model(input_ids=ids, labels=ids).loss.backward()
print("patched", report.patched, "step ok")
"""


def run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True,
                          env=dict(user_environment(), **env), timeout=600)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is only turned on without a GPU")
def test_kernels_run_whatever_was_imported_first():
    done = run(STEP)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "patched 14 step ok" in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is only turned on without a GPU")
def test_interpreter_turned_off_keeps_the_stock_path_with_one_line():
    done = run(STEP.replace('print("patched"', 'assert report.patched == 0\nprint("patched"'), TRITON_INTERPRET="0")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "patched 0 step ok" in done.stdout
    lines = [line for line in done.stderr.splitlines() if "qlora_fast:" in line]
    assert len(lines) == 1 and "TRITON_INTERPRET" in lines[0] and "nothing was patched" in lines[0]
