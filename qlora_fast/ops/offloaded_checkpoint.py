"""Gradient checkpointing that parks each checkpointed layer's input in pinned host memory.

With checkpointing, what stays on the GPU between forward and backward is one (batch x seq x hidden) input
per decoder layer: 2 GiB for Llama-3-8B at 4 x 2048 tokens. Here each input is copied to the host on a side
stream while the layer computes, and copied back during the backward of the layer after it, so neither
copy waits on the compute stream. Recompute then runs as torch's checkpoint does: same RNG state (dropout
masks) and autocast state as the forward.

A Function inside the layer may also keep a tensor of its first pass for the recompute
(`keep_for_recompute` / `kept_for_recompute`): the attention projections keep their base GEMM's output,
so the recompute skips those GEMMs (q/k/v and o: ~20% of a Llama layer's recompute). Kept tensors travel
like the layer's input, to the host and back. Their copies must keep pace with the compute, or they would
slow the forward they are meant to shorten: a tensor is not kept (its product is recomputed) while the
compute stream runs several keeps ahead of the copies, nor beyond a host-memory budget; and the compute
stream waits for copies that fall far behind, which bounds the GPU memory they hold.
"""

import bisect
import collections
import functools
import threading
import weakref

import torch
from torch.utils.checkpoint import checkpoint

_copy_streams: dict = {}
_last_forward_record = None  # weakref to the previous layer's _LayerRecord, for prefetching in backward
_recompute_state = threading.local()  # autograd runs each device's backward on its own thread
_queued_copies: collections.deque = collections.deque()  # (issued, copied) events of kept tensors' copies
_LAG = 4  # a copy this many keeps behind the compute: the copies do not keep pace
# Smaller tensors are recomputed: a keep costs the host tens of us (copies, events, pinned buffers), and
# steps of a few thousand tokens are bound by the host, where that outweighs the GEMM saved (Llama-3-8B:
# slower at 1x2048, faster at 4x2048; bench/RESULTS.md, session 9).
KEEP_MIN_ELEMENTS = 2**24
_kept_host_bytes = 0  # host memory held by kept tensors now
_keep_outcomes: collections.Counter = collections.Counter()  # "kept", or why a tensor was not


def recomputing() -> bool:
    """True while an offloaded checkpoint re-runs a layer for its backward. The layer's output values
    are then never read (backward starts from the output gradients it was handed), only its graph."""
    return getattr(_recompute_state, "active", False)


def _copy_stream(device: torch.device):
    if device not in _copy_streams:
        _copy_streams[device] = torch.cuda.Stream(device)
    return _copy_streams[device]


class PinnedBuffers:
    """Pinned host buffers for the copies, each reused by any later copy it holds. torch's pinned allocator
    rounds a request up to a power of two and reuses a block only for requests of that same power: where a
    step's tensors fall below one (packed rows change length every step: Phi-3's 9216-wide q/k/v outputs are
    151 MB at 8190 tokens, 133 MB at 7193, under 128 MiB), it pins new memory for every such tensor, a pause
    of a second or more inside the step, and keeps both sets. Here a copy takes the smallest free buffer that
    holds it, once the copy that last read that buffer has finished; new buffers are powers of two (what
    torch's allocator pins for them anyway)."""

    def __init__(self, allocate=None):
        self._allocate = allocate or (lambda nbytes: torch.empty(nbytes, dtype=torch.uint8, pin_memory=True))
        # (capacity in bytes, uint8 buffer, event of the copy last reading it or None), by capacity
        self._free: list = []
        self._lock = threading.Lock()  # buffers come back from the autograd thread
        self.allocated = 0  # buffers made so far

    def take(self, nbytes: int) -> torch.Tensor:
        with self._lock:  # smallest first: the first that holds the copy and is no longer read is the fit
            for i in range(bisect.bisect_left(self._free, nbytes, key=_capacity), len(self._free)):
                read = self._free[i][2]
                if read is None or read.query():
                    return self._free.pop(i)[1]
            self.allocated += 1
        return self._allocate(1 << max(nbytes - 1, 0).bit_length())

    def give_back(self, buffer: torch.Tensor, read=None) -> None:
        """`buffer` is free once `read` (an event after the last copy reading it; None: now) has passed."""
        with self._lock:
            bisect.insort(self._free, (buffer.numel(), buffer, read), key=_capacity)


