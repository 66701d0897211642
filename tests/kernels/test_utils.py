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
    monkeypatch.setattr(_utils, "current_device", lambda: 0)
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


class CLauncher:
    """Stands in for Triton 3.6's CUDA launcher: the layout _c_launch takes, its C launch recorded."""

    def __init__(self, scratch=0):
        self.launch_cooperative_grid, self.launch_pdl = False, True
        self.global_scratch_size, self.profile_scratch_size = scratch, 0
        self.launches = []
        self.launch = lambda *args: self.launches.append(args)

    def __call__(self, gridX, gridY, gridZ, stream, function, *args):
        raise AssertionError("the Python launcher is not called on the direct path")


class LauncherOfAnotherLayout(CLauncher):
    def __call__(self, gridX, gridY, gridZ, stream, function, kernel_metadata, launch_metadata, *args):
        raise AssertionError("not called")


class CompiledWithLauncher(RecordingCompiled):
    def __init__(self, launcher):
        super().__init__()
        self.run, self.function, self.packed_metadata = launcher, "function", (4, 1, 0)


def _relaunch_of(compiled, monkeypatch):
    monkeypatch.setattr(_utils, "INTERPRETING", False)
    monkeypatch.setattr(_utils, "current_device", lambda: 0)
    monkeypatch.setattr(_utils, "current_stream", lambda device: 1234)
    a, out, b = torch.zeros(4), torch.zeros(8), torch.zeros(2)
    return Relaunch.of(compiled, (3, 2), (a, out, 7, b, True), 1), (a, b)


def test_relaunch_calls_the_c_launch_with_tritons_argument_order(monkeypatch):
    compiled = CompiledWithLauncher(CLauncher())
    relaunch, (a, b) = _relaunch_of(compiled, monkeypatch)
    new = torch.zeros(8)
    assert relaunch(new) is new and compiled.calls == []
    # grid, stream, function, cooperative grid, PDL, no scratch buffers, the packed metadata, no launch
    # metadata, no hooks, then the kernel's arguments
    assert compiled.run.launches == [(3, 2, 1, 1234, "function", False, True, None, None, (4, 1, 0), None, None,
                                      None, a.data_ptr(), new.data_ptr(), 7, b.data_ptr(), True)]


def test_relaunch_keeps_tritons_runner_for_hooks_scratch_and_other_layouts(monkeypatch):
    hooked = CompiledWithLauncher(CLauncher())
    relaunch, _ = _relaunch_of(hooked, monkeypatch)
    monkeypatch.setattr(_utils._knobs.runtime, "launch_enter_hook", lambda metadata: None)
    relaunch(torch.zeros(8))
    assert len(hooked.calls) == 1 and hooked.run.launches == []  # the runner calls the hook
    monkeypatch.undo()
    for launcher in (CLauncher(scratch=128), LauncherOfAnotherLayout()):
        compiled = CompiledWithLauncher(launcher)
        relaunch, _ = _relaunch_of(compiled, monkeypatch)
        relaunch(torch.zeros(8))
        assert len(compiled.calls) == 1 and launcher.launches == []
