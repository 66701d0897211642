"""Run the same training steps on stock peft and on patch_model, and compare losses, speed and memory.

Both runs start from the same LoRA weights, RNG seed and batches, in one process, one after the other.
"""

import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from ..patch import patch_model, unpatch_model
from .run import on_device
from .verify import LOSS_RTOL, load_lora_state, lora_state, verify

# After training, the LoRA weight updates (final - initial) of both runs must agree to this relative norm:
# the updates, not the weights, which A's initial values dominate. AdamW divides each gradient by its own
# running scale, so a constant factor on a gradient (a wrong scaling) hides here; verify() (step 0
# gradients, run first by compare_stock_and_patched) catches those. Elements whose gradients are near zero
# take full-size AdamW steps of either sign from summation-order noise: 3.5e-3 in fp32 on the CLI's tiny
# config (3 steps), 4.4e-2 in bf16 on the tiny model (4 steps).
WEIGHT_RTOL = {torch.float32: 2e-2, torch.float16: 0.2, torch.bfloat16: 0.2}


@dataclass
class RunStats:
    losses: list = field(default_factory=list)
    step_seconds: list = field(default_factory=list)
    tokens_per_step: int = 0
    peak_memory_gib: float | None = None

    @property
    def tokens_per_second(self) -> float:
        timed = self.step_seconds[1:] or self.step_seconds  # the first step pays compilation and autotuning
        return self.tokens_per_step * len(timed) / sum(timed)

    @property
    def median_tokens_per_second(self) -> float:
        """From the median step after the first: one slow step (a host hiccup) does not move it."""
        return self.tokens_per_step / statistics.median(self.step_seconds[1:] or self.step_seconds)


def _synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# How train_steps steps AdamW: "fused" is torch's fused kernel, what transformers' Trainer (and so TRL)
# uses by default; "foreach" is torch's default (bench/RESULTS.md says which figures used which).
OPTIMIZERS = {"fused": {"fused": True}, "foreach": {"foreach": True}}


def train_steps(model, batches: list[dict], lr: float = 1e-4, seed: int = 0, optimizer: str = "fused") -> RunStats:
    """AdamW steps on the trainable parameters, one batch each; times and losses of every step."""
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer {optimizer!r} is not one of {sorted(OPTIMIZERS)}")
    adamw = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, **OPTIMIZERS[optimizer])
    stats = RunStats(tokens_per_step=int(batches[0]["input_ids"].numel()))
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    for batch in batches:
        _synchronize(device)
        started = time.perf_counter()
        loss = model(**on_device(batch, device)).loss
        loss.backward()
        adamw.step()
        adamw.zero_grad(set_to_none=True)
        _synchronize(device)
        stats.step_seconds.append(time.perf_counter() - started)
        stats.losses.append(loss.item())
    if device.type == "cuda":
        stats.peak_memory_gib = torch.cuda.max_memory_allocated(device) / 2**30
    del adamw
    return stats


def _forward_backward_seconds(model, batch: dict) -> float:
    device = next(model.parameters()).device
    _synchronize(device)
    started = time.perf_counter()
    model(**on_device(batch, device)).loss.backward()
    model.zero_grad(set_to_none=True)
    _synchronize(device)
    return time.perf_counter() - started


def interleaved_step_seconds(model, batch: dict, rounds: int, **patch_options) -> tuple[float, float]:
    """Median forward+backward seconds of (stock, patched), alternating the two every round, so that a
    drift of the machine's speed during the measurement hits both alike. One warm-up round first."""
    times = {"stock": [], "patched": []}
    try:
        for round_ in range(rounds + 1):
            for variant in times:
                if variant == "patched":
                    patch_model(model, verbose=False, **patch_options)
                seconds = _forward_backward_seconds(model, batch)
                unpatch_model(model)
                if round_:
                    times[variant].append(seconds)
    finally:
        unpatch_model(model)
    return statistics.median(times["stock"]), statistics.median(times["patched"])


@dataclass
class Comparison:
    stock: RunStats
    patched: RunStats
    dtype: torch.dtype
    weight_rel_diff: float
    patched_layers: int
    # median step seconds (stock, patched) measured interleaved; None when not asked for
    interleaved_seconds: tuple | None = None
    verification: object = None  # verify.VerifyReport of step 0's gradients and the fused calls

    @property
    def max_abs_loss_diff(self) -> float:
        return max(abs(a - b) for a, b in zip(self.stock.losses, self.patched.losses))

    @property
    def max_rel_loss_diff(self) -> float:
        return max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(self.stock.losses, self.patched.losses))

    @property
    def passed(self) -> bool:
        return (self.max_rel_loss_diff <= LOSS_RTOL[self.dtype]
                and self.weight_rel_diff <= WEIGHT_RTOL[self.dtype]
                and (self.verification is None or self.verification.passed))

    def tokens_per_second(self, variant: str) -> float:
        """'stock' or 'patched' throughput: from the interleaved timing when there is one."""
        if self.interleaved_seconds:
            return self.stock.tokens_per_step / self.interleaved_seconds[variant == "patched"]
        return getattr(self, variant).tokens_per_second

    @property
    def speedup(self) -> float:
        return self.tokens_per_second("patched") / self.tokens_per_second("stock")

    def to_dict(self) -> dict:
        out = {"stock": asdict(self.stock), "patched": asdict(self.patched)}
        for run in ("stock", "patched"):
            out[run]["tokens_per_second"] = self.tokens_per_second(run)
        out.update(dtype=str(self.dtype).removeprefix("torch."), weight_rel_diff=self.weight_rel_diff,
                   patched_layers=self.patched_layers, max_abs_loss_diff=self.max_abs_loss_diff,
                   max_rel_loss_diff=self.max_rel_loss_diff, loss_rtol=LOSS_RTOL[self.dtype],
                   weight_rtol=WEIGHT_RTOL[self.dtype], speedup=self.speedup, passed=self.passed,
                   interleaved_seconds=self.interleaved_seconds)
        if self.verification is not None:
            out["verification"] = {"verdict": self.verification.verdict(), "calls": self.verification.calls,
                                   "gradients": [asdict(m) for m in self.verification.matrices]}
        return out


def compare_stock_and_patched(model, batches: list[dict], dtype: torch.dtype, lr: float = 1e-4,
                              seed: int = 0, timing_rounds: int = 0, optimizer: str = "fused",
                              **patch_options) -> Comparison:
    """Trains `model` (a peft model over NF4 layers, unpatched) on `batches` twice: stock, then patched
    with `patch_model(model, **patch_options)`; then, with `timing_rounds`, times both interleaved."""
    verification = verify(model, batches[:1], dtype, seed=seed, **patch_options)
    initial = lora_state(model)
    stock = train_steps(model, batches, lr, seed, optimizer)
    stock_final = lora_state(model)

    load_lora_state(model, initial)
    report = patch_model(model, verbose=False, **patch_options)
    try:
        patched = train_steps(model, batches, lr, seed, optimizer)
        patched_final = lora_state(model)
    finally:
        unpatch_model(model)
        load_lora_state(model, initial)

    num = sum((patched_final[k].double() - stock_final[k].double()).norm() ** 2 for k in stock_final)
    den = sum((stock_final[k].double() - initial[k].double()).norm() ** 2 for k in stock_final)
    interleaved = None
    if timing_rounds:
        interleaved = interleaved_step_seconds(model, batches[0], timing_rounds, **patch_options)
    return Comparison(stock, patched, dtype, float((num / den).sqrt()), report.patched, interleaved, verification)
