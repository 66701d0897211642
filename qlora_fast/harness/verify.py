"""`verify`: does the patched model compute what stock peft computes, on this model and these batches?

Gradients, not losses, decide: a random-init model's loss sits near ln(vocab) whatever its layers compute,
and a LoRA B of zeros (peft's init) adds nothing to it. So, from one state: each LoRA matrix's gradient
at the first batch, stock against patched (relative error and cosine), with every zero B drawn at random
at a scale where its term is about half the base layer's output (restored afterwards), so that a dropped
or mis-scaled term moves every gradient downstream of it; the losses of all batches; and proof that the
fused paths ran: every kind patch_model patched was called, and no call fell back to peft's path.

Tolerances. fp32: both paths compute in fp32 and differ only in summation order (~1e-6 relative), so
relative error <= 1e-3. bf16 / fp16: each path rounds different intermediates (the base + LoRA sum, silu,
the product) to 2^-9 / 2^-12 relative, and backward through the layers accumulates those as a random
walk: a few percent on the tiny models, less on wide ones; a doubled scaling gives 1.0 and a dropped term
O(1) on every matrix upstream of it. Hence relative error <= 0.1 and cosine >= 0.995 there.
"""

import math
from dataclasses import dataclass, field

import torch

from ..patch import CALLS, patch_model, reset_call_counts, unpatch_model
from .run import on_device

# Pass/fail tolerance on the per-step loss. The fused path computes the LoRA products in the compute
# dtype (bf16/fp16) where peft upcasts them to the adapters' fp32; both sum the same terms in a
# different order. One bf16 rounding is a relative 2^-8 (0.4%); a loss is a mean over thousands of
# tokens, so its own noise is far smaller, but a few optimizer steps compound the differences in the
# weights. 1% relative (after up to ~10 steps) separates that noise from real errors: a wrong
# scaling, a missing LoRA term or a mis-decoded nibble moves the loss by whole percents at step 0.
LOSS_RTOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
GRAD_TOLERANCE = {torch.float32: (1e-3, 0.99999), torch.float16: (0.1, 0.995), torch.bfloat16: (0.1, 0.995)}


@dataclass
class MatrixCheck:
    name: str
    rel_err: float
    cosine: float
    passed: bool


@dataclass
class VerifyReport:
    dtype: torch.dtype
    matrices: list = field(default_factory=list)
    stock_losses: list = field(default_factory=list)
    patched_losses: list = field(default_factory=list)
    calls: dict = field(default_factory=dict)  # fused kind or "fallback: reason" -> calls
    problems: list = field(default_factory=list)  # why it fails, one line each

    @property
    def passed(self) -> bool:
        return not self.problems

    def table(self) -> str:
        lines = ["| LoRA matrix | grad rel err | grad cosine | |", "|---|---|---|---|"]
        lines += [f"| {m.name} | {m.rel_err:.2e} | {m.cosine:.6f} | {'ok' if m.passed else 'FAIL'} |"
                  for m in self.matrices]
        return "\n".join(lines)

    def verdict(self) -> str:
        rel, cos = GRAD_TOLERANCE[self.dtype]
        worst = max((m.rel_err for m in self.matrices), default=0.0)
        fused = ", ".join(f"{k} {v}" for k, v in sorted(self.calls.items()) if not k.startswith("fallback"))
        head = (f"{'PASS' if self.passed else 'FAIL'}: {len(self.matrices)} LoRA gradients within rel err "
                f"{rel:g} / cosine {cos:g} (worst rel err {worst:.2e}); fused calls: {fused or 'none'}")
        return head + ("" if self.passed else "; " + "; ".join(self.problems))


