"""Model surgery: route peft's LoRA-on-bitsandbytes-NF4 layers through the fused kernels, and back."""

import os
import sys
import types
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .kernels.nf4_dequantize import stackable
from .nf4 import NF4Weight, cached_nf4_weight, unsupported_reason
from .ops.forward_only import apply
from .ops.linear_cross_entropy import causal_lm_loss
from .ops.offloaded_checkpoint import offloaded_checkpoint, recomputing
from .ops.lora_nf4_linear import lora_nf4_linear
from .ops.lora_nf4_mlp import lora_nf4_mlp
from .ops.lora_nf4_qkv import lora_nf4_qkv
from .ops.rms_norm import add_rms_norm, rms_norm as rms_norm_op
from .ops.unread_sum import unread_sum
from .ops.rope import RoPEFunction, fused_rope_applies

try:
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module
except ImportError:  # older bitsandbytes
    fix_4bit_weight_quant_state_from_module = None

_PATCHED = "_qlora_fast_patched"
_OUTPUT_ONLY_TO_RESIDUAL = "_qlora_fast_output_only_to_residual"  # see _mark_residual_mlps
_KV_SIBLINGS = "_qlora_fast_kv_siblings"  # on a q_proj: its (k_proj, v_proj), see _fused_qkv_forward
_STASHED = "_qlora_fast_stashed_output"  # on a k_proj / v_proj: (input, output) its q_proj computed
_OUTPUT_UNREAD_IN_RECOMPUTE = "_qlora_fast_output_unread_in_recompute"  # see _add_norm_layer_forward
_PER_MODULE_STATE = (_OUTPUT_ONLY_TO_RESIDUAL, _KV_SIBLINGS, _STASHED, _OUTPUT_UNREAD_IN_RECOMPUTE)


@dataclass
class PatchReport:
    patched: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> number of layers
    chunked_loss: bool = False
    rms_norms: int = 0
    add_norms: int = 0
    mlps: int = 0
    qkv: int = 0
    rope: bool = False
    offloaded_checkpoints: bool = False
    bf16_stored: int = 0  # frozen fp32 embedding / lm_head weights held in bf16, losslessly
    stock_loss: str | None = None  # a causal LM whose loss keeps the stock path: its class name

    def summary(self) -> str:
        line = f"qlora_fast: patched {self.patched} LoRA NF4 layers"
        fused = [f"{self.mlps} SwiGLU MLPs"] if self.mlps else []
        fused += [f"{self.qkv} q/k/v triples"] if self.qkv else []
        if fused:
            line += f" ({' and '.join(fused)} fused whole)"
        if self.rms_norms:
            line += f", {self.rms_norms} RMSNorms"
        if self.add_norms:
            line += f" ({self.add_norms} decoder layers' with the residual add before them)"
        if self.rope:
            line += ", rotary embeddings"
        if self.chunked_loss:
            line += " and the LM loss (chunked, no full logits)"
        if self.offloaded_checkpoints:
            line += "; checkpointed layer inputs offloaded to the host"
        if self.bf16_stored:
            line += f"; {self.bf16_stored} frozen fp32 embedding/head weights held in bf16 (exact)"
        if self.stock_loss:
            line += f"; {self.stock_loss}'s loss keeps the stock path (its head is not known to be plain logits)"
        if self.skipped:
            reasons = "; ".join(f"{n} x {reason}" for reason, n in self.skipped.most_common())
            line += f", kept {sum(self.skipped.values())} on the stock peft path ({reasons})"
        return line


def _lora_nf4_layers(model: torch.nn.Module):
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLinear4bit)]


