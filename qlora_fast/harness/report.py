"""The comparison report: JSON, Markdown and a PNG of both loss curves."""

import json
from pathlib import Path

from .compare import WEIGHT_RTOL, Comparison
from .verify import LOSS_RTOL


def _fmt_gib(value):
    return "n/a (CPU)" if value is None else f"{value:.2f}"


_CPU_NOTE = ("On a CPU the kernels run in Triton's interpreter, so the speed ratio says nothing about the "
             "GPU; bench/RESULTS.md holds GPU figures.\n")


def markdown_report(c: Comparison, title: str) -> str:
    s, p = c.stock, c.patched
    rows = "\n".join(f"| {i} | {a:.6f} | {b:.6f} | {abs(a - b):.2e} |"
                     for i, (a, b) in enumerate(zip(s.losses, p.losses)))
    mem_ratio = (f"{p.peak_memory_gib / s.peak_memory_gib:.2f}x" if s.peak_memory_gib else "n/a")
    timing = " (median, interleaved)" if c.interleaved_seconds else ""
    return f"""# qlora_fast regression: {title}

**{'PASS' if c.passed else 'FAIL'}**: max relative loss difference {c.max_rel_loss_diff:.2e} (tolerance
{LOSS_RTOL[c.dtype]:.0e}), LoRA weight updates after {len(s.losses)} steps differ by {c.weight_rel_diff:.2e}
relative (tolerance {WEIGHT_RTOL[c.dtype]:.0e}); {c.patched_layers} layers patched;
compute dtype {str(c.dtype).removeprefix('torch.')}.

Step-0 gradients (verify): {c.verification.verdict() if c.verification is not None else 'not run'}

| | stock peft | qlora_fast | ratio |
|---|---|---|---|
| tokens/s{timing} | {c.tokens_per_second("stock"):.1f} | {c.tokens_per_second("patched"):.1f} | {c.speedup:.2f}x |
| peak memory GiB | {_fmt_gib(s.peak_memory_gib)} | {_fmt_gib(p.peak_memory_gib)} | {mem_ratio} |

{_CPU_NOTE if s.peak_memory_gib is None else ""}
| step | stock loss | qlora_fast loss | abs diff |
|---|---|---|---|
{rows}
"""


def plot_losses(c: Comparison, path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = range(len(c.stock.losses))
    ax.plot(steps, c.stock.losses, "o-", label="stock peft + bitsandbytes")
    ax.plot(steps, c.patched.losses, "x--", label="qlora_fast patch_model")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"{title}: {'PASS' if c.passed else 'FAIL'}, max rel diff {c.max_rel_loss_diff:.1e}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(c: Comparison, out_dir: str, title: str) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps({"title": title, **c.to_dict()}, indent=1))
    (out / "report.md").write_text(markdown_report(c, title))
    plot_losses(c, out / "loss.png", title)
    return out
