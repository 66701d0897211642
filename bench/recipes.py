"""The recipe matrix: the training scripts users run, stock peft vs qlora_fast vs unsloth (GPU only).

  python bench/recipes.py --out $OUT/recipes [--recipes bare,peft,trl_padded,trl_packed,cli]
                          [--shapes llama-3-8b,qwen2.5-7b,gemma-2-9b,phi-3.5-mini] [--stacks stock,qlora_fast,unsloth] [--steps 25]

Recipes (each a user's script, random-init model of a real shape, NF4 double quant, bf16 compute, LoRA
r=16 alpha=16 on all 7 projections (Phi-3's 4 fused ones), gradient checkpointing, fused AdamW, lr 1e-4):
- bare: the model in bf16, `get_peft_model`, a bare loop, 4x2048 random tokens (our older benchmarks'
  recipe);
- peft: `prepare_model_for_kbit_training` (fp32 embeddings, norms, head), `get_peft_model`, the forward
  under `torch.autocast(bf16)` as Trainer(bf16=True) runs it, 4x2048;
- trl_padded: `SFTTrainer(model, peft_config=LoraConfig(...), args=SFTConfig(bf16=True, ...))`, batches of
  4 rows of 2048 tokens of text;
- trl_packed: the same with `packing=True` (padding-free rows of up to 8192 tokens from documents of
  100-900 tokens: every row has its own length); trl_packed16k / trl_packed32k: rows of up to 16384 /
  32768 tokens (long context; not in the default set);
- RECIPE_rN (e.g. peft_r64, bare_r128): that recipe with LoRA rank N, alpha N (not in the default set);
- cli: `qlora-fast train` on the shipped configs/llama-3.1-8b-alpaca.yaml (4 x 2048, gradient accumulation
  4, paged 8-bit AdamW) with base_model random:<shape> and random text documents (stock: `patch: false`).
Stacks: stock peft; qlora_fast (the same script plus `patch_model`); unsloth (its own
FastLanguageModel.from_pretrained + get_peft_model, then the same loop or SFTTrainer; WITH_PEERS=1 site);
qlora_fast:CANDIDATE (qlora_fast with one of CANDIDATES switched on: rows kept in OUT.json, not in the
table, so a launch candidate is timed on the users' scripts in the lease that times the default).
Each (stack, shape) runs in its own process (unsloth patches transformers globally); each recipe builds a
fresh model. Per row: tokens/s from the median and the mean step after `--warmup` steps, the seconds the
first steps took beyond the median (compilation, autotuning), peak memory, losses. Writes
OUT.md (table) and OUT.json (every row); the driver appends to them across invocations.
`--profile-step N` runs the Nth step of each row under torch.profiler (that step is left out of the
timings) and writes its top kernels and GPU idle gaps (bench/idle.py) to OUT-profile-STACK-SHAPE-RECIPE.md.
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPES = ("bare", "peft", "trl_padded", "trl_packed", "cli")
PACKED_LENGTHS = {"trl_packed": 8192, "trl_packed16k": 16384, "trl_packed32k": 32768}  # tokens per packed row
# Candidates a `qlora_fast:NAME` stack switches on before patching: NAME -> (module, its boolean switch).
# Those timed and their outcome are in bench/NOTES.md.
CANDIDATES: dict[str, tuple[str, str]] = {}
# LoRA on every projection of a block: Llama's seven, or Phi-3's four (its q/k/v and gate/up each one layer)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FUSED_TARGETS = {"phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}


def _targets(shape: str) -> list[str]:
    from qlora_fast.harness.models import MODEL_SHAPES

    return FUSED_TARGETS.get(MODEL_SHAPES[shape][0], TARGETS)


# ---------------------------------------------------------------- worker side (one stack, one shape)

def _quantized(shape):
    import torch

    from qlora_fast.harness.models import quantize_to_nf4_, random_causal_lm

    model = quantize_to_nf4_(random_causal_lm(shape, torch.bfloat16, "cuda"))
    model.config.use_cache = False
    return model


def _split_rank(recipe: str) -> tuple[str, int]:
    """'peft_r64' -> ('peft', 64); a recipe without the suffix runs at rank 16."""
    name, _, rank = recipe.rpartition("_r")
    return (name, int(rank)) if name and rank.isdigit() else (recipe, 16)


def _lora_config(shape: str, rank: int):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=_targets(shape),
                      task_type="CAUSAL_LM")


class _Steps:
    """Per-step seconds (synchronized), tokens and losses; `profiled`: the step (0-based) to profile, or None,
    and where to write what the profiler saw."""

    def __init__(self, profiled: int | None = None, profile_path: str | None = None):
        self.seconds, self.tokens, self.losses = [], [], []
        self.profiled, self.profile_path, self._profiler = profiled, profile_path, None

    def begin_step(self, index: int) -> bool:
        """Starts the profiler if step `index` is the one profiled; whether it is."""
        if index != self.profiled:
            return False
        from torch.profiler import ProfilerActivity, profile

        self._profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
        self._profiler.__enter__()
        return True

    def end_profiled_step(self) -> None:
        """Stops the profiler and writes the step's top kernels and GPU idle gaps."""
        from idle import step_report

        self._profiler.__exit__(None, None, None)
        Path(self.profile_path).write_text(step_report(self._profiler))
        self._profiler = None

    def row(self, warmup: int) -> dict:
        import torch

        timed = self.seconds[warmup:]
        tokens = self.tokens[warmup:]
        median_step = statistics.median(timed)
        return {"steps": len(self.seconds), "timed_steps": len(timed),
                "tokens_per_s_median": statistics.median(t / s for t, s in zip(tokens, timed)),
                "tokens_per_s_mean": sum(tokens) / sum(timed),
                "first_steps_excess_s": sum(s - median_step for s in self.seconds[:warmup]),
                "step_s": [round(s, 4) for s in self.seconds], "tokens": self.tokens,
                "losses": [round(x, 4) for x in self.losses],
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def _random_batches(vocab, steps, batch=4, seq=2048):
    import torch

    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(steps)]