def lora_state(model) -> dict:
    """A host copy of the trainable weights: kept on the GPU, the copies the comparison holds (initial and
    stock-final weights) would add to the peak memory measured for the runs."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.named_parameters() if v.requires_grad}


def load_lora_state(model, state: dict):
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def _draw_zero_b(model) -> None:
    """B ~ N(0, sigma) where B is all zeros, sigma putting s * B @ A @ x at about half of W @ x."""
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    from ..ops.dequantize import dequantize_nf4

    generator = torch.Generator().manual_seed(0)
    for layer in model.modules():
        if not isinstance(layer, LoraLinear4bit):
            continue
        for name, b_module in layer.lora_B.items():
            b = b_module.weight
            if b.count_nonzero():
                continue
            a = layer.lora_A[name].weight
            w_std = dequantize_nf4(layer.base_layer.weight).float().std().item()
            a_scale = a.float().norm(dim=1).mean().item() / math.sqrt(a.shape[1])  # |A x| / |x| per row
            sigma = 0.5 * w_std / (layer.scaling[name] * a_scale * math.sqrt(a.shape[0]))
            with torch.no_grad():
                b.copy_(torch.randn(b.shape, generator=generator) * sigma)


def _loss(model, batch: dict, autocast_dtype, seed: int) -> torch.Tensor:
    """The model's loss on `batch`, the forward under autocast when asked, the RNG seeded so that both
    runs draw the same dropout masks."""
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        return model(**on_device(batch, device)).loss


def _loss_and_grads(model, batch: dict, autocast_dtype, seed: int):
    model.zero_grad(set_to_none=True)
    loss = _loss(model, batch, autocast_dtype, seed)
    loss.backward()
    grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def _losses(model, batches, autocast_dtype, seed: int) -> list:
    with torch.no_grad():
        return [_loss(model, batch, autocast_dtype, seed).item() for batch in batches]


def _short(name: str) -> str:
    return name.removeprefix("base_model.model.").removesuffix(".weight").replace(".default", "")


# patch_model's report fields -> the CALLS kind that proves each ran
_KINDS = {"mlps": "mlp", "qkv": "qkv", "rope": "rope", "chunked_loss": "loss", "rms_norms": "rms_norm"}


def verify(model, batches: list[dict], dtype: torch.dtype = torch.bfloat16, autocast_dtype=None, seed: int = 0,
           **patch_options) -> VerifyReport:
    """Stock peft against patch_model(model, **patch_options) from the same state (restored afterwards):
    `dtype` is the compute dtype (it picks the tolerances), `autocast_dtype` runs the forward under autocast
    as Trainer(bf16=True) does. The model is left unpatched."""
    unpatch_model(model)
    initial = lora_state(model)
    result = VerifyReport(dtype)
    try:
        _draw_zero_b(model)
        model.train()
        stock_loss, stock_grads = _loss_and_grads(model, batches[0], autocast_dtype, seed)
        result.stock_losses = [stock_loss] + _losses(model, batches[1:], autocast_dtype, seed)
        reset_call_counts()
        report = patch_model(model, verbose=False, **patch_options)
        patched_loss, patched_grads = _loss_and_grads(model, batches[0], autocast_dtype, seed)
        result.patched_losses = [patched_loss] + _losses(model, batches[1:], autocast_dtype, seed)
        result.calls = dict(CALLS)
    finally:
        unpatch_model(model)
        load_lora_state(model, initial)
    rel_tol, cos_tol = GRAD_TOLERANCE[dtype]
    for name, stock in stock_grads.items():
        patched = patched_grads.get(name)
        if patched is None:
            result.problems.append(f"{_short(name)} got no gradient patched")
            continue
        rel = ((patched - stock).norm() / stock.norm().clamp(min=1e-30)).item()
        cos = torch.nn.functional.cosine_similarity(patched.flatten(), stock.flatten(), dim=0).item()
        ok = rel <= rel_tol and cos >= cos_tol
        result.matrices.append(MatrixCheck(_short(name), rel, cos, ok))
    bad = [m.name for m in result.matrices if not m.passed]
    if bad:
        result.problems.append(f"{len(bad)} LoRA gradients off ({', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''})")
    if report.patched == 0:
        result.problems.append("no LoRA layer was patched")
    for field_name, kind in _KINDS.items():
        if getattr(report, field_name) and not result.calls.get(kind):
            result.problems.append(f"{kind} was patched but never ran fused")
    if report.patched and not any(result.calls.get(k) for k in ("linear", "mlp", "qkv")):
        result.problems.append("no fused LoRA Function ran")
    fallbacks = {k: v for k, v in result.calls.items() if k.startswith("fallback")}
    if fallbacks:
        result.problems.append("calls fell back to peft: " + ", ".join(f"{k[10:]} ({v})" for k, v in fallbacks.items()))
    worst_loss = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(result.stock_losses, result.patched_losses))
    if worst_loss > LOSS_RTOL[dtype]:
        result.problems.append(f"losses differ by {worst_loss:.2e} relative (tolerance {LOSS_RTOL[dtype]:g})")
    return result
