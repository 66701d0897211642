"""The NF4 -> Triton challenge's dequantize harness (../shared/seeds/004_*.txt, `test_dequantize`), reproduced
for qlora_fast.dequantize_nf4, bitsandbytes and unsloth (when importable), fp16 and bf16 (GPU only).

  QLORA_FAST_COMMIT=<sha> python bench/seed_dequant.py --out $OUT/seed_dequant.md [--repeats 3]
  python bench/seed_dequant.py --render bench/seed_dequant.json --readme README.md   # README's summary

As the seed: three bitsandbytes NF4 MLPs (hd x m = 2048x8192, 1024x4096, 4096x14336; double quant,
blocksize 64; quant_state.dtype set to the harness dtype), seeds 3407/3409/3408, two warm-up rounds of
the seed's assert_same checks (each candidate's MLP forward against the module's own, and against
unsloth's dequantized weights where unsloth is there), then 1000 rounds of dequantizing up, gate and down
with torch.cuda.synchronize() after each call, timed by the wall clock and summed over the three MLPs.
Beside it: bit-exactness against bitsandbytes on every shape (odd shapes, non-nested, blocksize 64/128),
device-event medians and achieved bandwidth per weight, each launch candidate of the kernel, the copy
bandwidth, and the host cost per call.
"""

import argparse
import datetime
import json
import os
import statistics
from pathlib import Path
import time

import torch
import torch.nn as nn

README_BEGIN, README_END = "<!-- seed:begin (bench/seed_dequant.py --render) -->", "<!-- seed:end -->"
OURS, UNSLOTH = "qlora_fast.dequantize_nf4", "unsloth fast_dequantize"


def readme_summary(record: dict) -> str:
    """README's lines for a run: harness seconds against unsloth, the largest weight's share of copy
    bandwidth, host us per call, per dtype."""
    lines = [f"Measured {record['versions']}, commit {record.get('commit', '?')}, `{record.get('command', '?')}`:", "",
             "| dtype | harness s (ours / unsloth) | vs unsloth | 4096x14336 % of copy bandwidth (ours / unsloth) "
             "| host us per call (ours / unsloth) |", "|---|---|---|---|---|"]
    for dtype in ("torch.float16", "torch.bfloat16"):
        d = record[dtype]
        ours, theirs = (statistics.median(d["harness_s"][c]) for c in (OURS, UNSLOTH))
        largest = d["device"][-1]
        share = lambda c: f"{largest['floor_ms'] / largest[c]:.0%}"
        lines.append(f"| {dtype.split('.')[1]} | {ours:.3f} / {theirs:.3f} | {theirs / ours:.2f}x | {share(OURS)} / "
                     f"{share(UNSLOTH)} | {d['host_us'][OURS]:.1f} / {d['host_us'][UNSLOTH]:.1f} |")
    return "\n".join(lines) + "\n"


def render_readme(json_path: str, readme: str) -> None:
    page = Path(readme).read_text()
    start, end = page.index(README_BEGIN) + len(README_BEGIN), page.index(README_END)
    Path(readme).write_text(page[:start] + "\n" + readme_summary(json.loads(Path(json_path).read_text())) + page[end:])


try:  # as the seed does, unsloth first: it patches what it needs on import
    import unsloth  # noqa: F401
    from unsloth.kernels.utils import fast_dequantize
except Exception:  # noqa: BLE001  (not carried, or fails to import here: the table says so)
    fast_dequantize = None

import bitsandbytes
import bitsandbytes.functional as bnbF
import triton
from bitsandbytes.nn import Linear4bit, Params4bit
from transformers import set_seed
from transformers.activations import ACT2FN

import qlora_fast
from qlora_fast.kernels._utils import Relaunch, current_stream
from qlora_fast.kernels.nf4_dequantize import CANDIDATE_META, new_output, nf4_dequantize
from qlora_fast.nf4 import cached_nf4_weight, nf4_weight_from_bnb

OPTIONS = [(2, 3333, 2048, 8192, 3407), (5, 777, 1024, 4096, 3409), (3, 2048, 4096, 14336, 3408)]


def bnb_linear4bit(hd, m, dtype, nested=True, blocksize=64):
    layer = Linear4bit(hd, m, bias=None, compute_dtype=dtype, compress_statistics=nested, quant_type="nf4")
    if blocksize != 64:  # the seed's layers use bitsandbytes' default, 64
        layer.weight = Params4bit(layer.weight.data, requires_grad=False, compress_statistics=nested,
                                  quant_type="nf4", blocksize=blocksize)
    return layer


