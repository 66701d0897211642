"""Run an autograd Function's forward alone when autograd would record nothing.

With gradients disabled (the first pass of a checkpointed layer runs so: its backward recomputes it),
`Function.apply` records no graph, but still costs the host its argument handling per call; a
decoder layer makes several such calls in that pass. Calling the forward with a stand-in context skips
it, and what the forward saves for backward is dropped at once.
"""

import torch


class _ForwardOnlyContext:
    """Takes what a forward hands its ctx; keeps nothing for a backward that never runs."""

    def save_for_backward(self, *tensors):
        pass


def apply(function: type[torch.autograd.Function], *args):
    """function.apply(*args), or its forward alone while gradients are disabled."""
    if torch.is_grad_enabled():
        return function.apply(*args)
    return function.forward(_ForwardOnlyContext(), *args)
