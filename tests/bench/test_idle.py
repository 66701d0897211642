"""bench/idle.py: the host's time in each checkpointed layer's backward, read from a profile."""

import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import idle  # noqa: E402


def test_layer_backward_report_counts_each_checkpointed_layer():
    from qlora_fast.ops.offloaded_checkpoint import offloaded_checkpoint

    layers = [torch.nn.Linear(8, 8) for _ in range(3)]
    x = torch.randn(4, 8, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        h = x
        for layer in layers:
            h = offloaded_checkpoint(layer, h)
        h.sum().backward()
    line = idle.layer_backward_report(prof)
    assert line.startswith("Checkpointed layers' backward: 3 calls, host ") and "GPU 0.00 ms" in line


def test_layer_backward_report_is_empty_without_checkpoints():
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.nn.Linear(8, 8)(torch.randn(4, 8, requires_grad=True)).sum().backward()
    assert idle.layer_backward_report(prof) == ""