def _capacity(free_entry) -> int:
    return free_entry[0]


_pinned_buffers = PinnedBuffers()


class _HostCopy:
    """A device tensor moved to pinned host memory, and back on request (early, with `prefetch`)."""

    def __init__(self, tensor: torch.Tensor):
        self.device = tensor.device
        self.requires_grad = tensor.requires_grad
        self.on_device = None
        if tensor.device.type != "cuda":  # nothing to free: keep the tensor itself
            self.host = tensor.detach()
            return
        self.buffer = _pinned_buffers.take(tensor.nbytes)
        stride = torch.empty_like(tensor, device="meta").stride()  # strides kept: fused kernels read them
        self.host = self.buffer[:tensor.nbytes].view(tensor.dtype).as_strided(tensor.shape, stride)
        stream = _copy_stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self.host.copy_(tensor, non_blocking=True)
        tensor.record_stream(stream)  # its memory is not reused until the copy is done

    def prefetch(self) -> None:
        if self.on_device is not None or self.host is None or self.device.type != "cuda":
            return
        stream = _copy_stream(self.device)
        with torch.cuda.stream(stream):
            self.on_device = self.host.to(self.device, non_blocking=True)
            self.read = torch.cuda.Event()
            self.read.record(stream)

    def fetch(self) -> torch.Tensor:
        """The tensor back on its device, usable on the current stream; the host buffer is given back."""
        if self.device.type != "cuda":
            tensor, self.host = self.host, None
            return tensor.detach().requires_grad_(self.requires_grad)
        self.prefetch()
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(_copy_stream(self.device))
        _pinned_buffers.give_back(self.buffer, self.read)
        tensor, self.on_device, self.host, self.buffer = self.on_device, None, None, None
        tensor.record_stream(current)
        return tensor.requires_grad_(self.requires_grad)


@functools.lru_cache(maxsize=None)
def _kept_bytes_budget() -> int:
    """Host bytes kept tensors may hold: a quarter of the memory available when first asked (Linux's
    MemAvailable, which counts reclaimable page cache; none where it cannot be read)."""
    try:
        with open("/proc/meminfo") as meminfo:
            available_kib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return 0
    return available_kib * 1024 // 4


class _KeptCopy(_HostCopy):
    """A kept tensor's host copy; counts against the host budget until released."""

    def __init__(self, tensor: torch.Tensor):
        global _kept_host_bytes
        super().__init__(tensor)
        self.nbytes = tensor.nbytes
        _kept_host_bytes += self.nbytes

    def release(self) -> None:
        global _kept_host_bytes
        _kept_host_bytes -= self.nbytes
        self.nbytes = 0

    def fetch(self) -> torch.Tensor:
        tensor = super().fetch()
        self.release()
        return tensor

    def __del__(self):
        self.release()


def _copies_lag(device: torch.device) -> bool:
    """Whether kept tensors' copies fall behind the compute: the oldest unfinished copy was issued _LAG
    keeps before a point the compute stream has passed. The host runs ahead of both streams, so unfinished
    copies alone say nothing. Copies _LAG keeps further behind make the compute stream wait (GPU memory)."""
    while _queued_copies and _queued_copies[0][1].query():
        _queued_copies.popleft()
    if len(_queued_copies) > 2 * _LAG:
        torch.cuda.current_stream(device).wait_event(_queued_copies.popleft()[1])
    return len(_queued_copies) > _LAG and _queued_copies[_LAG][0].query()


