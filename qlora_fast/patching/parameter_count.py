"""patch_model's `parameter_count`: transformers' `num_parameters`, counted in one walk over the modules.

Trainer calls `model.num_parameters(exclude_embeddings=True)` every step for its FLOP count, right after it
waits for the step's loss (its NaN check), so the GPU idles while it runs. Stock walks the modules twice
with their names built and dispatches `numel()` / `element_size()` of each 4-bit weight through
bitsandbytes' `__torch_function__`: ~7 ms a call for a 32-layer LoRA model on the CPU machine. This walk
visits the modules in the same order, deduplicates modules and parameters as `named_parameters` does, and
excludes what stock's names exclude: an Embedding's own `weight`, where the parameter is first met there.
"""

import types

import torch


def count_parameters(model: torch.nn.Module, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
    """`PreTrainedModel.num_parameters`: 4-bit weights of a 4-bit model count two values a byte of storage."""
    params4bit = None
    if getattr(model, "is_loaded_in_4bit", False):
        from bitsandbytes.nn import Params4bit as params4bit
    seen_modules, seen_parameters = set(), set()
    total, stack = 0, [model]
    with torch._C.DisableTorchFunctionSubclass():  # the same numbers, without the subclass' dispatch
        while stack:  # preorder, children in registration order: named_modules' order
            module = stack.pop()
            if module is None or id(module) in seen_modules:
                continue
            seen_modules.add(id(module))
            if module._parameters:
                embedding = exclude_embeddings and isinstance(module, torch.nn.Embedding)
                for name, parameter in module._parameters.items():
                    if parameter is None or id(parameter) in seen_parameters:
                        continue
                    seen_parameters.add(id(parameter))
                    if (embedding and name == "weight") or (only_trainable and not parameter.requires_grad):
                        continue
                    count = parameter.numel()
                    if params4bit is not None and isinstance(parameter, params4bit):
                        count *= 2 * parameter.element_size()
                    total += count
            if module._modules:
                stack.extend(reversed(module._modules.values()))
    return total


def _num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
    return count_parameters(self, only_trainable, exclude_embeddings)


_FLAGS = [(trainable, embeddings) for trainable in (False, True) for embeddings in (False, True)]


def _outermost_transformers_model(model: torch.nn.Module):
    """The first module with transformers' `num_parameters` (peft's wrappers forward the lookup to it)."""
    return next((m for m in model.modules() if callable(getattr(type(m), "num_parameters", None))), None)


def use_parameter_count(model: torch.nn.Module) -> bool:
    """Installs the walk as the transformers model's `num_parameters` where it gives transformers' own count
    for every flag (checked once, here); returns whether it did."""
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
        installed = vars(module).get("num_parameters")
        if isinstance(installed, types.MethodType) and installed.__func__ is _num_parameters:
            del module.num_parameters
