"""Gradient checkpointing that parks each checkpointed layer's input in pinned host memory.

With checkpointing, what stays on the GPU between forward and backward is one (batch x seq x hidden) input
per decoder layer: 2 GiB for Llama-3-8B at 4 x 2048 tokens. Here each input is copied to the host on a side
stream while the layer computes, and copied back during the backward of the layer after it, so neither
copy waits on the compute stream. Recompute then runs as torch's checkpoint does: same RNG state (dropout
masks) and autocast state as the forward.
"""

import threading
import weakref

import torch
from torch.utils.checkpoint import checkpoint

_copy_streams: dict = {}
_last_forward_copy = None  # weakref to the previous layer's _HostCopy, for prefetching in backward
_recompute_state = threading.local()  # autograd runs each device's backward on its own thread


def recomputing() -> bool:
    """True while an offloaded checkpoint re-runs a layer for its backward. The layer's output values
    are then never read (backward starts from the output gradients it was handed), only its graph."""
    return getattr(_recompute_state, "active", False)


def _copy_stream(device: torch.device):
    if device not in _copy_streams:
        _copy_streams[device] = torch.cuda.Stream(device)
    return _copy_streams[device]


class _HostCopy:
    """A device tensor moved to pinned host memory, and back on request (early, with `prefetch`)."""

    def __init__(self, tensor: torch.Tensor):
        self.device = tensor.device
        self.requires_grad = tensor.requires_grad
        self.on_device = None
        if tensor.device.type != "cuda":  # nothing to free: keep the tensor itself
            self.host = tensor.detach()
            return
        self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
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

    def fetch(self) -> torch.Tensor:
        """The tensor back on its device, usable on the current stream; the host copy is released."""
        if self.device.type != "cuda":
            tensor, self.host = self.host, None
            return tensor.detach().requires_grad_(self.requires_grad)
        self.prefetch()
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(_copy_stream(self.device))
        tensor, self.on_device, self.host = self.on_device, None, None
        tensor.record_stream(current)
        return tensor.requires_grad_(self.requires_grad)


def _rng_states(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _autocast_state(device: torch.device):
    return torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)


class OffloadedCheckpointFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run_function, hidden_states, *args):
        global _last_forward_copy
        ctx.run_function = run_function
        ctx.device = hidden_states.device
        ctx.rng = _rng_states(ctx.device)
        ctx.autocast = _autocast_state(ctx.device)
        outputs = run_function(hidden_states, *args)
        ctx.copy = _HostCopy(hidden_states)
        ctx.previous_copy = _last_forward_copy
        _last_forward_copy = weakref.ref(ctx.copy)
        ctx.save_for_backward(*[a for a in args if isinstance(a, torch.Tensor)])
        ctx.args = [None if isinstance(a, torch.Tensor) else a for a in args]  # None: a saved tensor
        return outputs

    @staticmethod
    def backward(ctx, *grad_outputs):
        hidden_states = ctx.copy.fetch()
        previous = ctx.previous_copy() if ctx.previous_copy is not None else None
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
                _recompute_state.active = True
                try:
                    outputs = ctx.run_function(hidden_states, *args)
                finally:
                    _recompute_state.active = False
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