def _loop(model, steps, autocast: bool, record: _Steps) -> _Steps:
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    adamw = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=True)
    torch.cuda.reset_peak_memory_stats()  # the peak of training, not of building the random model
    model.train()
    for index, ids in enumerate(_random_batches(model.config.vocab_size, steps)):
        ids = ids.cuda()
        torch.cuda.synchronize()
        profiled = record.begin_step(index)
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        adamw.step()
        adamw.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if profiled:
            record.end_profiled_step()
            continue
        record.seconds.append(time.perf_counter() - start)
        record.tokens.append(ids.numel())
        record.losses.append(loss.item())
    return record


def _texts(packed_length: int | None, steps: int):
    """Random printable documents: 100-900 bytes for packing (enough for `steps` rows of `packed_length`),
    >= 2048 bytes (truncated) for padding."""
    import random

    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyz ,.;:ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789\n"
    documents = steps * 20 * (packed_length or 0) // 8192
    lengths = [rng.randint(100, 900) for _ in range(documents)] if packed_length else [2100] * (steps * 4 + 8)
    return ["".join(rng.choice(alphabet) for _ in range(n)) for n in lengths]


def _timed_training(trainer, record: _Steps) -> _Steps:
    """trainer.train() with each optimizer step timed (synchronized) and its tokens counted (those the
    attention mask keeps, or every one of a padding-free row)."""
    import torch
    from transformers import TrainerCallback

    counted = {"tokens": 0}

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            self.profiled = record.begin_step(state.global_step)
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            if self.profiled:
                record.end_profiled_step()
                counted["tokens"] = 0
                return
            record.seconds.append(time.perf_counter() - self.start)
            record.tokens.append(counted["tokens"])
            counted["tokens"] = 0

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                record.losses.append(logs["loss"])

    def count(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None:
            counted["tokens"] += int(ids.numel() if kwargs.get("attention_mask") is None
                                     else kwargs["attention_mask"].sum())

    trainer.add_callback(Timer())
    trainer.model.register_forward_pre_hook(count, with_kwargs=True)
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    return record


def _trl(model, tokenizer, steps, packed_length: int | None, peft_config, patch: bool, record: _Steps) -> _Steps:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    packed = packed_length is not None
    config = SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=1 if packed else 4,
                       max_length=packed_length or 2048, packing=packed, bf16=True, learning_rate=1e-4,
                       logging_steps=1, report_to="none", save_strategy="no", gradient_checkpointing=True,
                       gradient_checkpointing_kwargs={"use_reentrant": False}, dataset_text_field="text",
                       dataloader_num_workers=0, seed=0, lr_scheduler_type="constant", warmup_steps=0)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_dict({"text": _texts(packed_length, steps)}),
                         processing_class=tokenizer, peft_config=peft_config)
    if patch:
        import qlora_fast

        print(qlora_fast.patch_model(trainer.model, verbose=False).summary(), flush=True)
    return _timed_training(trainer, record)


