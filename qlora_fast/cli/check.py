"""`qlora-fast verify CONFIG` and `qlora-fast compare CONFIG`: the config's model, adapter and data, stock
against patched, through the harness."""

from pathlib import Path

import torch

from ..harness.compare import Comparison, compare_stock_and_patched
from ..harness.report import write_report
from ..harness.run import packed_token_batches, token_batches
from ..harness.verify import VerifyReport, verify
from .config import patch_options
from .train import build_peft_model


def _model_and_batches(cfg, steps: int):
    """The config's 4-bit model with its adapter (checkpointing as configured), `steps` batches of its
    data (padding-free rows when the config packs), and its compute dtype and bf16/fp16 flags."""
    setup = build_peft_model(cfg)
    model = setup.model
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    make_batches = packed_token_batches if cfg.packing else token_batches
    batches = make_batches(setup.train_data, setup.tokenizer, cfg.micro_batch_size, cfg.sequence_len, steps)
    return model, batches, setup.compute_dtype, setup.bf16 or setup.fp16


def verify_config(cfg, steps: int = 2) -> VerifyReport:
    """`qlora-fast verify CONFIG`: stock against patched on the config's model and data, the forward under
    autocast where training would run it so (bf16/fp16); prints the per-matrix table and the verdict."""
    model, batches, compute_dtype, mixed = _model_and_batches(cfg, steps)
    result = verify(model, batches, compute_dtype, autocast_dtype=compute_dtype if mixed else None,
                    seed=cfg.seed, **patch_options(cfg))
    print(result.table())
    print(result.verdict(), flush=True)
    return result


def compare_config(cfg, steps: int = 8, out_dir: str | None = None, timing_rounds: int = 0) -> Comparison:
    model, batches, compute_dtype, _ = _model_and_batches(cfg, steps)
    result = compare_stock_and_patched(model, batches, compute_dtype, lr=cfg.learning_rate, seed=cfg.seed,
                                       timing_rounds=timing_rounds, **patch_options(cfg))
    out = write_report(result, out_dir or str(Path(cfg.output_dir) / "compare"), cfg.base_model)
    print(f"{'PASS' if result.passed else 'FAIL'}: max rel loss diff {result.max_rel_loss_diff:.2e}, "
          f"speedup {result.speedup:.2f}x; report in {out}", flush=True)
    if not torch.cuda.is_available():
        print("note: this ran on the CPU, where the kernels run in Triton's interpreter: the speed figures say "
              "nothing about a GPU, the parity figures hold", flush=True)
    return result
