"""`qlora-fast train`: QLoRA supervised fine-tuning on TRL's SFTTrainer, patched by patch_model."""

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from ..harness.models import RANDOM_PREFIX, byte_tokenizer, quantize_to_nf4_, random_causal_lm
from ..patch import patch_model
from .config import ConfigError, TrainConfig, config_to_dict, patch_options
from .data import load_training_data

RESOLVED_CONFIG = "qlora_fast_config.yaml"


def precision(cfg: TrainConfig) -> tuple[torch.dtype, bool, bool]:
    """(compute dtype, bf16, fp16) with 'auto' resolved for this machine."""
    cuda = torch.cuda.is_available()
    bf16 = cfg.bf16 if cfg.bf16 != "auto" else (cuda and torch.cuda.is_bf16_supported() and not cfg.fp16)
    if cfg.bnb_4bit_compute_dtype != "auto":
        compute = getattr(torch, cfg.bnb_4bit_compute_dtype)
    else:
        compute = torch.bfloat16 if bf16 else torch.float16 if cfg.fp16 else torch.float32
    return compute, bool(bf16), cfg.fp16


def _device_map():
    if not torch.cuda.is_available():
        return {"": "cpu"}
    return {"": int(os.environ.get("LOCAL_RANK", 0))}


def _quant_storage(cfg: TrainConfig) -> torch.dtype:
    return getattr(torch, cfg.bnb_4bit_quant_storage)


def load_base_model(cfg: TrainConfig, compute_dtype: torch.dtype):
    """The 4-bit base model and its tokenizer (load_tokenizer's, loaded and checked first);
    `random:<shape>` builds a random-init model offline."""
    tokenizer = load_tokenizer(cfg)
    return _base_model(cfg, compute_dtype), tokenizer


def load_tokenizer(cfg: TrainConfig):
    """The base model's tokenizer (or `tokenizer`'s; the byte tokenizer for random:<shape>) with the config's
    special_tokens and a pad token, checked against the datasets: chat ones need its chat template."""
    if cfg.base_model.startswith(RANDOM_PREFIX):
        tokenizer = byte_tokenizer()
    else:
        _check_reachable(cfg.base_model)
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.base_model,
                                                      trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"cannot load the tokenizer of {cfg.tokenizer or cfg.base_model!r}: {exc}") from None
    _set_special_tokens(tokenizer, cfg.special_tokens or {})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if any(d.type == "chat" for d in cfg.datasets) and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"the chat datasets need a chat template, and the tokenizer of "
                          f"{cfg.tokenizer or cfg.base_model!r} has none (named templates such as chat_template: "
                          "chatml are not shipped here): set tokenizer to one that has it (the model's "
                          "-Instruct / -it release), or give the datasets as prompt_completion or text")
    return tokenizer


def _set_special_tokens(tokenizer, tokens: dict) -> None:
    """Names tokens the tokenizer already has as its special ones (pad_token: ...). A new token would need
    a new embedding row, which a QLoRA run leaves untrained: refused."""
    vocab = tokenizer.get_vocab()
    for name, token in tokens.items():
        if token not in vocab:
            raise ConfigError(f"special_tokens.{name} {token!r} is not in the tokenizer's vocabulary, and a new "
                              "token's embedding would stay untrained here; use a token it has (its eos_token is "
                              f"{tokenizer.eos_token!r})")
        setattr(tokenizer, name, token)


def _base_model(cfg: TrainConfig, compute_dtype: torch.dtype):
    if cfg.base_model.startswith(RANDOM_PREFIX):
        device = _device_map()[""]
        try:
            model = random_causal_lm(cfg.base_model.removeprefix(RANDOM_PREFIX), compute_dtype,
                                     f"cuda:{device}" if isinstance(device, int) else device, seed=cfg.seed)
        except ValueError as exc:
            raise ConfigError(f"base_model: {exc}") from None
        if cfg.load_in_4bit:
            quantize_to_nf4_(model, compute_dtype, nested=cfg.bnb_4bit_use_double_quant,
                             quant_storage=_quant_storage(cfg))
        return model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = None
    if cfg.load_in_4bit:
        storage = _quant_storage(cfg)
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
                                   bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant,
                                   bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=storage)
    try:
        return AutoModelForCausalLM.from_pretrained(
            cfg.base_model, quantization_config=quant, dtype=compute_dtype, trust_remote_code=cfg.trust_remote_code,
            device_map=None if cfg.distributed == "fsdp" else _device_map())
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"cannot load base_model {cfg.base_model!r} as a causal LM: {exc}") from None


