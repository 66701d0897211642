"""Activation-sized work of one training step, counted on the CPU: what a GPU profile would show as
elementwise kernels, for a machine without a GPU (counts, never timings).

  TRITON_INTERPRET=1 python bench/op_counts.py --shape tiny-phi3 --hidden 256 --recipe peft \
      --stacks stock,qlora_fast

One training step of a tiny random model (`--recipe bare`: bf16 NF4 model; `peft`: peft's recipe, prepared
with fp32 norms and embeddings, under bf16 autocast), checkpointed, after one warm-up step, under a
TorchDispatchMode. Per stack (`stock`, `qlora_fast`, or `qlora_fast:CANDIDATE` of bench/recipes.py), the
aten ops that write at least one hidden state per token (views and allocations left out): calls, and
elements written per token x hidden x layer. GEMMs count as well: they show whether a variant moved work
out of them or into them. Triton kernels are not aten ops and do not show: this counts the work left
around them. Tiny models make weight-sized ops look activation-sized; read the op names.
"""

import argparse
import collections
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipes import switch_candidate  # noqa: E402

# ops that write no new values (views, allocations, host copies of offloaded checkpoints)
NOT_WORK = {"view", "_unsafe_view", "t", "transpose", "permute", "slice", "select", "alias", "detach", "expand",
            "as_strided", "unsqueeze", "squeeze", "split", "split_with_sizes", "unbind", "reshape", "set_",
            "empty", "empty_like", "new_empty", "empty_strided", "lift_fresh", "copy_"}


class _Writes(TorchDispatchMode):
    """(op, output dtype) -> [calls, elements written] for outputs of at least `least` elements."""

    def __init__(self, least: int):
        super().__init__()
        self.least = least
        self.counts = collections.defaultdict(lambda: [0, 0])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        first = out[0] if isinstance(out, (tuple, list)) and out else out
        if name not in NOT_WORK and isinstance(first, torch.Tensor) and first.numel() >= self.least:
            entry = self.counts[(name, str(first.dtype).removeprefix("torch."))]
            entry[0] += 1
            entry[1] += first.numel()
        return out


def _model(shape: str, hidden: int | None, recipe: str):
    from peft import prepare_model_for_kbit_training
    from qlora_fast.harness.models import MODEL_SHAPES, add_lora, quantize_to_nf4_, random_causal_lm

    own = MODEL_SHAPES[shape]
    if hidden:  # for this model only: the table is the harness's, shared with whatever runs after
        MODEL_SHAPES[shape] = (own[0], {**own[1], "hidden_size": hidden})
    try:
        model = quantize_to_nf4_(random_causal_lm(shape, torch.bfloat16), compute_dtype=torch.bfloat16)
    finally:
        MODEL_SHAPES[shape] = own
    if recipe == "peft":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = add_lora(model, init_b_std=0.02).train()
    model.enable_input_require_grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _step(model, ids, recipe: str) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe == "peft"):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    model.zero_grad(set_to_none=True)


def count(stack: str, shape: str, hidden: int | None, recipe: str, tokens=(2, 64)) -> dict:
    """(op, dtype) -> (calls, elements per token x hidden x layer) of one step of `stack`."""
    torch.manual_seed(0)
    model = _model(shape, hidden, recipe)
    switch_candidate(stack)
    try:
        if stack.startswith("qlora_fast"):
            from qlora_fast import patch_model

            patch_model(model, verbose=False)
        ids = torch.randint(0, model.config.vocab_size, tokens)
        _step(model, ids, recipe)  # warm-up: lazily built state is not the step's work
        per = ids.numel() * model.config.hidden_size
        writes = _Writes(per)
        with writes:
            _step(model, ids, recipe)
    finally:
        switch_candidate(stack, on=False)
    layers = model.config.num_hidden_layers
    return {key: (calls, elements / (per * layers)) for key, (calls, elements) in writes.counts.items()}


def table(results: dict) -> list[str]:
    """One row per (op, dtype), one column per stack, largest first."""
    stacks = list(results)
    keys = sorted({k for r in results.values() for k in r}, key=lambda k: -max(r.get(k, (0, 0))[1]
                                                                               for r in results.values()))
    lines = ["| op | dtype | " + " | ".join(f"{s} (calls: elements)" for s in stacks) + " |",
             "|---|---|" + "---|" * len(stacks)]
    for op, dtype in keys:
        cells = [f"{c}: {e:.2f}" if c else "-" for c, e in (results[s].get((op, dtype), (0, 0.0)) for s in stacks)]
        lines.append(f"| {op} | {dtype} | " + " | ".join(cells) + " |")
    return lines


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="tiny-llama", help="a tiny shape of qlora_fast.harness.models")
    parser.add_argument("--hidden", type=int, help="the shape's hidden size instead of its own")
    parser.add_argument("--recipe", choices=("bare", "peft"), default="bare")
    parser.add_argument("--stacks", default="stock,qlora_fast")
    args = parser.parse_args()
    results = {s: count(s, args.shape, args.hidden, args.recipe) for s in args.stacks.split(",")}
    print("\n".join(table(results)))


if __name__ == "__main__":
    main()
