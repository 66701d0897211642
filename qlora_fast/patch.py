"""patch_model / unpatch_model: the table of contents of the patches, one module each under patching/.

- patching/lora_linear.py: every LoRA layer over an NF4 Linear4bit through the fused linear Function
- patching/mlp.py (`fused_mlp`), patching/qkv.py (`fused_qkv`): gated MLPs (SwiGLU, GeGLU) and q/k/v as one Function
- patching/norms.py (`rms_norm`, `add_norm`), patching/rotary.py (`rope`), patching/loss.py (`chunked_loss`)
- patching/packed_attention.py (`packed_attention`): padding-free packed batches attend per sequence
  (patching/attention.py: the attention implementation it and `keep_attention_outputs` serve calls through)
- patching/checkpoints.py (`offload_checkpoints`), patching/kept_outputs.py (`keep_attention_outputs`),
  patching/bf16_weights.py (`bf16_frozen_weights`), patching/parameter_count.py (`parameter_count`)
- patching/architectures.py: the model families and what each of their classes computes
- patching/core.py: installing and restoring forwards, call counts, fallback notes
"""

import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch

from .patching.attention import restore_attention
from .patching.bf16_weights import hold_in_bf16, release_bf16_holds
from .patching.checkpoints import restore_checkpoints, use_offloaded_checkpoints
from .patching.core import (CALLS, KV_SIBLINGS, OUTPUT_UNREAD_IN_RECOMPUTE, distributed, has_hooks, is_patched,
                            previous_forward, replace_forward, reset_call_counts, restore_forward)
from .patching.kept_outputs import keep_attention_results, mark_attention_outputs
from .patching.lora_linear import lora_layer_forward
from .patching.loss import causal_lm, forward_with_chunked_loss, unchunked_causal_lm
from .patching.mlp import fusable_mlps, mark_residual_mlps, mlp_forward
from .patching.norms import add_norm_layer_forward, add_norm_layers, frozen_norms
from .patching.packed_attention import remove_packed_hooks, use_packed_attention
from .patching.parameter_count import restore_parameter_count, use_parameter_count
from .patching.projections import lora_nf4_layers, static_skip_reason
from .patching.qkv import QKV_PROJECTIONS, fusable_qkv, fusable_qkv_proj, qkv_proj_attention_forward
from .patching.rotary import patch_rotary, restore_rotary
from .patching.trl_head import peft_tuner_of, trl_head_settings, tuner_forward

__all__ = ["PatchReport", "patch_model", "unpatch_model", "is_patched", "CALLS", "reset_call_counts"]


@dataclass
class PatchReport:
    patched: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> number of layers
    chunked_loss: bool = False
    trl_head: bool = False  # TRL's fused head installed below the chunked loss: its calls are answered too
    rms_norms: int = 0
    add_norms: int = 0
    mlps: int = 0
    qkv: int = 0
    rope: bool = False
    packed_attention: int = 0  # decoder stacks whose packed batches attend within each sequence
    dense_packed_attention: str | None = None  # why a decoder stack's packed batches keep the dense mask
    offloaded_checkpoints: bool = False
    kept_outputs: int = 0  # attention projections whose base outputs the recompute takes from the host
    kept_attention: int = 0  # decoder stacks whose attention outputs the recompute takes from the host
    bf16_stored: int = 0  # frozen fp32 embedding / lm_head weights held in bf16, losslessly
    parameter_count: bool = False  # transformers' num_parameters (Trainer's per-step FLOP count) in one walk
    stock_loss: str | None = None  # a causal LM whose loss keeps the stock path: its class name

    def summary(self) -> str:
        line = f"qlora_fast: patched {self.patched} LoRA NF4 layers"
        fused = [f"{self.mlps} gated MLPs"] if self.mlps else []
        fused += [f"{self.qkv} q/k/v triples"] if self.qkv else []
        if fused:
            line += f" ({' and '.join(fused)} fused whole)"
        if self.rms_norms:
            line += f", {self.rms_norms} RMSNorms"
        if self.add_norms:
            line += f" ({self.add_norms} decoder layers' with the residual add before them)"
        if self.rope:
            line += ", rotary embeddings"
        if self.packed_attention:
            line += ", attention of packed batches within each sequence"
        if self.chunked_loss:
            line += " and the LM loss (chunked, no full logits"
            line += "; TRL's fused-head calls too)" if self.trl_head else ")"
        if self.offloaded_checkpoints:
            line += "; checkpointed layer inputs offloaded to the host"
            kept = ["the attention projections'"] if self.kept_outputs else []
            kept += ["the attention's"] if self.kept_attention else []
            if kept:
                line += f" (with {' and '.join(kept)} outputs: not recomputed)"
        if self.bf16_stored:
            line += f"; {self.bf16_stored} frozen fp32 embedding/head weights held in bf16 (exact)"
        if self.dense_packed_attention:
            line += f"; packed batches keep the dense attention mask ({self.dense_packed_attention})"
        if self.stock_loss:
            line += f"; {self.stock_loss}'s loss keeps the stock path (its head is not known to be plain logits)"
        if self.skipped:
            reasons = "; ".join(f"{n} x {reason}" for reason, n in self.skipped.most_common())
            line += f", kept {sum(self.skipped.values())} on the stock peft path ({reasons})"
        return line