def _looks_like_path(name: str) -> bool:
    """Not a hub name (`org/model`): absolute, relative, home or Windows paths, or more than one `/`."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or "\\" in name


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connection to the hub's host, instead of huggingface_hub's retries (~50 s offline)."""
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _check_reachable(base_model: str) -> None:
    """A local model directory exists; a hub name is in the local cache or the hub answers."""
    if Path(base_model).expanduser().is_dir():
        return
    if _looks_like_path(base_model):
        raise ConfigError(f"base_model {base_model!r} is not a directory here; give the path of a saved model "
                          "(config.json and weights) or a hub name like meta-llama/Llama-3.2-1B")
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.constants import HF_HUB_OFFLINE

    cached = isinstance(try_to_load_from_cache(base_model, "config.json"), str)
    if not cached and not HF_HUB_OFFLINE and not _hub_reachable():
        raise ConfigError(f"base_model {base_model!r} is not a local directory, not in the hub cache, and the hub "
                          "cannot be reached from here; download it where there is network (`hf download "
                          f"{base_model}`) or set base_model to a local directory")


def unmatched_targets(model, targets) -> list[str]:
    """The names in a list of lora_target_modules that match no module (peft's rule: the module's name or
    its last dotted parts), which peft passes over in silence once another name matches."""
    if isinstance(targets, str):
        return []
    names = [name for name, _ in model.named_modules()]
    return [t for t in targets if not any(name == t or name.endswith(f".{t}") for name in names)]


def add_adapter(cfg: TrainConfig, model):
    from peft import LoraConfig, get_peft_model

    targets = cfg.lora_target_modules
    unmatched = unmatched_targets(model, targets)
    if unmatched and len(unmatched) < len(targets):
        print(f"qlora-fast: lora_target_modules {unmatched} match no module of {cfg.base_model!r} and get no "
              "adapter; check their spelling, or use all-linear", file=sys.stderr, flush=True)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:  # e.g. target modules not found in the model
        raise ConfigError(f"lora_target_modules {targets!r} do not fit {cfg.base_model!r}: {exc}") from None


def _every(steps, per_epoch: int | None, cfg: TrainConfig) -> tuple[str, float]:
    """(strategy, steps) for Trainer to act every `steps` steps, or `per_epoch` times an epoch: a fraction of
    the run's steps (Trainer reads steps below 1 so), or at each epoch's end where that is as often."""
    if per_epoch is None:
        return "steps", steps
    times = per_epoch * cfg.num_epochs
    return ("steps", 1 / times) if times > 1 else ("epoch", steps)


def sft_arguments(cfg: TrainConfig, bf16: bool, fp16: bool, has_eval: bool, record_kind: set):
    from trl import SFTConfig

    eval_strategy, eval_steps = _every(cfg.eval_steps or cfg.logging_steps, cfg.evals_per_epoch, cfg)
    save_strategy, save_steps = _every(cfg.save_steps or 500, cfg.saves_per_epoch, cfg)
    saves = bool(cfg.save_steps or cfg.saves_per_epoch)
    return SFTConfig(
        output_dir=cfg.output_dir, per_device_train_batch_size=cfg.micro_batch_size,
        per_device_eval_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps, learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio or cfg.warmup_steps, optim=cfg.optimizer, weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm, bf16=bf16, fp16=fp16, seed=cfg.seed, data_seed=cfg.seed,
        gradient_checkpointing=bool(cfg.gradient_checkpointing),
        gradient_checkpointing_kwargs={"use_reentrant": False}, activation_offloading=cfg.activation_offloading,
        logging_steps=cfg.logging_steps,
        eval_strategy=eval_strategy if has_eval else "no", eval_steps=eval_steps,
        save_strategy=save_strategy if saves else "no", save_steps=save_steps, save_total_limit=cfg.save_total_limit,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        tf32=cfg.tf32 if torch.cuda.is_available() else None,
        max_length=cfg.sequence_len, packing=cfg.packing,
        completion_only_loss=not cfg.train_on_inputs if "prompt" in record_kind else None,
        report_to="none", use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=False if cfg.distributed == "ddp" else None,
        **_fsdp_arguments(cfg),
    )


