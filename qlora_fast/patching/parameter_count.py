"""patch_model's `parameter_count`: the parameter walks Trainer makes every step, each in one walk over the
modules.

Trainer calls `model.num_parameters(exclude_embeddings=True)` every step for its FLOP count, right after it
waits for the step's loss (its NaN check), then `model.parameters()` to clip the gradients and again to
zero them, so the GPU idles while they run. Stock `num_parameters` walks the modules twice with their names
built and dispatches `numel()` / `element_size()` of each 4-bit weight through bitsandbytes'
`__torch_function__`: ~7 ms a call for a 32-layer LoRA model on the CPU machine; `parameters()` goes
through nested generators of named members: ~3.9 ms there, 1.1 ms as one walk. The walk visits the modules
in the same order, deduplicates modules and parameters as `named_parameters` does, and the count excludes
what stock's names exclude: an Embedding's own `weight`, where the parameter is first met there.
"""

import types

import torch


def parameter_owners(model: torch.nn.Module) -> list:
    """(module, name, parameter) of each parameter in `named_parameters`' order, deduplicated as it is:
    modules preorder with children in registration order, each module and parameter where first met."""
    seen_modules, seen_parameters, owners, stack = set(), set(), [], [model]
    while stack:
        module = stack.pop()
        if module is None or id(module) in seen_modules:
            continue
        seen_modules.add(id(module))
        for name, parameter in module._parameters.items():
            if parameter is not None and id(parameter) not in seen_parameters:
                seen_parameters.add(id(parameter))
                owners.append((module, name, parameter))
        if module._modules:
            stack.extend(reversed(module._modules.values()))
    return owners


def count_parameters(model: torch.nn.Module, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
    """`PreTrainedModel.num_parameters`: 4-bit weights of a 4-bit model count two values a byte of storage."""
    params4bit = None
    if getattr(model, "is_loaded_in_4bit", False):
        from bitsandbytes.nn import Params4bit as params4bit
    total = 0
    with torch._C.DisableTorchFunctionSubclass():  # the same numbers, without the subclass' dispatch
        for module, name, parameter in parameter_owners(model):
            if ((exclude_embeddings and name == "weight" and isinstance(module, torch.nn.Embedding))
                    or (only_trainable and not parameter.requires_grad)):
                continue
            count = parameter.numel()
            if params4bit is not None and isinstance(parameter, params4bit):
                count *= 2 * parameter.element_size()
            total += count
    return total


def _parameters(self, recurse: bool = True):
    """nn.Module.parameters: the same parameters in the same order, from one walk."""
    if not recurse:
        return torch.nn.Module.parameters(self, recurse=False)
    return iter([parameter for _, _, parameter in parameter_owners(self)])


def _num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
    return count_parameters(self, only_trainable, exclude_embeddings)


_FLAGS = [(trainable, embeddings) for trainable in (False, True) for embeddings in (False, True)]


def _outermost_transformers_model(model: torch.nn.Module):
    """The first module with transformers' `num_parameters` (peft's wrappers forward the lookup to it)."""
    return next((m for m in model.modules() if callable(getattr(type(m), "num_parameters", None))), None)


def _use_parameter_walk(model: torch.nn.Module) -> None:
    """Installs the walk as `model.parameters` (the module Trainer holds) where it gives the stock list."""
    if "parameters" in vars(model):  # ours already, or someone else's: left as it is
        return
    stock = list(type(model).parameters(model))
    walked = list(_parameters(model))
    if len(walked) == len(stock) and all(a is b for a, b in zip(walked, stock)):
        model.parameters = types.MethodType(_parameters, model)


def use_parameter_count(model: torch.nn.Module) -> bool:
    """Installs the walks: `model.parameters` where it lists the stock parameters, and the transformers
    model's `num_parameters` where it gives transformers' own count for every flag (each checked once,
    here); returns whether the count was installed."""
    _use_parameter_walk(model)
    target = _outermost_transformers_model(model)
    if target is None:
        return False
    if "num_parameters" in vars(target):  # patched already (ours), or set by someone else: left as it is
        return getattr(vars(target)["num_parameters"], "__func__", None) is _num_parameters
    stock = type(target).num_parameters
    if any(stock(target, *flags) != count_parameters(target, *flags) for flags in _FLAGS):
        return False
    target.num_parameters = types.MethodType(_num_parameters, target)
    return True


def restore_parameter_count(model: torch.nn.Module) -> None:
    for module in model.modules():
        for name, walk in (("num_parameters", _num_parameters), ("parameters", _parameters)):
            installed = vars(module).get(name)
            if isinstance(installed, types.MethodType) and installed.__func__ is walk:
                delattr(module, name)
