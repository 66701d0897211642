"""patch_model's `offload_checkpoints`: gradient checkpointing's layer inputs kept in host memory."""

import torch

from ..ops.offloaded_checkpoint import offloaded_checkpoint


_STOCK_CHECKPOINT = "_qlora_fast_stock_checkpoint"


def _offload_layer_checkpoints(model: torch.nn.Module) -> None:
    """Points every module's checkpoint function at offloaded_checkpoint, remembering the stock one."""
    for m in model.modules():
        current = vars(m).get("_gradient_checkpointing_func")
        if current is not None and current is not offloaded_checkpoint:
            setattr(m, _STOCK_CHECKPOINT, current)
            m._gradient_checkpointing_func = offloaded_checkpoint


def use_offloaded_checkpoints(model: torch.nn.Module) -> bool:
    """Offloaded checkpointing for the layers of every transformers model inside `model`, now if
    checkpointing is on, and whenever it is turned on later (Trainer does so after the user's script)."""
    from transformers import PreTrainedModel

    pretrained = [m for m in model.modules() if isinstance(m, PreTrainedModel)]
    for m in pretrained:
        if "_set_gradient_checkpointing" in vars(m):
            continue
        stock_setter = m._set_gradient_checkpointing

        def set_gradient_checkpointing(*args, _stock_setter=stock_setter, _model=m, **kwargs):
            _stock_setter(*args, **kwargs)
            _offload_layer_checkpoints(_model)

        m._set_gradient_checkpointing = set_gradient_checkpointing
        _offload_layer_checkpoints(m)
    return bool(pretrained)


def restore_checkpoints(model: torch.nn.Module) -> None:
    for m in model.modules():
        vars(m).pop("_set_gradient_checkpointing", None)
        stock = vars(m).pop(_STOCK_CHECKPOINT, None)
        if stock is not None:
            m._gradient_checkpointing_func = stock