def _fsdp_mixed_precision(trainer, cfg: TrainConfig) -> None:
    """Weights gathered in the 4-bit storage dtype (as transformers sets for hub QLoRA models), gradients
    reduced in fp32 and outputs (the loss) left as computed; accelerate's default for bf16 would reduce
    the LoRA gradients and return the loss in bf16."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    trainer.accelerator.state.fsdp_plugin.mixed_precision_policy = MixedPrecisionPolicy(
        param_dtype=_quant_storage(cfg), reduce_dtype=torch.float32)


def _fsdp_arguments(cfg: TrainConfig) -> dict:
    """FSDP2 sharding whole decoder layers (adapters included: FSDP2 leaves the wrap policy alone, where
    FSDP1 would take peft's, which wraps adapters apart), so that inside a layer's forward every weight
    the fused path reads is gathered; the 4-bit weights shard as their floating-point storage."""
    if cfg.distributed != "fsdp":
        return {}
    return {"fsdp": True,
            "fsdp_config": {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                            "reshard_after_forward": True, "cpu_ram_efficient_loading": False,
                            "state_dict_type": "FULL_STATE_DICT"}}


def _single_process_single_gpu(args):
    """Without a launcher, train on one GPU: Trainer would wrap the model in nn.DataParallel, which neither
    4-bit models nor TRL support. Data parallel goes through torchrun / accelerate launch."""
    if "LOCAL_RANK" not in os.environ and torch.cuda.device_count() > 1:
        args._n_gpu = 1
        print(f"qlora-fast: {torch.cuda.device_count()} GPUs visible to one process: training on GPU 0; launch with "
              "torchrun or accelerate launch (distributed: ddp) to use them all", flush=True)


WARMUP_LOGS = 2  # logged steps that pay Triton's compilation and autotuning, left out of the throughput


def _throughput_callback():
    """Records (time, tokens seen) at every logged training step, for tokens/s after warm-up."""
    from transformers import TrainerCallback

    class ThroughputCallback(TrainerCallback):
        def __init__(self):
            self.points = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and logs.get("num_tokens") is not None:
                self.points.append((time.perf_counter(), float(logs["num_tokens"])))

        def tokens_per_second(self):
            if len(self.points) <= WARMUP_LOGS + 1:
                return None
            (t0, n0), (t1, n1) = self.points[WARMUP_LOGS], self.points[-1]
            return (n1 - n0) / (t1 - t0)

    return ThroughputCallback()


@dataclass
class PeftSetup:
    train_data: object
    eval_data: object
    model: torch.nn.Module
    tokenizer: object
    compute_dtype: torch.dtype
    bf16: bool
    fp16: bool


def build_peft_model(cfg: TrainConfig) -> PeftSetup:
    """What train, compare and verify share: the data loaded and checked first (a mistake there costs no
    model load), the precision, the 4-bit base model and its LoRA adapter."""
    train_data, eval_data = load_training_data(cfg)
    compute_dtype, bf16, fp16 = precision(cfg)
    model, tokenizer = load_base_model(cfg, compute_dtype)
    return PeftSetup(train_data, eval_data, add_adapter(cfg, model), tokenizer, compute_dtype, bf16, fp16)


def _check_truncation_kept_examples(cfg: TrainConfig, given, prepared, name: str) -> None:
    """TRL truncates unpacked examples to sequence_len and drops those left without a token in the loss (a
    prompt that fills sequence_len): none left is refused, as the trainer would fail on an empty dataset;
    some dropped are counted in one line."""
    if given is None or prepared is None or len(prepared) == len(given):
        return
    if len(prepared) == 0:
        raise ConfigError(f"no {name} example has a completion token within sequence_len ({cfg.sequence_len} "
                          "tokens; the prompts fill it): raise sequence_len, or set train_on_inputs: true")
    print(f"qlora-fast: {len(given) - len(prepared)} of {len(given)} {name} examples have no completion token "
          f"within sequence_len ({cfg.sequence_len}) and are left out", file=sys.stderr, flush=True)


def build_trainer(cfg: TrainConfig):
    """Everything up to the first step: data checked first, then model, adapter, patch and trainer."""
    from trl import SFTTrainer

    if cfg.activation_offloading and not torch.cuda.is_available():
        raise ConfigError("activation_offloading moves activations from the GPU to the CPU: it needs a GPU")
    if cfg.distributed == "fsdp" and not torch.cuda.is_available():
        raise ConfigError("distributed: fsdp shards the model over GPUs and needs them; on CPU use distributed: ddp")
    setup = build_peft_model(cfg)
    args = sft_arguments(cfg, setup.bf16, setup.fp16, setup.eval_data is not None, set(setup.train_data.column_names))
    _single_process_single_gpu(args)
    trainer = SFTTrainer(model=setup.model, args=args, train_dataset=setup.train_data, eval_dataset=setup.eval_data,
                         processing_class=setup.tokenizer, callbacks=[_throughput_callback()])
    if not cfg.packing:
        _check_truncation_kept_examples(cfg, setup.train_data, trainer.train_dataset, "training")
        _check_truncation_kept_examples(cfg, setup.eval_data, trainer.eval_dataset, "evaluation")
    if cfg.distributed == "fsdp":
        _fsdp_mixed_precision(trainer, cfg)
    if cfg.patch:
        print(patch_model(trainer.model, **patch_options(cfg)).summary(), flush=True)
    return trainer


def _throughput(trainer):
    timers = [c for c in trainer.callback_handler.callbacks if hasattr(c, "tokens_per_second")]
    return timers[0].tokens_per_second() if timers else None


# The last barrier's work, kept to the end of the process: gloo's worker thread must not be the one to free
# it. Freeing it frees the collectives before it, whose tensors are Python's, so that thread takes the GIL;
# meanwhile the main thread, holding the GIL, frees DDP's reducer and with it the process group, whose
# destructor joins that thread: a deadlock at exit, after the run has finished and saved.
_FINAL_BARRIER: list = []


def _leave_process_group() -> None:
    """Under torchrun: every rank waits for rank 0's files, then leaves the process group. A rank that exits
    with it still open can abort in gloo's teardown (SIGABRT after a finished run), failing the launch."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        work = torch.distributed.barrier(async_op=True)
        work.wait()
        _FINAL_BARRIER.append(work)
        torch.distributed.destroy_process_group()


def train(cfg: TrainConfig) -> Path:
    trainer = build_trainer(cfg)
    resume = cfg.resume_from_checkpoint
    result = trainer.train(resume_from_checkpoint=resume)
    out = Path(cfg.output_dir)
    trainer.save_model(str(out))
    if trainer.is_world_process_zero():
        trainer.processing_class.save_pretrained(str(out))
        (out / RESOLVED_CONFIG).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        history = [h for h in trainer.state.log_history if "loss" in h]
        summary = {"train_loss": result.training_loss, "steps": result.global_step,
                   "first_logged_loss": history[0]["loss"] if history else None,
                   "last_logged_loss": history[-1]["loss"] if history else None,
                   "logged_losses": [h["loss"] for h in history],
                   "world_size": trainer.args.world_size,
                   "num_tokens": history[-1].get("num_tokens") if history else None,
                   "runtime_s": result.metrics.get("train_runtime"),
                   "tokens_per_second_after_warmup": _throughput(trainer),
                   "peak_gpu_memory_gib": (torch.cuda.max_memory_allocated() / 2**30
                                           if torch.cuda.is_available() else None)}
        (out / "train_summary.json").write_text(json.dumps(summary, indent=1))
        print(f"saved the LoRA adapter and {RESOLVED_CONFIG} to {out}", flush=True)
    _leave_process_group()
    return out