class MLP(nn.Module):
    def __init__(self, hd=4096, m=14336, dtype=torch.float16):
        super().__init__()
        self.gate_proj = bnb_linear4bit(hd, m, dtype).to("cuda")
        self.up_proj = bnb_linear4bit(hd, m, dtype).to("cuda")
        self.down_proj = bnb_linear4bit(m, hd, dtype).to("cuda")
        for p in (self.gate_proj, self.up_proj, self.down_proj):
            p.weight.quant_state.dtype = dtype
        self.act_fn = ACT2FN["silu"]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def assert_same(x, y, dtype):
    assert x.dtype == dtype
    torch.testing.assert_close(x, y, check_stride=True, atol=0.01, rtol=0.1)


def mlp_forward(X, mlp, fx):
    up = X @ fx(mlp.up_proj).t()
    gate = X @ fx(mlp.gate_proj).t()
    return (mlp.act_fn(gate) * up) @ fx(mlp.down_proj).t()


def mlp_dequantize(mlp, fx):
    a = fx(mlp.up_proj).t(); torch.cuda.synchronize()  # noqa: E702  (the seed's lines)
    b = fx(mlp.gate_proj).t(); torch.cuda.synchronize()  # noqa: E702
    c = fx(mlp.down_proj).t(); torch.cuda.synchronize()  # noqa: E702
    return a, b, c


CANDIDATES = {
    "qlora_fast.dequantize_nf4": lambda m: qlora_fast.dequantize_nf4(m),
    "bitsandbytes dequantize_4bit": lambda m: bnbF.dequantize_4bit(m.weight, m.weight.quant_state),
}
if fast_dequantize is not None:
    CANDIDATES["unsloth fast_dequantize"] = lambda m: fast_dequantize(m.weight, m.weight.quant_state)


def test_dequantize(fx, dtype):
    """The seed's harness with the dtype as a parameter: seconds for 1000 rounds summed over the MLPs."""
    elapsed = 0
    for bsz, qlen, hd, m, seed in OPTIONS:
        set_seed(seed)
        torch.set_default_dtype(torch.float32)
        mlp = MLP(hd=hd, m=m, dtype=dtype)
        X = torch.randn((bsz, qlen, hd), device="cuda", dtype=dtype)
        torch.cuda.synchronize()
        for _ in range(2):
            if fast_dequantize is not None:
                assert_same(mlp_forward(X, mlp, CANDIDATES["unsloth fast_dequantize"]), mlp(X), dtype)
            assert_same(mlp_forward(X, mlp, fx), mlp(X), dtype)
            if fast_dequantize is not None:
                for ours, theirs in zip(mlp_dequantize(mlp, fx), mlp_dequantize(mlp, CANDIDATES["unsloth fast_dequantize"])):
                    assert_same(ours, theirs, dtype)
        torch.cuda.synchronize()
        start = time.time()
        for _ in range(1000):
            mlp_dequantize(mlp, fx)
        elapsed += time.time() - start
    return elapsed


