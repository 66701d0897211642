"""Kernel launches per decoder layer of a patched QLoRA training step, counted on the CPU (no GPU needed).

  python bench/launch_count.py                       # patch_model's defaults
  python bench/launch_count.py --base /tmp/base      # and a checkout of another commit, side by side

Steps of a few thousand tokens are bound by the host, whose cost grows with the launches a layer makes.
This runs a small random Llama (bf16, checkpointed, LoRA on all linear layers) with Triton's launches
replaced by a counter and counts, per decoder layer, the aten ops that launch a kernel on a GPU (views,
allocations and metadata ops excluded) and the Triton launches, in the checkpoint's first pass and in
the backward (recompute included). CPU-only paths differ from CUDA ones in a few places: on CUDA the
adapters' fp32 gradients come straight from the GEMM, so the `to` casts in lora_grads do not launch.
"""

import argparse
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

_NO_LAUNCH = {"view", "t", "transpose", "split_with_sizes", "split", "expand", "detach", "slice", "select",
              "unsqueeze", "as_strided", "empty", "new_empty", "empty_like", "promote_types", "_unsafe_view",
              "alias", "reshape", "empty_strided"}
LAYERS = 4


def count(root: str) -> dict:
    """{phase: (aten launches per layer, Triton launches per layer, Counter of aten ops)} for the
    qlora_fast found at `root`; runs in this process, so call it in a fresh one."""
    os.environ["TRITON_INTERPRET"] = "0"  # real JIT functions, never launched
    sys.path[0] = root  # not bench/: transformers would take bench/kernels.py for the `kernels` package
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from triton.runtime.jit import KernelInterface

    triton_launches = Counter()
    KernelInterface.__getitem__ = lambda self, grid: lambda *a, **k: triton_launches.update(["launch"])

    class AtenLaunches(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name not in _NO_LAUNCH:
                self.ops[name] += 1
            return func(*args, **(kwargs or {}))

    from qlora_fast import patch_model
    from qlora_fast.harness.models import MODEL_SHAPES, add_lora, quantize_to_nf4_, random_causal_lm

    MODEL_SHAPES["launch-count"] = ("llama", dict(vocab_size=512, hidden_size=128, intermediate_size=256,
                                                  num_hidden_layers=LAYERS, num_attention_heads=4,
                                                  num_key_value_heads=2, max_position_embeddings=512))
    model = quantize_to_nf4_(random_causal_lm("launch-count", torch.bfloat16))
    model.config.use_cache = False
    model = add_lora(model, init_b_std=1e-3).train()
    model.enable_input_require_grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    patch_model(model, verbose=False)
    ids = torch.randint(0, 512, (1, 32))
    model(input_ids=ids, labels=ids).loss.backward()  # warm-up
    model.zero_grad(set_to_none=True)
    triton_launches.clear()
    phases = {}
    with AtenLaunches() as forward:
        loss = model(input_ids=ids, labels=ids).loss
    phases["first pass"] = (forward.ops, sum(triton_launches.values()))
    triton_launches.clear()
    with AtenLaunches() as backward:
        loss.backward()
    phases["backward"] = (backward.ops, sum(triton_launches.values()))
    return {phase: (sum(ops.values()) / LAYERS, launches / LAYERS, ops) for phase, (ops, launches) in phases.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", default=None, help="another checkout to count beside this one")
    parser.add_argument("--ops", action="store_true", help="list the aten ops counted")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        for phase, (aten, triton_launches, ops) in count(args._child).items():
            print(f"{phase}\t{aten:.1f}\t{triton_launches:.1f}\t{dict(ops.most_common())}")
        return
    roots = {"this tree": str(Path(__file__).parents[1])}
    if args.base:
        roots["base"] = args.base
    print("| tree | phase | aten launches per layer | Triton launches per layer |\n|---|---|---|---|")
    for name, root in roots.items():
        out = subprocess.run([sys.executable, __file__, "--_child", root], capture_output=True, text=True,
                             check=True).stdout  # a fresh process each: the modules differ
        for line in out.strip().splitlines():
            phase, aten, triton_launches, ops = line.split("\t")
            print(f"| {name} | {phase} | {aten} | {triton_launches} |" + (f" {ops}" if args.ops else ""))


if __name__ == "__main__":
    main()