def _skip_reason(tensors: list, cuda: bool) -> str | None:
    """Why tensors kept together are not kept, or None where they are (size and pace matter on a GPU only)."""
    if cuda and sum(t.numel() for t in tensors) < KEEP_MIN_ELEMENTS:
        return "small"
    if cuda and _copies_lag(tensors[0].device):
        return "copies lagging"
    if _kept_host_bytes + sum(t.nbytes for t in tensors) > _kept_bytes_budget():
        return "host budget"
    return None


def keep_outcomes(reset: bool = False) -> dict:
    """How many tensors offered to `keep_for_recompute` were kept, and how many were not and why
    ("small", "copies lagging", "host budget"), since the last reset: bench/profile_step.py reports them
    per step (a lagging copy stream means the recompute's GEMMs come back)."""
    outcomes = dict(_keep_outcomes)
    if reset:
        _keep_outcomes.clear()
    return outcomes


class _LayerRecord:
    """What a checkpointed layer's first pass leaves for its backward: its input and the tensors its
    Functions kept, all in host memory (on the CPU: the tensors themselves)."""

    def __init__(self):
        self.input = None  # the layer's input, copied once the first pass has run
        self.kept: dict = {}  # key -> list of kept tuples, in the order kept (see keep)

    def keep(self, key, items: tuple) -> None:
        """Keeps a tuple whose tensors are kept together or not at all (its other items, None or ints,
        are held as they are)."""
        tensors = [t for t in items if isinstance(t, torch.Tensor)]
        cuda = tensors[0].device.type == "cuda"
        reason = _skip_reason(tensors, cuda)
        _keep_outcomes[reason or "kept"] += 1
        if reason is not None:
            return
        self.kept.setdefault(key, []).append(tuple(_KeptCopy(t) if isinstance(t, torch.Tensor) else t
                                                   for t in items))
        if cuda:  # the compute stream's point where the copies were queued, and their end
            issued, copied = torch.cuda.Event(), torch.cuda.Event()
            issued.record(torch.cuda.current_stream(tensors[0].device))
            copied.record(_copy_stream(tensors[0].device))
            _queued_copies.append((issued, copied))

    def prefetch(self) -> None:
        self.input.prefetch()
        for c in [c for kept in self.kept.values() for items in kept for c in items if isinstance(c, _KeptCopy)]:
            c.prefetch()

    def fetch_kept(self) -> dict:
        """key -> list of the kept tuples on their device, in the order kept; host copies released."""
        fetched = {key: [tuple(c.fetch() if isinstance(c, _KeptCopy) else c for c in items) for items in kept]
                   for key, kept in self.kept.items()}
        self.kept = {}
        return fetched


def keeping() -> bool:
    """True in the first pass of an offloaded checkpoint, where keep_for_recompute keeps."""
    return getattr(_recompute_state, "keeping", None) is not None


def keep_for_recompute(key, *items) -> None:
    """In the first pass of an offloaded checkpoint: hands `items` (tensors kept together, which must not
    change afterwards, and small values held as they are) to the layer's recompute, where
    `kept_for_recompute(key)` returns them, unless they were skipped. Elsewhere a no-op. `key`: an object
    identifying the call within the layer (the same in the recompute)."""
    record = getattr(_recompute_state, "keeping", None)
    if record is not None:
        record.keep(id(key), items)


def kept_for_recompute(key) -> tuple | None:
    """In an offloaded checkpoint's recompute: the items the first pass kept under `key` (each call takes
    the next ones kept under it), or None: not kept, or not recomputing."""
    kept = getattr(_recompute_state, "kept", None)
    values = None if kept is None else kept.get(id(key))
    return values.pop(0) if values else None


