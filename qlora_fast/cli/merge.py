"""`qlora-fast merge` and `qlora-fast generate`: use a trained adapter."""

from pathlib import Path

import torch
from torch import nn

from ..ops.dequantize import dequantize_nf4
from ..patch import patch_model
from .config import ConfigError, TrainConfig
from .train import load_base_model, precision


def _adapter_dir(cfg: TrainConfig, adapter: str | None) -> str:
    path = Path(adapter or cfg.output_dir)
    if not (path / "adapter_config.json").is_file():
        raise ConfigError(f"no trained adapter in {path} (adapter_config.json missing); train first or pass --adapter")
    return str(path)


def dequantize_model_(model: nn.Module) -> nn.Module:
    """Replaces every bitsandbytes Linear4bit by a dense nn.Linear holding its dequantized weight."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if not isinstance(child, bnb.nn.Linear4bit):
                continue
            state = child.weight.quant_state
            weight = (dequantize_nf4(child.weight) if state.quant_type == "nf4"
                      else F.dequantize_4bit(child.weight.data, state))
            dense = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                              device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                dense.weight.copy_(weight)
                if child.bias is not None:
                    dense.bias.copy_(child.bias)
            setattr(module, name, dense)
    model.is_loaded_in_4bit = False
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    return model


def _special_token_ids_from(tokenizer, model) -> None:
    """The saved config's bos/eos/pad ids are the tokenizer's (a random-init or resized model's config may
    carry another vocabulary's), so that generation stops where the tokenizer ends a turn."""
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            setattr(model.config, name, value)
            if getattr(model, "generation_config", None) is not None:
                setattr(model.generation_config, name, value)


def merge(cfg: TrainConfig, adapter: str | None, out: str) -> str:
    from peft import PeftModel

    adapter = _adapter_dir(cfg, adapter)
    compute_dtype, _, _ = precision(cfg)
    model, tokenizer = load_base_model(cfg, compute_dtype)
    model = PeftModel.from_pretrained(dequantize_model_(model), adapter)
    merged = model.merge_and_unload()
    _special_token_ids_from(tokenizer, merged)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def generate(cfg: TrainConfig, prompt: str, adapter: str | None, max_new_tokens: int) -> str:
    from peft import PeftModel

    compute_dtype, _, _ = precision(cfg)
    model, tokenizer = load_base_model(cfg, compute_dtype)
    model = PeftModel.from_pretrained(model, _adapter_dir(cfg, adapter))
    if cfg.patch:
        patch_model(model)
    model.eval()
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = prompt
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