def bit_exactness(dtype) -> list[str]:
    """Every shape the harness uses and odd ones, nested or not, blocksize 64 and 128: equal to bitsandbytes."""
    failures = []
    shapes = [(8192, 2048), (4096, 1024), (14336, 4096), (4096, 14336), (1000, 1337), (3, 5), (4097, 129)]
    for (out_f, in_f) in shapes:
        for nested in (True, False):
            for blocksize in (64, 128):
                layer = bnb_linear4bit(in_f, out_f, dtype, nested, blocksize).to("cuda")
                layer.weight.quant_state.dtype = dtype
                ref = bnbF.dequantize_4bit(layer.weight, layer.weight.quant_state)
                for out in (qlora_fast.dequantize_nf4(layer), qlora_fast.dequantize_nf4(layer)):  # launch + direct
                    if not torch.equal(out, ref):
                        failures.append(f"{out_f}x{in_f} nested={nested} blocksize={blocksize}")
                w = nf4_weight_from_bnb(layer.weight)
                for i, meta in enumerate(CANDIDATE_META):
                    if not torch.equal(nf4_dequantize(w, dtype, meta=meta), ref):
                        failures.append(f"{out_f}x{in_f} nested={nested} blocksize={blocksize} meta {i}")
    return failures


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 2 GiB device-to-device copy."""
    src = torch.randn(2**29, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.nbytes / (ms * 1e-3)


def weight_bytes(layer, dtype) -> int:
    w = nf4_weight_from_bnb(layer.weight)
    return w.packed.nbytes + w.absmax.nbytes + w.numel * torch.finfo(dtype).bits // 8


def device_timings(dtype, bandwidth) -> list[dict]:
    rows = []
    for _, _, hd, m, seed in OPTIONS:
        set_seed(seed)
        for name, (i, o) in {"gate/up": (hd, m), "down": (m, hd)}.items():
            layer = bnb_linear4bit(i, o, dtype).to("cuda")
            layer.weight.quant_state.dtype = dtype
            nbytes = weight_bytes(layer, dtype)
            row = {"weight": f"{o}x{i} ({name})", "MB": nbytes / 1e6, "floor_ms": nbytes / bandwidth * 1e3}
            for cand, fx in CANDIDATES.items():
                row[cand] = triton.testing.do_bench(lambda: fx(layer), warmup=25, rep=100, return_mode="median")
            w = nf4_weight_from_bnb(layer.weight)
            out = torch.empty(w.shape, dtype=dtype, device="cuda")
            row["metas"] = [triton.testing.do_bench(lambda m_=m_: nf4_dequantize(w, dtype, out=out, meta=m_), warmup=25,
                                                    rep=100, return_mode="median") for m_ in CANDIDATE_META]
            rows.append(row)
    return rows


def host_us_per_call(fx, layer, calls=2000) -> float:
    """Wall time per call of back-to-back calls on a 64x64 weight (GPU time ~2 us): the host's cost."""
    for _ in range(50):
        fx(layer)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fx(layer)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


@triton.jit
def _noop_kernel(x_ptr):
    pass


def host_breakdown(layer, dtype) -> dict:
    """Host us per back-to-back call of each piece of the public call, and of the floor pieces any eager
    dequantize pays (an allocation, a launch, an aten op), on the same 64x64 weight."""
    w = cached_nf4_weight(layer.weight)
    out = torch.empty(w.shape, dtype=dtype, device="cuda")
    a = torch.ones(64, device="cuda")
    relaunch = Relaunch.of(_noop_kernel[(1,)](a), (1,), (a,), 0)
    c_args = (*relaunch._grid, current_stream(relaunch.device), *relaunch._c_head, a.data_ptr(), *relaunch._tail)
    pieces = {
        "torch.empty": lambda _: torch.empty(w.shape, dtype=dtype, device="cuda"),
        "new_output (empty_like of a template)": lambda _: new_output(w.output_templates, w.shape, dtype, w.device),
        "torch.add (aten op)": lambda _: torch.add(a, a),
        "empty Triton kernel launch": lambda _: _noop_kernel[(1,)](a),
        "empty kernel, Relaunch": lambda _: relaunch(a),
        "empty kernel, Triton's C launch alone": lambda _: relaunch._c_launch(*c_args),
        "cached_nf4_weight lookup": lambda lay: cached_nf4_weight(lay.weight),
        "nf4_dequantize(w, out=out)": lambda _: nf4_dequantize(w, dtype, out=out),
        "dequantize_nf4(layer)": lambda lay: qlora_fast.dequantize_nf4(lay),
        "torch.cuda.synchronize (idle)": lambda _: torch.cuda.synchronize(),
    }
    return {name: host_us_per_call(fx, layer) for name, fx in pieces.items()}