def kept_items_or_computed(key, compute) -> tuple:
    """compute()'s items (a tuple), kept together for the recompute (keep_for_recompute); in the
    recompute, what was kept instead, where it was."""
    kept = kept_for_recompute(key)
    if kept is not None:
        return kept
    items = compute()
    keep_for_recompute(key, *items)
    return items


def kept_or_computed(key, compute) -> torch.Tensor:
    """kept_items_or_computed of one tensor."""
    return kept_items_or_computed(key, lambda: (compute(),))[0]


@torch.compiler.disable  # host-side bookkeeping: nothing for a compiled graph to trace
def prefetch_last_layer() -> None:
    """Starts copying the last checkpointed layer's input and kept tensors back to its GPU. The backward
    begins with that layer, and would otherwise fetch them with nothing to overlap the copy (Llama-3-8B at
    4x2048: 0.23-0.3 GB, ~5 ms of an idle GPU); called as the forward computes its loss, the copy runs
    beside the head's GEMMs. A no-op once that layer's backward has fetched them (or released them)."""
    record = _last_forward_record() if _last_forward_record is not None else None
    if record is not None:  # its copies prefetch once, and not after their fetch
        record.prefetch()


def _rng_states(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _autocast_state(device: torch.device):
    return torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)


class OffloadedCheckpointFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run_function, hidden_states, *args):
        global _last_forward_record
        ctx.run_function = run_function
        ctx.device = hidden_states.device
        ctx.rng = _rng_states(ctx.device)
        ctx.autocast = _autocast_state(ctx.device)
        record = _LayerRecord()
        _recompute_state.keeping = record
        try:
            outputs = run_function(hidden_states, *args)
        finally:
            _recompute_state.keeping = None
        record.input = _HostCopy(hidden_states)
        ctx.record = record
        ctx.previous_record = _last_forward_record
        _last_forward_record = weakref.ref(record)
        ctx.save_for_backward(*[a for a in args if isinstance(a, torch.Tensor)])
        ctx.args = [None if isinstance(a, torch.Tensor) else a for a in args]  # None: a saved tensor
        return outputs

    @staticmethod
    def backward(ctx, *grad_outputs):
        hidden_states = ctx.record.input.fetch()
        kept = ctx.record.fetch_kept()
        previous = ctx.previous_record() if ctx.previous_record is not None else None
        if previous is not None:
            previous.prefetch()  # the layer before this one is next in the backward
        saved = iter(ctx.saved_tensors)
        args = [next(saved).detach().requires_grad_(a_grad) if a is None else a
                for a, a_grad in zip(ctx.args, ctx.needs_input_grad[2:])]
        cuda_devices = [ctx.device] if ctx.device.type == "cuda" else []
        enabled, dtype = ctx.autocast
        with torch.random.fork_rng(devices=cuda_devices, device_type=ctx.device.type):
            torch.set_rng_state(ctx.rng[0])
            if cuda_devices:
                torch.cuda.set_rng_state(ctx.rng[1], ctx.device)
            with torch.enable_grad(), torch.autocast(ctx.device.type, dtype=dtype, enabled=enabled):
                _recompute_state.active, _recompute_state.kept = True, kept
                try:
                    outputs = ctx.run_function(hidden_states, *args)
                finally:
                    _recompute_state.active, _recompute_state.kept = False, None
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs)
                 if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        grads = [a.grad if isinstance(a, torch.Tensor) else None for a in args]
        return None, hidden_states.grad, *grads


def offloaded_checkpoint(function, hidden_states, *args):
    """Drop-in for `torch.utils.checkpoint.checkpoint(function, hidden_states, *args)` as transformers'
    decoder layers call it. Without an input that requires grad, the layer's own parameters could not
    be reached through this Function: torch's non-reentrant checkpoint serves that case."""
    if not torch.is_grad_enabled() or not hidden_states.requires_grad:
        return checkpoint(function, hidden_states, *args, use_reentrant=False)
    return OffloadedCheckpointFunction.apply(function, hidden_states, *args)