def _static_skip_reason(layer) -> str | None:
    """Why this layer can never take the fused path (checked once, at patch time)."""
    if getattr(layer, "lora_variant", None):
        kinds = sorted({type(v).__name__.removesuffix("LinearVariant") or "variant"
                        for v in layer.lora_variant.values()})
        return f"LoRA variant {'/'.join(kinds)}"
    if any(layer.use_dora.values()):
        return "DoRA"
    if any(b.bias is not None for b in layer.lora_B.values()):
        return "lora_bias"
    base = layer.base_layer
    if base.bias is not None and base.bias.requires_grad:
        return "trainable base bias"
    return unsupported_reason(base.weight)


def _replace_forward(module: torch.nn.Module, forward) -> None:
    """Installs `forward` on this instance, remembering an instance-level forward another library (TRL,
    accelerate) may have wrapped it with, so that falling back goes through that wrapper."""
    if is_patched(module):
        return
    module._qlora_fast_previous_forward = vars(module).get("forward")
    module.forward = types.MethodType(forward, module)
    setattr(module, _PATCHED, True)


def _restore_forward(module: torch.nn.Module) -> bool:
    if not is_patched(module):
        return False
    previous = vars(module).pop("_qlora_fast_previous_forward")
    for state in _PER_MODULE_STATE:
        vars(module).pop(state, None)
    del module.forward
    if previous is not None:
        module.forward = previous
    delattr(module, _PATCHED)
    return True


def _previous_forward(module: torch.nn.Module):
    previous = vars(module).get("_qlora_fast_previous_forward")
    return previous if previous is not None else types.MethodType(type(module).forward, module)


def _stock_forward(layer, x, *args, **kwargs):
    return _previous_forward(layer)(x, *args, **kwargs)


class _Projection(NamedTuple):
    """What the fused Functions take of one LoRA NF4 layer, for its one active adapter."""

    adapter: str
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: float
    weight: NF4Weight


# Calls of each fused Function since the last reset_call_counts(), and layer calls that fell back to peft's
# path, by reason: the parity harness requires fused calls of every kind it patched.
CALLS: Counter = Counter()


def reset_call_counts() -> None:
    CALLS.clear()


def _fallback(reason: str) -> None:
    """A layer call that takes peft's path for `reason`: counted, and said once per reason."""
    CALLS["fallback: " + reason] += 1
    _warn_once(f"qlora_fast: some LoRA layer calls run on peft's path: {reason}")


def _fused_projection(layer) -> _Projection | None:
    """The one active adapter the fused path can serve now, or None (the reason counted and said once):
    disabled, merged, several adapters, a weight bitsandbytes repacked for CPU inference, or hooks on the
    base layer or adapters (accelerate's offload hooks move weights only when the module is called) go
    through peft's forward. Runs per layer call: modules and parameters are read from their dicts, not
    through nn.Module's attribute lookup."""
    base = layer._modules["base_layer"]
    weight = base._parameters["weight"]
    if fix_4bit_weight_quant_state_from_module is not None and getattr(weight, "quant_state", None) is None:
        fix_4bit_weight_quant_state_from_module(base)  # FSDP hands the weight back without its state
        weight = base._parameters["weight"]
    adapters = layer.active_adapters
    lora_a_modules = layer._modules["lora_A"]._modules
    if layer.disable_adapters or layer.merged:
        return None  # peft's path is the adapter-free or merged forward users asked for: nothing to say
    if len(adapters) != 1 or adapters[0] not in lora_a_modules:
        _fallback("several active adapters (one at a time is fused)")
        return None
    name = adapters[0]
    nf4 = cached_nf4_weight(weight)
    if nf4 is None:
        _fallback(f"weight not servable ({unsupported_reason(weight)})")
        return None
    lora_a_module, lora_b_module = lora_a_modules[name], layer._modules["lora_B"]._modules[name]
    if _has_hooks(base) or _has_hooks(lora_a_module) or _has_hooks(lora_b_module):
        _fallback("hooks on the base layer or the adapters (accelerate offload?) run only if they are called")
        return None
    lora_a, lora_b = lora_a_module._parameters["weight"], lora_b_module._parameters["weight"]
    if not (_gathered(lora_a) and _gathered(lora_b)):
        _fallback("FSDP shards the LoRA adapters apart from their layers (peft's wrap policy); wrap whole "
                  "decoder layers to use the fused kernels")
        return None
    return _Projection(name, lora_a, lora_b, layer.scaling[name], nf4)


