import torch
import triton

from qlora_fast.kernels import _utils
from qlora_fast.kernels._utils import Relaunch, cdiv, next_power_of_2


def test_host_launch_arithmetic_matches_tritons():
    for n in list(range(1, 5000)) + [2**31 - 1, 2**31, 2**40 + 3]:
        assert next_power_of_2(n) == triton.next_power_of_2(n)
        for d in (1, 3, 64, 1024):
            assert cdiv(n, d) == triton.cdiv(n, d)


class RecordingCompiled:
    """Stands in for a compiled Triton kernel: its runner records what it is launched with."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        def runner(*args):
            self.calls.append(((grid[0], grid[1], grid[2]), args))  # Triton's runner reads all three axes

        return runner


def test_relaunch_passes_addresses_and_the_new_output(monkeypatch):
    monkeypatch.setattr(_utils, "INTERPRETING", False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    compiled = RecordingCompiled()
    a, out, b = torch.zeros(4), torch.zeros(8), torch.zeros(2)
    relaunch = Relaunch.of(compiled, (3, 2), (a, out, 7, b, True), 1)
    new = torch.zeros(8)
    assert relaunch.takes(new) and relaunch(new) is new
    assert compiled.calls == [((3, 2, 1), (a.data_ptr(), new.data_ptr(), 7, b.data_ptr(), True))]
    unaligned = torch.zeros(9)[1:]  # Triton specialized the first launch on a 16-byte-aligned output
    assert not relaunch.takes(unaligned)
    assert Relaunch.of(compiled, (3, 2), (a, unaligned, 7, b, True), 1) is None


def test_no_relaunch_without_a_compiled_kernel():
    assert Relaunch.of(None, (1,), (torch.zeros(4),), 0) is None