def _refusal(model: torch.nn.Module) -> str | None:
    """Why patch_model must leave this model alone, or None: it has no LoRA layer over an NF4 weight, or
    its weights sit where the kernels cannot run (the CPU without Triton's interpreter)."""
    from .kernels._utils import INTERPRETING

    layers = [layer for _, layer in lora_nf4_layers(model)]
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
                rope: bool = True, packed_attention: bool = True, offload_checkpoints: bool | None = None,
                keep_attention_outputs: bool = True, bf16_frozen_weights: bool = True,
                parameter_count: bool = True) -> PatchReport:
    """Routes every LoRA layer over a bitsandbytes NF4 Linear4bit through the fused Triton path,
    (`fused_mlp`) runs each gated MLP (SwiGLU, GeGLU) whose three projections are such layers as one autograd
    Function,
    (`fused_qkv`) likewise each attention's q, k and v projections,
    (`chunked_loss`) computes a training forward's loss without materializing the full logits, and
    (`rms_norm`) runs frozen Llama- and Gemma-style RMSNorms on a Triton kernel, (`add_norm`) each with the residual
    add before it in Llama-style decoder layers, (`rope`)
    applies rotary embeddings to q and k in one Triton kernel, (`packed_attention`) lets a padding-free
    packed batch (position_ids restarting, no attention mask: TRL's packing=True) attend within each of its
    sequences rather than through a dense block-causal mask, and (`offload_checkpoints`) keeps
    gradient checkpointing's per-layer inputs in host memory; None (default) offloads in single-process
    training and leaves distributed runs (DDP, FSDP) to torch's checkpointing unless asked, and
    (`keep_attention_outputs`) with them the attention projections' base outputs and (unmasked causal
    sdpa) the attention's output, which the recompute then takes back instead of recomputing (up to a
    quarter of the host memory available);
    (`bf16_frozen_weights`) holds frozen fp32 embedding and LM-head weights whose values are all bf16 (as
    `prepare_model_for_kbit_training` leaves a bf16 checkpoint's) in bf16, computing what they computed;
    (`parameter_count`) counts the model's parameters for transformers' `num_parameters` and lists them
    for `model.parameters()`, which Trainer calls every step while the GPU waits, each in one walk
    (installed only where it gives transformers' counts / the stock list).

    Layers that cannot be served exactly keep peft's forward; one warning line says which and why.
    Idempotent; `unpatch_model` undoes it. Saving and loading adapters is unchanged (plain peft).
    """
    report = PatchReport()
    refusal = _refusal(model)
    if refusal is not None:
        warnings.warn(f"qlora_fast: {refusal}; nothing was patched, the model keeps its stock forward",
                      stacklevel=2)
        return report
    for norm, forward in frozen_norms(model) if rms_norm else []:
        replace_forward(norm, forward)
        report.rms_norms += 1
    lm = causal_lm(model) if chunked_loss else None
    if lm is not None:
        replace_forward(lm, forward_with_chunked_loss)
        report.chunked_loss = True
        report.trl_head = trl_head_settings(previous_forward(lm)) is not None
        tuner = peft_tuner_of(model, lm)
        if tuner is not None:
            replace_forward(tuner, tuner_forward)
    elif chunked_loss:
        report.stock_loss = unchunked_causal_lm(model)
    for _, layer in lora_nf4_layers(model):
        reason = static_skip_reason(layer)
        if reason is not None:
            report.skipped[reason] += 1
            continue
        replace_forward(layer, lora_layer_forward)
        report.patched += 1
    for mlp in fusable_mlps(model) if fused_mlp else []:
        replace_forward(mlp, mlp_forward)
        report.mlps += 1
    mark_residual_mlps(model)
    for layer in add_norm_layers(model) if add_norm else []:
        replace_forward(layer, add_norm_layer_forward)
        vars(layer)[OUTPUT_UNREAD_IN_RECOMPUTE] = not has_hooks(layer)
        report.add_norms += 1
    for attention in fusable_qkv(model) if fused_qkv else []:
        q_proj, k_proj, v_proj = (getattr(attention, p) for p in QKV_PROJECTIONS)
        vars(q_proj)[KV_SIBLINGS] = (k_proj, v_proj)  # not setattr: that would register them as children
        report.qkv += 1
    for attention in fusable_qkv_proj(model) if fused_qkv else []:
        replace_forward(attention, qkv_proj_attention_forward)
        report.qkv += 1
    if rope:
        report.rope = patch_rotary(model)
    if packed_attention:
        report.packed_attention, report.dense_packed_attention = use_packed_attention(model)
    if bf16_frozen_weights and not distributed():
        report.bf16_stored = hold_in_bf16(model)
    if parameter_count:
        report.parameter_count = use_parameter_count(model)
    if offload_checkpoints is None:
        offload_checkpoints = not distributed()
    if offload_checkpoints:
        report.offloaded_checkpoints = use_offloaded_checkpoints(model)
        if keep_attention_outputs:
            report.kept_outputs = mark_attention_outputs(model)
            report.kept_attention = keep_attention_results(model)
    if verbose and (report.skipped or report.stock_loss):
        warnings.warn(report.summary(), stacklevel=2)
    return report


def unpatch_model(model: torch.nn.Module) -> int:
    """Restores every forward patch_model changed; returns how many LoRA layers it restored."""
    restore_checkpoints(model)
    restore_rotary(model)
    remove_packed_hooks(model)
    restore_attention(model)
    release_bf16_holds(model)
    restore_parameter_count(model)
    lora_layers = {id(layer) for _, layer in lora_nf4_layers(model)}
    return sum(restore_forward(m) and id(m) in lora_layers for m in list(model.modules()))