_warned: set = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def _gathered(weight) -> bool:
    """False for an adapter weight FSDP holds sharded outside its module's own forward (a DTensor, or
    FSDP1's flat-parameter placeholder): only calling the module would gather it."""
    return type(weight).__name__ != "DTensor" and weight.dim() == 2 and weight.numel() > 0


def _compute_dtype(layer, x):
    """The dtype stock peft computes the layer in: autocast's where autocast is on (bitsandbytes' F.linear
    and the adapters' Linears then run in it), else the base layer's compute dtype."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return layer._modules["base_layer"].compute_dtype or x.dtype


@torch.compiler.disable
def _fused_forward(self, x, *args, **kwargs):
    """Fused path for one active adapter; extra arguments (per-sample adapter_names) or a state
    `_fused_projection` refuses go through peft's forward. A k_proj / v_proj returns what its q_proj
    computed for this same input; a q_proj computes all three when it can."""
    stashed = vars(self).pop(_STASHED, None)
    if args or kwargs:
        return _stock_forward(self, x, *args, **kwargs)
    if stashed is not None and stashed[0] is x:
        return stashed[1]
    siblings = vars(self).get(_KV_SIBLINGS)
    q = None if siblings is None else _fused_qkv_forward(self, siblings, x)
    if q is not None:
        return q
    projection = _fused_projection(self)
    if projection is None:
        return _stock_forward(self, x, *args, **kwargs)
    CALLS["linear"] += 1
    dropout = _dropout(self, projection.adapter)
    x_lora = x
    if not isinstance(dropout, torch.nn.Identity):
        # Dropout on x in the adapter's dtype, as peft draws it, so both paths drop the same elements.
        x_lora = dropout(x if torch.is_autocast_enabled() else x.to(projection.lora_a.dtype))
    return lora_nf4_linear(x, x_lora, projection.lora_a, projection.lora_b, projection.scaling, projection.weight,
                           self._modules["base_layer"].bias, _compute_dtype(self, x))


def _dropout(layer, adapter: str) -> torch.nn.Module:
    return layer._modules["lora_dropout"]._modules[adapter]


def _fused_group(projections, uncalled) -> list | None:
    """Each projection's _Projection when all of them can run in one Function now: one adapter, no
    dropout, and no hooks on the `uncalled` ones (the Function replaces their calls, so their hooks
    would not run); otherwise None."""
    found = [_fused_projection(p) for p in projections]
    if any(f is None for f in found) or len({f.adapter for f in found}) != 1:
        return None
    if any(_has_hooks(p) for p in uncalled) or any(
            not isinstance(_dropout(p, found[0].adapter), torch.nn.Identity) for p in projections):
        return None
    return found


# MLP classes whose forward is exactly down_proj(act_fn(gate_proj(x)) * up_proj(x)).
_GATED_MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"}
_SILU = {"SiLUActivation", "SiLU"}
_MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _fusable(projection, frozen_bias_ok: bool = False) -> bool:
    """A patchable LoRA NF4 layer which one Function over several projections serves: without base bias,
    or (`frozen_bias_ok`) with a frozen one (_static_skip_reason refuses a trainable one)."""
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    return (isinstance(projection, LoraLinear4bit) and _static_skip_reason(projection) is None
            and (frozen_bias_ok or projection.base_layer.bias is None))


def _fusable_mlps(model: torch.nn.Module):
    """SwiGLU MLPs whose three projections are patchable LoRA NF4 layers without base bias."""
    return [m for m in model.modules()
            if type(m).__name__ in _GATED_MLPS and type(getattr(m, "act_fn", None)).__name__ in _SILU
            and all(_fusable(getattr(m, p, None)) for p in _MLP_PROJECTIONS)]


def _has_hooks(module) -> bool:
    """Hooks (peft's per-sample adapter_names, accelerate's offload) run only if the projection is called."""
    return bool(module._forward_hooks or module._forward_pre_hooks or hasattr(module, "_hf_hook"))


@torch.compiler.disable
def _fused_mlp_forward(self, x):
    """The whole SwiGLU MLP in one Function when its three projections can take the fused path with the
    same adapter and no dropout, and one rank (the SwiGLU kernels add their terms with one); otherwise
    the stock MLP forward (each projection then decides alone)."""
    projections = [self._modules[p] for p in _MLP_PROJECTIONS]
    found = _fused_group(projections, uncalled=projections)
    if found is None or len({f.lora_a.shape[0] for f in found}) != 1:
        return _previous_forward(self)(x)
    output_needed = not (recomputing() and vars(self).get(_OUTPUT_ONLY_TO_RESIDUAL, False))
    CALLS["mlp"] += 1
    return lora_nf4_mlp(x, *(f[1:] for f in found), compute_dtype=_compute_dtype(projections[0], x),
                        output_needed=output_needed)


# Decoder layers whose forward is transformers' Llama one: `residual + self_attn(input_layernorm(x))`,
# then `residual + mlp(post_attention_layernorm(residual))`. Nothing in such a layer's backward reads the
# MLP's output or the layer's, so a checkpoint's recompute of the layer need compute neither.
_LLAMA_STYLE_DECODER_LAYERS = {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer",
                               "Qwen3DecoderLayer"}


def _mark_residual_mlps(model: torch.nn.Module) -> None:
    """Flags fused MLPs whose layer (hook-free: a hook could read the output) just adds their output."""
    for layer in model.modules():
        mlp = layer._modules.get("mlp")
        if type(layer).__name__ in _LLAMA_STYLE_DECODER_LAYERS and is_patched(mlp) and not _has_hooks(layer):
            vars(mlp)[_OUTPUT_ONLY_TO_RESIDUAL] = True


def _add_norm_layers(model: torch.nn.Module):
    """Llama-style decoder layers whose two norms run on the kernel (patched, hook-free), in transformers 5
    (whose layer forward _add_norm_layer_forward reproduces: past_key_values, a tensor returned)."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        return []
    return [m for m in model.modules()
            if type(m).__name__ in _LLAMA_STYLE_DECODER_LAYERS
            and all(is_patched(n) and not _has_hooks(n)
                    for n in (m._modules.get("input_layernorm"), m._modules.get("post_attention_layernorm")))]