def _cli(shape, steps, patch: bool, record: _Steps) -> _Steps:
    """`qlora-fast train` on the shipped Llama-3.1-8B Alpaca config (gradient accumulation 4, paged 8-bit
    AdamW, cosine schedule), with a random-init model of `shape` and documents of random text as the data;
    `patch: false` is the stock run."""
    from qlora_fast.cli.config import config_to_dict, load_config, parse_config
    from qlora_fast.cli.train import build_trainer

    data = Path(tempfile.mkdtemp()) / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in _texts(None, steps * 4)))
    raw = config_to_dict(load_config(str(Path(__file__).parents[1] / "configs" / "llama-3.1-8b-alpaca.yaml")))
    raw.update(base_model=f"random:{shape}", datasets=[{"path": str(data), "type": "text"}], max_steps=steps,
               output_dir=tempfile.mkdtemp(), val_set_size=0.0, logging_steps=1, save_steps=10**6, patch=patch)
    return _timed_training(build_trainer(parse_config(raw)), record)


def _unsloth_model(shape, max_length, rank):
    import torch
    from unsloth import FastLanguageModel

    from qlora_fast.harness.models import byte_tokenizer, random_causal_lm

    path = Path(tempfile.gettempdir()) / f"recipes-{shape}"
    if not (path / "config.json").exists():
        dense = random_causal_lm(shape, torch.bfloat16, "cuda")
        dense.save_pretrained(path)
        byte_tokenizer().save_pretrained(path)
        del dense
        torch.cuda.empty_cache()
    model, tokenizer = FastLanguageModel.from_pretrained(str(path), max_seq_length=max_length, dtype=torch.bfloat16,
                                                         load_in_4bit=True, local_files_only=True)
    model = FastLanguageModel.get_peft_model(model, r=rank, lora_alpha=rank, lora_dropout=0.0,
                                             target_modules=_targets(shape),
                                             use_gradient_checkpointing="unsloth", random_state=0)
    return model, tokenizer


def _patched(stack: str) -> bool:
    return stack.split(":")[0] == "qlora_fast"


def switch_candidate(stack: str, on: bool = True) -> None:
    """Sets the switch of a `qlora_fast:CANDIDATE` stack's candidate (nothing for other stacks)."""
    import importlib

    if ":" in stack:
        module, switch = CANDIDATES[stack.split(":", 1)[1]]
        setattr(importlib.import_module(module), switch, on)


def run_recipe(stack, shape, recipe, steps, record: _Steps) -> _Steps:
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training

    from qlora_fast.harness.models import byte_tokenizer

    torch.manual_seed(0)
    recipe, rank = _split_rank(recipe)
    packed_length = PACKED_LENGTHS.get(recipe)
    if recipe == "cli":
        if stack == "unsloth":
            raise NotImplementedError("qlora-fast train is qlora_fast's own script; unsloth has no counterpart")
        if rank != 16:
            raise NotImplementedError("the cli recipe runs the shipped config's rank")
        return _cli(shape, steps, patch=_patched(stack), record=record)
    if stack == "unsloth":
        model, tokenizer = _unsloth_model(shape, max(8192, packed_length or 0), rank)
        if recipe in ("bare", "peft"):
            return _loop(model, steps, autocast=recipe == "peft", record=record)
        return _trl(model, tokenizer, steps, packed_length, None, patch=False, record=record)
    model = _quantized(shape)
    patch = _patched(stack)
    if recipe.startswith("trl"):
        return _trl(model, byte_tokenizer(), steps, packed_length, _lora_config(shape, rank), patch, record)
    if recipe == "peft":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, _lora_config(shape, rank))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if recipe == "peft":
        model.enable_input_require_grads()
    if patch:
        import qlora_fast

        print(qlora_fast.patch_model(model, verbose=False).summary(), flush=True)
    return _loop(model, steps, autocast=recipe == "peft", record=record)


def worker(args):
    import gc

    import torch

    if args.stack == "unsloth":
        import unsloth  # noqa: F401  (first, as unsloth requires)
    from qlora_fast.ops.offloaded_checkpoint import keep_outcomes

    switch_candidate(args.stack)
    rows = []
    for recipe in args.recipes.split(","):
        torch.cuda.empty_cache()
        row = {"stack": args.stack, "shape": args.shape, "recipe": recipe}
        try:
            record = _Steps(None if args.profile_step is None else args.profile_step - 1,
                            f"{args.out}-profile-{args.stack}-{args.shape}-{recipe}.md")
            keep_outcomes(reset=True)
            row.update(run_recipe(args.stack, args.shape, recipe, args.steps, record).row(args.warmup))
            row["keeps"] = keep_outcomes(reset=True)  # kept, or why not ("copies lagging": the copies fell behind)
        except Exception as error:  # noqa: BLE001  (a stack that cannot run a recipe: the table says why)
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
        print("ROW " + json.dumps(row), flush=True)
        rows.append(row)
        gc.collect()
    return rows