def harness_floor_us(dtype) -> dict:
    """Wall us per call of the seed's loop (`fx(layer).t()`, then a sync) where fx does no dequantizing:
    what any candidate pays beyond its kernel's device time, on the harness's first MLP."""
    set_seed(OPTIONS[0][-1])
    mlp = MLP(hd=OPTIONS[0][2], m=OPTIONS[0][3], dtype=dtype)
    ready = torch.empty(64, 64, dtype=dtype, device="cuda")
    a = torch.ones(64, device="cuda")
    relaunch = Relaunch.of(_noop_kernel[(1,)](a), (1,), (a,), 0)
    floors = {"a tensor at hand, no launch": lambda _: ready,
              "torch.empty_like, no launch": lambda _: torch.empty_like(ready),
              "an empty kernel's Relaunch": lambda _: relaunch(ready)}
    result = {}
    for name, fx in floors.items():
        for _ in range(20):
            mlp_dequantize(mlp, fx)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(1000):
            mlp_dequantize(mlp, fx)
        result[name] = (time.perf_counter() - start) / 3000 * 1e6
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="seed_dequant.md")
    parser.add_argument("--repeats", type=int, default=3, help="harness runs per candidate and dtype (interleaved)")
    parser.add_argument("--render", metavar="JSON", help="only rewrite --readme's summary from a run's JSON")
    parser.add_argument("--readme", default="README.md")
    args = parser.parse_args()
    if args.render:
        return render_readme(args.render, args.readme)
    bandwidth = copy_bandwidth()
    versions = (f"{datetime.date.today()}, {torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
                f"{triton.__version__}, bitsandbytes {bitsandbytes.__version__}, unsloth "
                f"{getattr(__import__('unsloth'), '__version__', '?') if fast_dequantize else 'not importable'}")
    lines = [f"# Seed dequantize harness ({versions})", "", f"Copy bandwidth (read + write): {bandwidth / 1e12:.2f} TB/s", ""]
    record = {"versions": versions, "copy_TBps": bandwidth / 1e12, "commit": os.environ.get("QLORA_FAST_COMMIT", "?"),
              "command": f"python bench/seed_dequant.py --repeats {args.repeats}"}
    for dtype in (torch.float16, torch.bfloat16):
        failures = bit_exactness(dtype)
        lines.append(f"Bit-exact with bitsandbytes ({dtype}, 7 shapes x nested/not x blocksize 64/128, the public call "
                     f"twice and every launch candidate): {'yes' if not failures else 'NO: ' + '; '.join(failures[:8])}")
        times = {c: [] for c in CANDIDATES}
        for _ in range(args.repeats):
            for cand, fx in CANDIDATES.items():
                times[cand].append(test_dequantize(fx, dtype))
        lines += ["", f"## {dtype}: harness seconds (1000 rounds x 3 MLPs x 3 weights, sync after each call)", "",
                  "| candidate | runs (s) | median s | vs unsloth |", "|---|---|---|---|"]
        ref = statistics.median(times["unsloth fast_dequantize"]) if fast_dequantize else None
        for cand, ts in times.items():
            med = statistics.median(ts)
            lines.append(f"| {cand} | {', '.join(f'{t:.3f}' for t in ts)} | {med:.3f} | "
                         f"{f'{ref / med:.2f}x' if ref else 'n/a'} |")
        rows = device_timings(dtype, bandwidth)
        lines += ["", f"Device time per weight ({dtype}, median ms, do_bench; % of copy bandwidth)", "",
                  "| weight | MB | floor ms | " + " | ".join(CANDIDATES) + " | launch candidates ms (CANDIDATE_META order) |",
                  "|---|---|---|" + "---|" * len(CANDIDATES) + "---|"]
        for r in rows:
            cells = " | ".join(f"{r[c]:.4f} ({r['floor_ms'] / r[c]:.0%})" for c in CANDIDATES)
            lines.append(f"| {r['weight']} | {r['MB']:.1f} | {r['floor_ms']:.4f} | {cells} | "
                         f"{', '.join(f'{t:.4f}' for t in r['metas'])} |")
        small = bnb_linear4bit(64, 64, dtype).to("cuda")
        small.weight.quant_state.dtype = dtype
        host = {c: host_us_per_call(fx, small) for c, fx in CANDIDATES.items()}
        pieces = host_breakdown(small, dtype)
        floors = harness_floor_us(dtype)
        lines += ["", f"Host us per call, 64x64 weight, back to back ({dtype}): " +
                  ", ".join(f"{c} {us:.1f}" for c, us in host.items()),
                  "", "Pieces, us per call: " + ", ".join(f"{c} {us:.1f}" for c, us in pieces.items()),
                  "", "Harness floor, us per call of the seed's loop (fx(layer).t() then a sync) with no dequantize: " +
                  ", ".join(f"{c} {us:.1f}" for c, us in floors.items()), ""]
        record[str(dtype)] = {"harness_s": times, "device": rows, "host_us": host, "host_pieces_us": pieces,
                              "harness_floor_us": floors, "bit_exact_failures": failures}
        print("\n".join(lines), flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    open(args.out, "w").write(text)
    open(args.out.rsplit(".", 1)[0] + ".json", "w").write(json.dumps(record, indent=1, default=str))


if __name__ == "__main__":
    main()