@torch.compiler.disable
def _add_norm_layer_forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                            use_cache=False, position_embeddings=None, **kwargs):
    """The stock decoder layer's forward, each norm taking the residual add before it (and the sum of
    the gradients after it) into its kernel. In a recompute the layer's output is not computed."""
    first, second = self._modules["input_layernorm"], self._modules["post_attention_layernorm"]
    if first.weight.requires_grad or second.weight.requires_grad:  # unfrozen after patching
        return _previous_forward(self)(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                       past_key_values=past_key_values, use_cache=use_cache,
                                       position_embeddings=position_embeddings, **kwargs)
    CALLS["rms_norm"] += 2
    residual, hidden = add_rms_norm(hidden_states, None, first._parameters["weight"], first.variance_epsilon)
    hidden, _ = self.self_attn(hidden_states=hidden, attention_mask=attention_mask, position_ids=position_ids,
                               past_key_values=past_key_values, use_cache=use_cache,
                               position_embeddings=position_embeddings, **kwargs)
    residual, hidden = add_rms_norm(residual, hidden, second._parameters["weight"], second.variance_epsilon)
    hidden = self.mlp(hidden)
    if recomputing() and vars(self)[_OUTPUT_UNREAD_IN_RECOMPUTE] and hidden.shape == residual.shape:
        return unread_sum(residual, hidden)
    return residual + hidden