# ---------------------------------------------------------------- driver side

def _versions() -> str:
    import importlib.metadata as md

    import torch

    names = ["torch", "triton", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "unsloth"]
    found = []
    for n in names:
        try:
            found.append(f"{n} {md.version(n)}")
        except md.PackageNotFoundError:
            pass
    return f"{torch.cuda.get_device_name()}, " + ", ".join(found)


def _commit() -> str:
    if os.environ.get("QLORA_FAST_COMMIT"):  # the device's copy of the tree may carry an older .git
        return os.environ["QLORA_FAST_COMMIT"][:7]  # passed in full; the tables name commits short
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


CROSS_RUN_MARK = " (†)"  # a ratio of figures measured at two commits: not side by side in one lease
CROSS_RUN_NOTE = "(†): the two figures were measured at different commits, in different leases of this GPU type."


def table(rows) -> list[str]:
    by = {(r["recipe"], r["shape"], r["stack"]): r for r in rows}
    lines = ["| recipe | shape | stock tok/s | qlora_fast tok/s | unsloth tok/s | qlora_fast vs stock | qlora_fast vs unsloth "
             "| peak GiB stock / qlora_fast / unsloth | first-steps excess s (qlora_fast) | final loss stock / qlora_fast / unsloth "
             "| qlora_fast measured at |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    known = RECIPES + tuple(PACKED_LENGTHS)[1:]
    ranked = sorted({r["recipe"] for r in rows} - set(known))  # the RECIPE_rN rows, after the rank-16 ones
    for recipe in known + tuple(ranked):
        for shape in sorted({r["shape"] for r in rows}):
            cells = [by.get((recipe, shape, s)) for s in ("stock", "qlora_fast", "unsloth")]
            if not any(cells):
                continue

            def tps(c, stack):
                if c is None:
                    return "n/a (qlora_fast's own CLI)" if (recipe, stack) == ("cli", "unsloth") else "not run"
                if "error" in c:
                    return f"failed: {c['error']}"
                return f"{c['tokens_per_s_median']:.0f} ({c['tokens_per_s_mean']:.0f})"

            def ratio(a, b):
                if not (a and b and "error" not in a and "error" not in b):
                    return "-"
                apart = CROSS_RUN_MARK if a.get("commit") != b.get("commit") else ""
                return f"{a['tokens_per_s_median'] / b['tokens_per_s_median']:.3f}x{apart}"

            def peak(c):
                return f"{c['peak_gib']:.2f}" if c and "error" not in c else "-"

            def last(c):
                return f"{c['losses'][-1]:.3f}" if c and "error" not in c and c["losses"] else "-"

            ours = cells[1]
            excess = f"{ours['first_steps_excess_s']:.1f}" if ours and "error" not in ours else "-"
            measured = f"{ours['commit']}, {ours['date']}" if ours and "date" in ours else "-"
            lines.append(f"| {recipe} | {shape} | {tps(cells[0], 'stock')} | {tps(cells[1], 'qlora_fast')} | {tps(cells[2], 'unsloth')} | "
                         f"{ratio(cells[1], cells[0])} | {ratio(cells[1], cells[2])} | "
                         f"{' / '.join(peak(c) for c in cells)} | {excess} | {' / '.join(last(c) for c in cells)} | {measured} |")
    return lines


def driver(args):
    out = Path(args.out)
    json_path = out.with_suffix(".json")
    previous = json.loads(json_path.read_text()) if json_path.exists() else {"runs": []}
    rows = []
    # written after every stack, so that a call cut off by the device's time limit keeps the rows it took
    previous["runs"].append({"date": str(datetime.date.today()), "versions": _versions(), "commit": _commit(),
                             "command": " ".join(sys.argv), "rows": rows})
    for shape in args.shapes.split(","):
        for stack in args.stacks.split(","):
            command = [sys.executable, __file__, "--worker", "--stack", stack, "--shape", shape, "--recipes",
                       args.recipes, "--steps", str(args.steps), "--warmup", str(args.warmup), "--out", args.out]
            if args.profile_step is not None:
                command += ["--profile-step", str(args.profile_step)]
            done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ))
            found = [json.loads(line[4:]) for line in done.stdout.splitlines() if line.startswith("ROW ")]
            if not found:
                found = [{"stack": stack, "shape": shape, "recipe": r,
                          "error": f"process exited {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"}
                         for r in args.recipes.split(",")]
            for row in found:
                print(json.dumps({k: v for k, v in row.items() if k not in ("step_s", "tokens")}), flush=True)
            (out.parent / f"{out.name}-{stack}-{shape}.log").write_text(done.stdout[-20000:] + done.stderr[-20000:])
            rows += found
            json_path.write_text(json.dumps(previous, indent=1))
    render(json_path, out.with_suffix(".md"), args.readme)


