"""patch_model's `chunked_loss` under TRL: the outputs of TRL's fused LM head from qlora_fast's kernel.

TRL's trainers call `model(..., labels=..., fused_lm_head=True)` (SFTTrainer's compute_loss does, every step)
through the forward `trl.trainer.utils.add_fused_lm_head` installs: it projects the tokens whose label is
kept, chunk by chunk, and recomputes each chunk's logits in backward (three tokens x hidden x vocab GEMMs).
The call is answered with `linear_log_probs` (two GEMMs), mirroring TRL's forward: the same rows, shift,
loss and output fields. Patched after the trainer is built (`patch_model(trainer.model)`), the causal LM's
chunked-loss forward sits above TRL's and sees the call first; patched before, TRL's head was installed
above ours, and peft's tuner, which calls the causal LM, answers it (`tuner_forward`). Either only where
TRL's settings are SFTTrainer's, read from the forward TRL installed (temperature 1, no logit scale, no
fp32 head, outputs among log-probabilities, entropy and top-1), no router logits are asked for, and the
head is a frozen Linear without bias or hooks; anything else goes through TRL's head.
"""

import torch

from ..ops.linear_cross_entropy import in_head_dtype, linear_log_probs
from ..ops.offloaded_checkpoint import prefetch_last_layer
from .core import CALLS, has_hooks, is_patched, previous_forward

SERVED_OUTPUTS = {"log_probs", "entropy", "is_top1"}


def trl_head_settings(forward) -> dict | None:
    """The settings TRL's fused-head forward closes over (temperature, outputs, ...) and the output class
    it returns, or None where `forward` is not that forward."""
    function = getattr(forward, "__func__", forward)
    code = getattr(function, "__code__", None)  # its name and module are the model's (functools.wraps)
    if code is None or code.co_name != "_fused_forward" or not function.__globals__["__name__"].startswith("trl."):
        return None
    settings = dict(zip(code.co_freevars, (cell.cell_contents for cell in function.__closure__)))
    settings["output_class"] = function.__globals__.get("FusedCausalLMOutput")
    return settings


def serves(model, settings: dict | None, args: tuple, kwargs: dict) -> bool:
    """Whether this fused-head call can be answered here with TRL's results."""
    if settings is None or args or settings["output_class"] is None or not model.training:
        return False
    head = model.lm_head
    return (settings.get("temperature") == 1.0 and settings.get("logit_scale") == 1.0
            and settings.get("cast_lm_head_to_fp32") is False and set(settings.get("outputs", ())) <= SERVED_OUTPUTS
            and hasattr(model, settings.get("backbone_attr", ""))
            and not kwargs.get("output_router_logits")
            and not getattr(settings.get("text_config"), "output_router_logits", False)
            and type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad
            and type(head.weight.data) is torch.Tensor and not has_hooks(head))


def fused_head_forward(model, settings: dict, labels, shift_labels=None, num_items_in_batch=None, **kwargs):
    """TRL's fused-head forward (`FusedCausalLMOutput`) with the head on linear_log_probs."""
    CALLS["trl_head"] += 1
    kwargs["use_cache"] = False
    hidden = getattr(model, settings["backbone_attr"])(**kwargs).last_hidden_state
    prefetch_last_layer()  # the backward's first need, copied while the head computes
    if shift_labels is None:
        hidden, labels = hidden[:, :-1], labels[:, 1:]
    else:
        labels = shift_labels
    weight = model.lm_head.weight
    hidden, labels = hidden.to(weight.device), labels.to(weight.device)
    mask = labels != -100
    rows, weight = in_head_dtype(hidden[mask], weight)  # TRL's rows: only tokens with a label are projected
    log_probs, entropy, is_top1 = linear_log_probs(rows, weight, labels[mask], settings.get("final_logit_softcapping"))
    per_token = {name: value.new_zeros(mask.shape).masked_scatter(mask, value)
                 for name, value in (("log_probs", log_probs), ("entropy", entropy), ("is_top1", is_top1))
                 if name == "log_probs" or name in settings["outputs"]}
    divisor = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    loss = -per_token["log_probs"].sum() / divisor
    return settings["output_class"](loss=loss, log_probs=per_token["log_probs"], entropy=per_token.get("entropy"),
                                    is_top1=per_token.get("is_top1"), label_mask=mask)


def answer_fused_head_call(model, trl_forward, args: tuple, labels, kwargs: dict):
    """The outputs of this call to `model` (labels apart from the other keyword arguments) where it is a
    fused-head call this module serves through `trl_forward` (TRL's forward, above or below ours); else
    None, and the call goes its usual way."""
    if not kwargs.get("fused_lm_head") or labels is None:
        return None
    settings = trl_head_settings(trl_forward)
    if not serves(model, settings, args, kwargs):
        return None
    rest = {key: value for key, value in kwargs.items() if key not in ("fused_lm_head", "labels")}
    return fused_head_forward(model, settings, labels, **rest)


def tuner_forward(self, *args, **kwargs):
    """peft's tuner forward (`self.model(...)`), answering a fused-head call itself where TRL's head was
    installed over the patched causal LM's forward (the trainer built after patch_model)."""
    model = self.model
    if is_patched(model) and not has_hooks(model):
        answer = answer_fused_head_call(model, vars(model).get("forward"), args, kwargs.get("labels"), kwargs)
        if answer is not None:
            return answer
    return previous_forward(self)(*args, **kwargs)


def peft_tuner_of(model: torch.nn.Module, causal_lm: torch.nn.Module):
    """The peft tuner (LoraModel) inside `model` whose `model` is `causal_lm`, or None."""
    return next((m for m in model.modules() if m._modules.get("model") is causal_lm and hasattr(m, "peft_config")),
                None)