# Attention classes whose forward projects one hidden-states tensor with q_proj, k_proj, v_proj, in order.
_QKV_ATTENTIONS = {"LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention",
                   "GemmaAttention"}
_QKV_PROJECTIONS = ("q_proj", "k_proj", "v_proj")


def _fusable_qkv(model: torch.nn.Module):
    """Attentions whose q, k and v projections are patchable LoRA NF4 layers, with frozen base biases
    (Qwen2) or none."""
    return [m for m in model.modules() if type(m).__name__ in _QKV_ATTENTIONS
            and all(_fusable(getattr(m, p, None), frozen_bias_ok=True) for p in _QKV_PROJECTIONS)
            and len({getattr(m, p).base_layer.bias is None for p in _QKV_PROJECTIONS}) == 1]


def _fused_qkv_forward(q_proj, siblings, x):
    """q_proj's output from one Function over the three projections, k's and v's left on their modules
    for their own calls on this same x; None where the three cannot take it now (then each goes alone)."""
    projections = (q_proj, *siblings)
    found = _fused_group(projections, uncalled=siblings)
    if (found is None or len({_compute_dtype(p, x) for p in projections}) != 1
            or not stackable([f.weight for f in found])):
        return None
    biases = [p._modules["base_layer"].bias for p in projections]
    biases = None if biases[0] is None else biases  # all or none: _fusable_qkv
    CALLS["qkv"] += 1
    q, k, v = lora_nf4_qkv(x, *(f[1:] for f in found), compute_dtype=_compute_dtype(q_proj, x), biases=biases)
    for projection, output in zip(siblings, (k, v)):
        vars(projection)[_STASHED] = (x, output)
    return q


# Causal LMs whose training loss is exactly cross-entropy of lm_head(hidden states): no logit scaling
# (Cohere, Granite, FalconH1), softcapping (Gemma 2/3) or auxiliary loss (MoE routers) to drop.
_PLAIN_HEAD_CAUSAL_LMS = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                          "GemmaForCausalLM", "Phi3ForCausalLM"}


def _causal_lm(model: torch.nn.Module):
    """The transformers *ForCausalLM module inside `model` whose loss can be chunked, or None."""
    for m in model.modules():
        head = m._modules.get("lm_head")  # own children only: peft wrappers forward attribute lookups
        if (type(m).__name__ in _PLAIN_HEAD_CAUSAL_LMS and type(head) is torch.nn.Linear and "model" in m._modules
                and getattr(m.config, "final_logit_softcapping", None) is None):
            return m
    return None


def _unchunked_causal_lm(model: torch.nn.Module) -> str | None:
    """The class name of a causal LM whose loss keeps the stock path (not known to be a plain head)."""
    for m in model.modules():
        if type(m).__name__.endswith("ForCausalLM") and type(m).__name__ not in _PLAIN_HEAD_CAUSAL_LMS:
            return type(m).__name__
    return None


def _forward_with_chunked_loss(self, *args, labels=None, **kwargs):
    """Training forward with labels: the loss from the hidden states, chunk by chunk, and no logits
    (outputs.logits is None). Evaluation, generation, TRL's own fused head and an lm_head with hooks
    (FSDP's, which gather its weight only when it is called) take the stock forward."""
    if (labels is None or args or not self.training or kwargs.get("fused_lm_head")
            or kwargs.get("return_dict") is False or _has_hooks(self.lm_head)):
        return _previous_forward(self)(*args, labels=labels, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    CALLS["loss"] += 1
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    kwargs.pop("logits_to_keep", None)
    outputs = self.model(**kwargs)
    hidden, weight = outputs.last_hidden_state, self.lm_head.weight
    if torch.is_autocast_enabled(hidden.device.type):  # the head's matmul in autocast's dtype, as stock's
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    else:
        weight = weight.to(hidden.dtype)  # a weight held in bf16 (_hold_in_bf16) is exact in fp32
    loss = causal_lm_loss(hidden, weight, labels, num_items_in_batch)
    return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=outputs.past_key_values,
                                  hidden_states=outputs.hidden_states, attentions=outputs.attentions)