def _runs_lines(runs) -> list[str]:
    """Each distinct (date, versions, commit) once, with the commands run under it."""
    groups = {}
    for run in runs:
        groups.setdefault((run["date"], run["versions"], run["commit"]), []).append(run["command"])
    return [f"Measured {date} on {versions}, commit {commit}: " + "; ".join(f"`{c}`" for c in commands)
            for (date, versions, commit), commands in groups.items()]


README_BEGIN, README_END = "<!-- recipes:begin (bench/recipes.py --render) -->", "<!-- recipes:end -->"


def _device(run) -> str:
    return run["versions"].split(",")[0]


def _device_table(runs, device: str) -> list[str]:
    """The table of the latest row of each (recipe, shape, stack) measured on `device`, with the runs it
    draws on: ratios only between rows of one GPU."""
    latest, sources = {}, {}
    for i, run in enumerate(runs):
        if _device(run) != device:
            continue
        for r in run["rows"]:
            latest[(r["recipe"], r["shape"], r["stack"])] = dict(r, commit=run["commit"], date=run["date"])
            sources[(r["recipe"], r["shape"], r["stack"])] = i
    used = sorted(set(sources.values()))
    lines = table(list(latest.values()))
    notes = [CROSS_RUN_NOTE] if any(CROSS_RUN_MARK in line for line in lines) else []
    return [*lines, "",
            "tokens/s: the median step's (the mean's) over the steps after the warm-up; ratios from the medians.",
            *notes, *_candidate_lines(runs, device), *_runs_lines([runs[i] for i in used])]


def _candidate_lines(runs, device: str) -> list[str]:
    """The latest qlora_fast:CANDIDATE rows on `device`, each against the default and unsloth of its own run."""
    latest = {}
    for run in runs:
        if _device(run) != device:
            continue
        by = {(r["recipe"], r["shape"], r["stack"]): r for r in run["rows"] if "error" not in r}
        for (recipe, shape, stack), r in by.items():
            if ":" in stack:
                ratios = [f"{r['tokens_per_s_median'] / by[(recipe, shape, other)]['tokens_per_s_median']:.3f}x {other}"
                          for other in ("qlora_fast", "unsloth") if (recipe, shape, other) in by]
                latest[(recipe, shape, stack)] = (f"{recipe} {shape} `{stack}` {r['tokens_per_s_median']:.0f} tok/s "
                                                  f"({', '.join(ratios) or 'alone in its run'}; {run['commit']}, "
                                                  f"{run['date']})")
    return ["Launch candidates timed beside the default in one run (not in the table): " + "; ".join(latest.values())
            ] if latest else []


def render(json_path: Path, md_path: Path, readme: str | None = None) -> None:
    """One table per GPU (the latest run's GPU first) into md_path; the latest run's GPU's table between
    README's markers when `readme` is given."""
    runs = json.loads(json_path.read_text())["runs"]
    devices = list(dict.fromkeys(_device(run) for run in reversed(runs)))
    sections = [[f"## {device}", "", *_device_table(runs, device), ""] for device in devices]
    md_path.write_text("# Recipe matrix\n\n" + "\n".join(line for s in sections for line in s))
    text = "\n".join(_device_table(runs, devices[0]))
    if len(devices) > 1:
        text += f"\n\nEarlier measurements on {', '.join(devices[1:])}: bench/recipes.md."
    text += "\n"
    print(text)
    if readme:
        page = Path(readme).read_text()
        start, end = page.index(README_BEGIN) + len(README_BEGIN), page.index(README_END)
        Path(readme).write_text(page[:start] + "\n" + text + page[end:])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="recipes")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--shapes", default="llama-3-8b")
    parser.add_argument("--stacks", default="stock,qlora_fast,unsloth")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--profile-step", type=int, help="profile this step (1-based) of each row; untimed")
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--stack")
    parser.add_argument("--shape")
    parser.add_argument("--render", action="store_true", help="only rewrite OUT.md (and --readme) from OUT.json")
    parser.add_argument("--readme", help="README whose recipe table (between its markers) to rewrite")
    args = parser.parse_args()
    if args.render:
        render(Path(args.out).with_suffix(".json"), Path(args.out).with_suffix(".md"), args.readme)
    else:
        worker(args) if args.worker else driver(args)


if __name__ == "__main__":
    main()
