"""patch_model's `fused_mlp`: each gated MLP whose projections it serves as one Function: gate, up and
down (Llama-style SwiGLU, Gemma's GeGLU), or gate_up and down (Phi-3: gate and up are gate_up_proj's
halves)."""

import functools

import torch

from ..ops.lora_nf4_mlp import lora_nf4_mlp
from ..ops.offloaded_checkpoint import recomputing
from .architectures import has
from .core import (CALLS, OUTPUT_ONLY_TO_RESIDUAL, called_forward, has_hooks, is_patched, previous_forward,
                   stock_dtype, widened)
from .projections import compute_dtype, fusable, fused_group, row_blocks


_SILU = {"SiLUActivation", "SiLU"}
_MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_GATE_UP_PROJECTIONS = ("gate_up_proj", "down_proj")


def activation_name(act_fn) -> str | None:
    """The fused kernels' name (kernels/swiglu.ACTIVATIONS) for what `act_fn` computes, or None: SiLU, or
    transformers' GELUTanh when it calls torch's tanh-approximated gelu (not its Python spelling, which
    rounds each step in the input's dtype)."""
    if type(act_fn).__name__ in _SILU:
        return "silu"
    act = getattr(act_fn, "act", None)
    if (type(act_fn).__name__ == "GELUTanh" and isinstance(act, functools.partial)
            and act.func is torch.nn.functional.gelu and act.keywords == {"approximate": "tanh"}):
        return "gelu_tanh"
    return None


def fusable_mlps(model: torch.nn.Module):
    """Gated MLPs whose activation the kernels compute and whose projections (gate, up and down, or Phi-3's
    gate_up and down) are patchable LoRA NF4 layers without base bias."""
    return [m for m in model.modules()
            if (has(m, "gated_mlp") and activation_name(getattr(m, "act_fn", None)) is not None
                and all(fusable(getattr(m, p, None)) for p in _MLP_PROJECTIONS))
            or (has(m, "gate_up_mlp") and type(getattr(m, "activation_fn", None)).__name__ in _SILU
                and all(fusable(getattr(m, p, None)) for p in _GATE_UP_PROJECTIONS))]


def _one_rank_group(mlp, names) -> list | None:
    """The MLP's projections' Projections when one Function can serve them now: the same adapter, no
    dropout, and one rank (the SwiGLU kernels add their terms with one)."""
    projections = [mlp._modules[p] for p in names]
    found = fused_group(projections, uncalled=projections)
    return None if found is None or len({f.lora_a.shape[0] for f in found}) != 1 else found


def _gate_up_terms(mlp) -> list | None:
    """A Phi-3 MLP's gate, up and down terms for the fused Function when it can serve them now: gate_up's
    halves as gate and up (the product up * silu(gate) commutes exactly)."""
    found = _one_rank_group(mlp, _GATE_UP_PROJECTIONS)
    if found is None:
        return None
    half = found[0].weight.shape[0] // 2
    gate_and_up = row_blocks(mlp._modules["gate_up_proj"], found[0], [half, half])
    return None if gate_and_up is None else [*gate_and_up, found[1][1:]]


def _gated_terms(mlp) -> list | None:
    """A gated MLP's gate, up and down terms (lora_a, lora_b, scaling, weight) when one Function can serve
    them now."""
    found = _one_rank_group(mlp, _MLP_PROJECTIONS)
    return None if found is None else [f[1:] for f in found]


def _has_gate_up(mlp) -> bool:
    return "gate_up_proj" in mlp._modules


def _terms(mlp) -> list | None:
    return _gate_up_terms(mlp) if _has_gate_up(mlp) else _gated_terms(mlp)


def _called_fused(mlp) -> list | None:
    """The gate, up and down terms where calling this MLP now runs nothing but the fused Function (its
    patched forward, no hooks, `_terms`); else None."""
    return _terms(mlp) if called_forward(mlp) is mlp_forward and not has_hooks(mlp) else None


def rounds_its_input(mlp) -> bool:
    """Whether this MLP's only use of its input is the fused Function now, which first rounds it to the
    compute dtype (so it may be handed on in that dtype)."""
    return _called_fused(mlp) is not None


def _fused_mlp(mlp, terms, x, **options):
    CALLS["mlp"] += 1
    first, act_fn = ("gate_up_proj", "activation_fn") if _has_gate_up(mlp) else ("gate_proj", "act_fn")
    return lora_nf4_mlp(x, *terms, compute_dtype=compute_dtype(mlp._modules[first], x),
                        activation=activation_name(mlp._modules[act_fn]), out_dtype=stock_dtype(x), **options)


@torch.compiler.disable
def mlp_forward(self, x):
    """The whole gated MLP in one Function when its projections can take the fused path together
    (`_terms`); otherwise the stock MLP forward (each projection then decides alone)."""
    terms = _terms(self)
    if terms is None:
        return previous_forward(self)(widened(x))
    return _fused_mlp(self, terms, x, output_needed=_output_needed(self))


def _output_needed(mlp) -> bool:
    """False in a checkpoint's recompute of a hook-free MLP whose layer only adds its output to the residual
    (mark_residual_mlps): backward needs what the Function saves, never the output."""
    return not (recomputing() and vars(mlp).get(OUTPUT_ONLY_TO_RESIDUAL, False) and not has_hooks(mlp))


def mlp_plus_residual(mlp, x, residual):
    """residual + mlp(x) from the fused Function, which adds the residual where it adds the down
    projection's LoRA term, where this hook-free MLP takes the fused path now and the residual is of its
    output's shape and stock dtype (the sum then rounds as torch's add); else None."""
    terms = _called_fused(mlp)
    if (terms is None or residual.dtype != stock_dtype(x) or residual.stride(-1) != 1
            or residual.shape != (*x.shape[:-1], terms[2][3].shape[0])):
        return None
    return _fused_mlp(mlp, terms, x, output_needed=True, residual=residual)


def mark_residual_mlps(model: torch.nn.Module) -> None:
    """Flags fused MLPs whose layer just adds their output to the residual, where neither the layer nor its
    dropout on that output (Phi-3's) has hooks, which could read the output."""
    for layer in model.modules():
        mlp, dropout = layer._modules.get("mlp"), layer._modules.get("resid_mlp_dropout")
        if (has(layer, "mlp_to_residual") and is_patched(mlp)
                and not any(has_hooks(m) for m in (layer, dropout) if m is not None)):
            vars(mlp)[OUTPUT_ONLY_TO_RESIDUAL] = True