# RMSNorm classes whose forward is exactly w * round(x * rsqrt(mean(x^2) + eps)); Gemma's (1 + w) is not.
_LLAMA_STYLE_RMS_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}


@torch.compiler.disable
def _rms_norm_forward(self, x):
    if self.weight.requires_grad:  # unfrozen after patching: the kernel gives no weight gradient
        return _previous_forward(self)(x)
    CALLS["rms_norm"] += 1
    return rms_norm_op(x, self.weight, self.variance_epsilon)


def _frozen_llama_style_norms(model: torch.nn.Module):
    return [m for m in model.modules()
            if type(m).__name__ in _LLAMA_STYLE_RMS_NORMS and not m.weight.requires_grad]


# Attention classes whose modeling module applies transformers' standard apply_rotary_pos_emb.
_ROTARY_ATTENTIONS = {"LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention", "GemmaAttention"}


def _rotary_modules(model: torch.nn.Module) -> list:
    """The modeling modules (transformers.models.llama.modeling_llama, ...) of the model's attentions."""
    names = {type(m).__module__ for m in model.modules() if type(m).__name__ in _ROTARY_ATTENTIONS}
    return [sys.modules[n] for n in sorted(names) if hasattr(sys.modules[n], "apply_rotary_pos_emb")]


def _fused_rotary(stock):
    """A drop-in for a modeling module's apply_rotary_pos_emb: the Triton kernel where it is exact."""

    @torch.compiler.disable
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if not args and fused_rope_applies(q, k, cos, sin, **kwargs):
            CALLS["rope"] += 1
            return apply(RoPEFunction, q, k, cos, sin)
        return stock(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb.qlora_fast_stock = stock
    return apply_rotary_pos_emb


def _patch_rotary(model: torch.nn.Module) -> bool:
    """Routes rotary embeddings through the kernel. The function is a module global that attention looks
    up at call time, so this holds for every model of that architecture in the process, as unsloth's does;
    the drop-in computes what the stock function does, rounding included."""
    modules = _rotary_modules(model)
    for module in modules:
        if not hasattr(module.apply_rotary_pos_emb, "qlora_fast_stock"):
            module.apply_rotary_pos_emb = _fused_rotary(module.apply_rotary_pos_emb)
    return bool(modules)


def _restore_rotary(model: torch.nn.Module) -> None:
    for module in _rotary_modules(model):
        module.apply_rotary_pos_emb = getattr(module.apply_rotary_pos_emb, "qlora_fast_stock",
                                              module.apply_rotary_pos_emb)


_STOCK_CHECKPOINT = "_qlora_fast_stock_checkpoint"


def _offload_layer_checkpoints(model: torch.nn.Module) -> None:
    """Points every module's checkpoint function at offloaded_checkpoint, remembering the stock one."""
    for m in model.modules():
        current = vars(m).get("_gradient_checkpointing_func")
        if current is not None and current is not offloaded_checkpoint:
            setattr(m, _STOCK_CHECKPOINT, current)
            m._gradient_checkpointing_func = offloaded_checkpoint


def _use_offloaded_checkpoints(model: torch.nn.Module) -> bool:
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


def _restore_checkpoints(model: torch.nn.Module) -> None:
    for m in model.modules():
        vars(m).pop("_set_gradient_checkpointing", None)
        stock = vars(m).pop(_STOCK_CHECKPOINT, None)
        if stock is not None:
            m._gradient_checkpointing_func = stock


_HELD_DTYPE = "_qlora_fast_held_dtype"  # on a weight _hold_in_bf16 narrowed: the dtype it had


def _bf16_holdable(module) -> bool:
    """A plain Embedding or Linear whose frozen fp32 weight holds only bf16 values (what
    prepare_model_for_kbit_training makes of a bf16 checkpoint's embeddings and head)."""
    weight = getattr(module, "weight", None)
    return (type(module) in (torch.nn.Embedding, torch.nn.Linear) and type(weight) is torch.nn.Parameter
            and weight.dtype == torch.float32 and not weight.requires_grad
            and getattr(module, "bias", None) is None
            and bool(torch.equal(weight, weight.to(torch.bfloat16).float())))


@torch.compiler.disable
def _embedding_of_held_weight(self, input_ids):
    return _previous_forward(self)(input_ids).to(vars(self.weight)[_HELD_DTYPE])


@torch.compiler.disable
def _linear_of_held_weight(self, x):
    """Under autocast the product is autocast's, as stock computes it from the fp32 weight; otherwise in
    x's dtype from the exact fp32 values."""
    weight = self.weight
    if not torch.is_autocast_enabled(x.device.type):
        weight = weight.to(x.dtype)
    return torch.nn.functional.linear(x, weight)


def _hold_in_bf16(model: torch.nn.Module) -> int:
    """Holds the frozen fp32 input embedding and LM head weights that are exact bf16 values in bf16 (half
    their memory, and a head matmul without a cast of its weight), their modules returning what they
    returned before: the embedding upcasts its rows, the head computes as before (exactly: the values
    are the same). A weight tied to both is narrowed once."""
    get_input = getattr(model, "get_input_embeddings", None)
    candidates = [get_input() if get_input else None]
    lm = _causal_lm(model)
    candidates.append(None if lm is None else lm._modules["lm_head"])
    held = 0
    for module in candidates:
        if module is None or is_patched(module) or not (_bf16_holdable(module) or _HELD_DTYPE in vars(module.weight)):
            continue
        weight = module.weight
        if _HELD_DTYPE not in vars(weight):
            vars(weight)[_HELD_DTYPE] = weight.dtype
            weight.data = weight.data.to(torch.bfloat16)
            held += 1
        embedding = type(module) is torch.nn.Embedding
        _replace_forward(module, _embedding_of_held_weight if embedding else _linear_of_held_weight)
    return held


def _release_bf16_holds(model: torch.nn.Module) -> None:
    for p in model.parameters():
        dtype = vars(p).pop(_HELD_DTYPE, None)
        if dtype is not None:
            p.data = p.data.to(dtype)


def _distributed() -> bool:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size() > 1
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _refusal(model: torch.nn.Module) -> str | None:
    """Why patch_model must leave this model alone, or None: it has no LoRA layer over an NF4 weight, or
    its weights sit where the kernels cannot run (the CPU without Triton's interpreter)."""
    from .kernels._utils import INTERPRETING

    layers = [layer for _, layer in _lora_nf4_layers(model)]
    if not layers:
        return ("found no peft LoRA layer over a bitsandbytes 4-bit Linear4bit (an 8-bit or unquantized base, "
                "or no adapter yet: call patch_model on the model get_peft_model returns, or on trainer.model)")
    device = layers[0].base_layer.weight.device
    if device.type == "cpu" and not INTERPRETING:
        return ("the model is on the CPU and Triton's CPU interpreter is off (TRITON_INTERPRET=0); unset it, "
                "or set TRITON_INTERPRET=1 before anything imports triton")
    return None


def patch_model(model: torch.nn.Module, verbose: bool = True, chunked_loss: bool = True,
                fused_mlp: bool = True, fused_qkv: bool = True, rms_norm: bool = True, add_norm: bool = True,
                rope: bool = True, offload_checkpoints: bool | None = None,
                bf16_frozen_weights: bool = True) -> PatchReport:
    """Routes every LoRA layer over a bitsandbytes NF4 Linear4bit through the fused Triton path,
    (`fused_mlp`) runs each SwiGLU MLP whose three projections are such layers as one autograd Function,
    (`fused_qkv`) likewise each attention's q, k and v projections,
    (`chunked_loss`) computes a training forward's loss without materializing the full logits, and
    (`rms_norm`) runs frozen Llama-style RMSNorms on a Triton kernel, (`add_norm`) each with the residual
    add before it in Llama-style decoder layers, (`rope`)
    applies rotary embeddings to q and k in one Triton kernel, and (`offload_checkpoints`) keeps
    gradient checkpointing's per-layer inputs in host memory; None (default) offloads in single-process
    training and leaves distributed runs (DDP, FSDP) to torch's checkpointing unless asked;
    (`bf16_frozen_weights`) holds frozen fp32 embedding and LM-head weights whose values are all bf16 (as
    `prepare_model_for_kbit_training` leaves a bf16 checkpoint's) in bf16, computing what they computed.

    Layers that cannot be served exactly keep peft's forward; one warning line says which and why.
    Idempotent; `unpatch_model` undoes it. Saving and loading adapters is unchanged (plain peft).
    """
    report = PatchReport()
    refusal = _refusal(model)
    if refusal is not None:
        warnings.warn(f"qlora_fast: {refusal}; nothing was patched, the model keeps its stock forward",
                      stacklevel=2)
        return report
    for norm in _frozen_llama_style_norms(model) if rms_norm else []:
        _replace_forward(norm, _rms_norm_forward)
        report.rms_norms += 1
    lm = _causal_lm(model) if chunked_loss else None
    if lm is not None:
        _replace_forward(lm, _forward_with_chunked_loss)
        report.chunked_loss = True
    elif chunked_loss:
        report.stock_loss = _unchunked_causal_lm(model)
    for _, layer in _lora_nf4_layers(model):
        reason = _static_skip_reason(layer)
        if reason is not None:
            report.skipped[reason] += 1
            continue
        _replace_forward(layer, _fused_forward)
        report.patched += 1
    for mlp in _fusable_mlps(model) if fused_mlp else []:
        _replace_forward(mlp, _fused_mlp_forward)
        report.mlps += 1
    _mark_residual_mlps(model)
    for layer in _add_norm_layers(model) if add_norm else []:
        _replace_forward(layer, _add_norm_layer_forward)
        vars(layer)[_OUTPUT_UNREAD_IN_RECOMPUTE] = not _has_hooks(layer)
        report.add_norms += 1
    for attention in _fusable_qkv(model) if fused_qkv else []:
        q_proj, k_proj, v_proj = (getattr(attention, p) for p in _QKV_PROJECTIONS)
        vars(q_proj)[_KV_SIBLINGS] = (k_proj, v_proj)  # not setattr: that would register them as children
        report.qkv += 1
    if rope:
        report.rope = _patch_rotary(model)
    if bf16_frozen_weights and not _distributed():
        report.bf16_stored = _hold_in_bf16(model)
    if offload_checkpoints is None:
        offload_checkpoints = not _distributed()
    if offload_checkpoints:
        report.offloaded_checkpoints = _use_offloaded_checkpoints(model)
    if verbose and (report.skipped or report.stock_loss):
        warnings.warn(report.summary(), stacklevel=2)
    return report


def unpatch_model(model: torch.nn.Module) -> int:
    """Restores every forward patch_model changed; returns how many LoRA layers it restored."""
    _restore_checkpoints(model)
    _restore_rotary(model)
    _release_bf16_holds(model)
    lora_layers = {id(layer) for _, layer in _lora_nf4_layers(model)}
    return sum(_restore_forward(m) and id(m) in lora_layers for m in list(model.modules()))


def is_patched(module: torch.nn.Module) -> bool:
    # vars(), not getattr: peft's wrappers forward attribute lookups to the model they wrap
    return vars(module).get(_PATCHED, False)
