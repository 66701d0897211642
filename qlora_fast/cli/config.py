"""YAML training configs in the axolotl style, validated in full before any model is loaded."""

import difflib
import re
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config problem, phrased for the user: which key, what is wrong, how to fix it."""


DATASET_TYPES = {"text", "prompt_completion", "chat", "alpaca"}
DATASET_TYPE_ALIASES = {"messages": "chat", "conversation": "chat", "chat_template": "chat", "completion": "text"}
DATASET_KEY_ALIASES = {"field_messages": "messages_column", "field": "text_column"}  # axolotl's spellings
ALPACA_COLUMNS = ("instruction", "output")  # and "input", where a record has one
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class DatasetSpec:
    path: str
    type: str = "text"
    split: str = "train"
    name: str | None = None  # a hub dataset's subset
    text_column: str = "text"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    messages_column: str = "messages"
    # axolotl's chat_template entries: turn keys renamed ({role: from, content: value}, ShareGPT's), system
    # turns dropped
    message_property_mappings: dict | None = None
    drop_system_message: bool = False

    def required_columns(self) -> list[str]:
        return {"text": [self.text_column], "prompt_completion": [self.prompt_column, self.completion_column],
                "chat": [self.messages_column], "alpaca": list(ALPACA_COLUMNS)}[self.type]


@dataclass
class TrainConfig:
    base_model: str
    datasets: list = field(default_factory=list)
    output_dir: str = "outputs/qlora"
    tokenizer: str | None = None
    trust_remote_code: bool = False  # run the checkpoint's own modeling / tokenizer code (hub models that need it)
    # quantization
    load_in_4bit: bool = True
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: str = "auto"  # auto: bfloat16 where the GPU has it, else float16 / float32 on CPU
    bnb_4bit_quant_storage: str = "uint8"
    # adapter
    adapter: str = "qlora"
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: Any = "all-linear"
    # data
    sequence_len: int = 2048
    packing: bool = False
    train_on_inputs: bool = False  # False: loss on completions / the last assistant turn only
    val_set_size: float = 0.0
    # optimisation
    micro_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    num_epochs: float = 1.0
    max_steps: int = -1
    learning_rate: float = 2e-4
    lr_scheduler: str = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    optimizer: str = "adamw_torch_fused"  # transformers' own default: one fused kernel, not a foreach chain
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    bf16: Any = "auto"
    fp16: bool = False
    # true | false | offload. Patched, true keeps the checkpointed layers' inputs on the host in
    # single-process runs; offload does so in distributed runs too.
    gradient_checkpointing: Any = True
    activation_offloading: bool = False  # TRL's: saved activations to CPU, asynchronously (GPU only)
    seed: int = 42
    # bookkeeping
    logging_steps: int = 1
    eval_steps: int | None = None
    save_steps: int | None = None
    save_total_limit: int | None = None  # checkpoints kept, the oldest deleted first
    resume_from_checkpoint: Any = None
    patch: bool = True
    # patch_model's options, each on by default (patched runs only)
    fused_mlp: bool = True
    fused_qkv: bool = True
    rope_kernel: bool = True
    rms_norm_kernel: bool = True
    add_norm_kernel: bool = True  # each residual add inside the RMSNorm after it
    chunked_loss: bool = True
    bf16_frozen_weights: bool = True  # frozen fp32 embedding/head holding only bf16 values, held in bf16
    packed_attention: bool = True  # packed rows (packing: true) attend within each sequence
    keep_attention_outputs: bool = True  # with offloaded checkpoints: q/k/v, o and attention outputs not recomputed
    parameter_count: bool = True  # num_parameters and parameters() (Trainer's per-step walks) in one walk each
    distributed: str = "none"  # none | ddp | fsdp (launch with `accelerate launch`)
    # axolotl's further keys
    evals_per_epoch: int | None = None  # instead of eval_steps, when training by epochs
    saves_per_epoch: int | None = None  # instead of save_steps, likewise
    group_by_length: bool = False  # batches of similar lengths (transformers' group_by_length sampler)
    tf32: bool | None = None  # TF32 matmuls for what runs in fp32 (GPU only)
    special_tokens: dict | None = None  # e.g. {pad_token: "<|end_of_text|>"}: tokens the tokenizer already has
    source: str | None = field(default=None, repr=False)  # the YAML file read, for relative paths
    ignored: dict = field(default_factory=dict, repr=False)  # keys read and ignored -> why (IGNORED_KEYS)


ALIASES = {  # other spellings users bring from axolotl / transformers
    "sample_packing": "packing", "lr_scheduler_type": "lr_scheduler", "optim": "optimizer",
    "epochs": "num_epochs", "max_seq_length": "sequence_len",
    "lora_mlp_kernel": "fused_mlp", "lora_qkv_kernel": "fused_qkv", "liger_rope": "rope_kernel",
    "liger_rms_norm": "rms_norm_kernel", "liger_fused_linear_cross_entropy": "chunked_loss",
}
# axolotl keys that change nothing here, whatever their value: read, named once in one line, and ignored
_FROM_CHECKPOINT = "the model and tokenizer classes come from the checkpoint"
_ATTENTION = "qlora_fast picks the attention kernel: sdpa, and a varlen kernel for packed rows"
_LOGGING = "logs go to the console and train_summary.json"
_NO_WATCHDOG = "no loss watchdog stops a run here"
_TEMPLATE = "conversations are formatted, and their turns masked, by the tokenizer's own chat template"
IGNORED_KEYS = {
    "model_type": _FROM_CHECKPOINT, "tokenizer_type": _FROM_CHECKPOINT, "is_llama_derived_model": _FROM_CHECKPOINT,
    "is_mistral_derived_model": _FROM_CHECKPOINT, "is_qwen_derived_model": _FROM_CHECKPOINT,
    "strict": "every key is checked here", "flash_attention": _ATTENTION, "sdp_attention": _ATTENTION,
    "xformers_attention": _ATTENTION, "flex_attention": _ATTENTION, "attn_implementation": _ATTENTION,
    "chat_template": _TEMPLATE, "eot_tokens": _TEMPLATE,
    "eval_sample_packing": "evaluation batches are built as training's are",
    "ddp_find_unused_parameters": "qlora_fast sets it for distributed: ddp",
    "pad_to_sequence_len": "batches are padded to their longest row, or packed",
    "dataset_prepared_path": "TRL tokenizes the datasets in memory", "local_rank": "the launcher sets it",
    "debug": _LOGGING, "wandb_project": _LOGGING, "wandb_entity": _LOGGING, "wandb_watch": _LOGGING,
    "wandb_name": _LOGGING, "wandb_log_model": _LOGGING, "eval_table_size": _LOGGING,
    "eval_table_max_new_tokens": _LOGGING,
    "loss_watchdog_threshold": _NO_WATCHDOG, "loss_watchdog_patience": _NO_WATCHDOG,
}
# axolotl keys whose unset or false value (or the value given here) is what runs here; any other value is
# refused with its fix
RUNS_HERE = {
    "load_in_8bit": (False, "qlora_fast trains 4-bit bases (load_in_4bit: true) or unquantized ones (adapter: lora)"),
    "lora_fan_in_fan_out": (False, "it is for GPT-2-style Conv1D layers; the models here have Linear layers"),
    "lora_model_dir": (None, "starting from a saved adapter is not supported; resume a run with "
                             "resume_from_checkpoint"),
    "deepspeed": (None, "use distributed: ddp or fsdp"), "fsdp": (None, "use distributed: fsdp"),
    "fsdp_config": (None, "use distributed: fsdp"),
    "early_stopping_patience": (None, "early stopping is not supported; set max_steps or num_epochs"),
    "unfrozen_parameters": (None, "only the LoRA adapters train here"),
    "gradient_checkpointing_kwargs": ({"use_reentrant": False}, "checkpointing here is non-reentrant "
                                      "(use_reentrant: false)"),
}
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
SCHEDULERS = {"cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial",
              "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay"}
OPTIMIZERS = {"adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit",
              "adamw_bnb_8bit", "sgd", "adafactor", "lion_8bit", "paged_lion_8bit"}
DTYPES = {"bfloat16", "float16", "float32", "auto"}


def _did_you_mean(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check_type(key: str, value, expected):
    ok = {
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "bool": lambda v: isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
    }
    if expected in ok and not ok[expected](value):
        raise ConfigError(f"config key '{key}' must be {'an' if expected == 'int' else 'a'} {expected}, "
                          f"got {value!r} ({type(value).__name__})")


# YAML 1.1 (PyYAML) reads 2e-4 as a string (its floats need a dot); axolotl's configs and YAML 1.2 mean a number
_FLOAT_SPELLING = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _as_float(value):
    """value, or the float a scientific-notation string spells (learning_rate: 2e-4)."""
    return float(value) if isinstance(value, str) and _FLOAT_SPELLING.fullmatch(value.strip()) else value


def _type_name(f) -> str | None:
    """The plain type a config field holds (int, float, bool, str), looking through `X | None`."""
    candidates = [t for t in (typing.get_args(f.type) or (f.type,)) if t is not type(None)]
    name = getattr(candidates[0], "__name__", "") if len(candidates) == 1 else ""
    return name if name in ("int", "float", "bool", "str") else None


def _parse_dataset(i: int, raw, base_dir: Path) -> DatasetSpec:
    where = f"datasets[{i}]"
    if isinstance(raw, str):
        raw = {"path": raw}
    if isinstance(raw, dict):
        raw = {DATASET_KEY_ALIASES.get(key, key): value for key, value in raw.items() if value is not None}
    if not isinstance(raw, dict) or "path" not in raw:
        raise ConfigError(f"{where} needs a 'path' (a local JSONL/JSON/parquet/CSV file or a hub dataset name)")
    known = {f.name for f in fields(DatasetSpec)}
    for key in raw:
        if key not in known:
            raise ConfigError(f"unknown key '{key}' in {where}{_did_you_mean(key, known)}; "
                              f"known: {', '.join(sorted(known))}")
    structured = {"message_property_mappings", "drop_system_message"}  # kept as YAML gives them
    spec = DatasetSpec(**{k: (v if k in structured else str(v)) for k, v in raw.items()})
    mappings = spec.message_property_mappings
    if mappings is not None and not (isinstance(mappings, dict) and set(mappings) <= {"role", "content"}
                                     and all(isinstance(v, str) for v in mappings.values())):
        raise ConfigError(f"{where}.message_property_mappings maps role and content to the keys a turn uses, "
                          "e.g. {role: from, content: value}")
    if not isinstance(spec.drop_system_message, bool):
        raise ConfigError(f"{where}.drop_system_message must be true or false")
    if spec.type == "sharegpt":  # axolotl's older type: ShareGPT's conversations of from/value turns
        spec.type = "chat"
        spec.messages_column = raw.get("messages_column", "conversations")
        spec.message_property_mappings = mappings or {"role": "from", "content": "value"}
    spec.type = DATASET_TYPE_ALIASES.get(spec.type, spec.type)
    if spec.type not in DATASET_TYPES:
        raise ConfigError(f"{where}.type is {raw['type']!r}; use one of: text, prompt_completion, chat (messages), "
                          "alpaca, sharegpt")
    local = Path(spec.path) if Path(spec.path).is_absolute() else base_dir / spec.path
    looks_local = Path(spec.path).suffix in LOCAL_FORMATS or spec.path.startswith((".", "/"))
    if looks_local:
        if not local.is_file():
            raise ConfigError(f"{where}.path: no such file: {local}")
        spec.path = str(local.resolve())
    return spec


def _canonical_keys(raw: dict) -> dict:
    """raw with each other spelling (ALIASES) under our key."""
    return {ALIASES.get(key, key): value for key, value in raw.items()}


def parse_config(raw: dict, source: str | None = None) -> TrainConfig:
    if not isinstance(raw, dict):
        raise ConfigError("the config must be a YAML mapping of keys to values")
    # a key left empty is unset, as in axolotl's configs (`fp16:`, `lora_target_modules:`): its default holds
    raw = {key: value for key, value in _canonical_keys(raw).items() if value is not None}
    if raw.pop("lora_target_linear", None):
        raw.setdefault("lora_target_modules", "all-linear")
    ignored = {key: IGNORED_KEYS[key] for key in raw if key in IGNORED_KEYS}
    for key in [key for key in raw if key in RUNS_HERE]:
        value, (runs_here, why) = raw.pop(key), RUNS_HERE[key]
        if value and value != runs_here:
            raise ConfigError(f"config key '{key}' is set to {value!r}, which qlora_fast does not do: {why}")
    raw = {key: value for key, value in raw.items() if key not in ignored}
    known = {f.name: f for f in fields(TrainConfig) if f.name not in ("source", "ignored")}
    for key in raw:
        if key not in known:
            raise ConfigError(f"unknown config key '{key}'{_did_you_mean(key, known)}")
    if "base_model" not in raw:
        raise ConfigError("config key 'base_model' is required (a hub name, a local path, or random:<shape>)")
    for key, value in raw.items():
        expected = _type_name(known[key])
        if expected == "float":
            raw[key] = value = _as_float(value)
        if expected:
            _check_type(key, value, expected)
    base_dir = Path(source).resolve().parent if source else Path.cwd()
    datasets = raw.pop("datasets", None)
    if not datasets or not isinstance(datasets, list):
        raise ConfigError("config key 'datasets' must be a non-empty list, e.g. [{path: data.jsonl, type: text}]")
    cfg = TrainConfig(**raw, source=source, ignored=ignored)
    cfg.datasets = [_parse_dataset(i, d, base_dir) for i, d in enumerate(datasets)]
    _check_values(cfg)
    return cfg


def _check_values(cfg: TrainConfig):
    def need(cond, msg):
        if not cond:
            raise ConfigError(msg)

    need(cfg.adapter in ("qlora", "lora"), f"adapter is {cfg.adapter!r}; qlora_fast trains 'qlora' (or 'lora')")
    need(cfg.bnb_4bit_quant_type in ("nf4", "fp4"), "bnb_4bit_quant_type must be nf4 or fp4")
    need(cfg.bnb_4bit_compute_dtype in DTYPES, f"bnb_4bit_compute_dtype must be one of {sorted(DTYPES)}")
    need(cfg.bnb_4bit_quant_storage in DTYPES - {"auto"} | {"uint8"},
         "bnb_4bit_quant_storage must be uint8, bfloat16, float16 or float32")
    need(cfg.lora_r > 0, "lora_r must be positive")
    need(0.0 <= cfg.lora_dropout < 1.0, "lora_dropout must be in [0, 1)")
    targets = cfg.lora_target_modules
    names = isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)
    need(targets == "all-linear" or names,
         "lora_target_modules must be 'all-linear' or a list of module names, e.g. [q_proj, v_proj]")
    need(cfg.sequence_len > 0 and cfg.micro_batch_size > 0 and cfg.gradient_accumulation_steps > 0,
         "sequence_len, micro_batch_size and gradient_accumulation_steps must be positive")
    need(cfg.max_steps > 0 or cfg.num_epochs > 0, "set num_epochs > 0 or max_steps > 0")
    need(cfg.learning_rate > 0, "learning_rate must be positive")
    need(cfg.lr_scheduler in SCHEDULERS, f"lr_scheduler {cfg.lr_scheduler!r} is not one of {sorted(SCHEDULERS)}"
         + _did_you_mean(cfg.lr_scheduler, SCHEDULERS))
    need(cfg.optimizer in OPTIMIZERS, f"optimizer {cfg.optimizer!r} is not one of {sorted(OPTIMIZERS)}"
         + _did_you_mean(cfg.optimizer, OPTIMIZERS))
    need(cfg.bf16 in (True, False, "auto"), "bf16 must be true, false or auto")
    need(cfg.gradient_checkpointing in (True, False, "offload"), "gradient_checkpointing must be true, false or offload")
    need(cfg.gradient_checkpointing != "offload" or cfg.patch,
         "gradient_checkpointing: offload is qlora_fast's offloaded checkpointing: it needs patch: true")
    need(not (cfg.bf16 is True and cfg.fp16), "bf16 and fp16 are both true: choose one")
    need(0.0 <= cfg.val_set_size < 1.0 or (float(cfg.val_set_size).is_integer() and cfg.val_set_size >= 1),
         "val_set_size must be a fraction in [0, 1) or a whole number of examples")
    need(cfg.distributed in ("none", "ddp", "fsdp"), "distributed must be none, ddp or fsdp")
    need(not (cfg.distributed == "fsdp" and cfg.bnb_4bit_quant_storage == "uint8"),
         "distributed: fsdp shards 4-bit weights only with bnb_4bit_quant_storage set to the compute dtype "
         "(e.g. bfloat16)")
    need(cfg.load_in_4bit or cfg.adapter == "lora", "load_in_4bit: false needs adapter: lora")
    need(cfg.logging_steps > 0, "logging_steps must be positive")
    for key, steps_key in (("evals_per_epoch", "eval_steps"), ("saves_per_epoch", "save_steps")):
        count = getattr(cfg, key)
        need(count is None or count > 0, f"{key} must be a positive whole number")
        need(count is None or getattr(cfg, steps_key) is None, f"{key} and {steps_key} are both set: keep one")
        need(count is None or cfg.max_steps <= 0,
             f"{key} counts per epoch, but max_steps sets the run's length; use {steps_key} with max_steps")
    tokens = cfg.special_tokens
    need(tokens is None or (isinstance(tokens, dict) and all(k in SPECIAL_TOKENS and isinstance(v, str)
                                                               for k, v in tokens.items())),
         f"special_tokens must map some of {', '.join(SPECIAL_TOKENS)} to token strings, e.g. "
         "{pad_token: '<|end_of_text|>'}")


def ignored_keys_line(cfg: TrainConfig) -> str | None:
    """One line naming the config keys read and ignored, grouped by why; None where there are none."""
    if not cfg.ignored:
        return None
    reasons: dict = {}
    for key, why in cfg.ignored.items():
        reasons.setdefault(why, []).append(key)
    return "ignored config keys that change nothing here: " + "; ".join(
        f"{', '.join(keys)} ({why})" for why, keys in reasons.items())


def load_config(path: str, overrides: dict | None = None) -> TrainConfig:
    """The config in the YAML file at `path`, with `overrides` (key -> value, any spelling) replacing its keys."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if overrides and isinstance(raw, dict):
        raw = {**_canonical_keys(raw), **_canonical_keys(overrides)}
    return parse_config(raw, source=str(p))


def override_takes_next(args: list[str], i: int) -> bool:
    """Whether the override args[i], written without `=value`, takes args[i + 1] as its value: there is one,
    and it is no --key."""
    return "=" not in args[i] and i + 1 < len(args) and not args[i + 1].startswith("--")


def parse_overrides(args: list[str]) -> dict:
    """Config keys given on the command line, as axolotl takes them: `--key value` or `--key=value` (dashes in
    the key read as underscores), each value read as YAML (numbers, true/false, [a, b])."""
    overrides, i = {}, 0
    while i < len(args):
        arg, takes_next = args[i], override_takes_next(args, i)
        key, has_value, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not key or not (has_value or takes_next):
            raise ConfigError(f"cannot read {arg!r} as a config override: write --key value (e.g. --learning_rate 1e-4)")
        if takes_next:
            value = args[i + 1]
        i += 1 + takes_next
        try:
            overrides[key.replace("-", "_")] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"the value of --{key} is not valid YAML: {value!r}") from None
    return overrides


def config_to_dict(cfg: TrainConfig) -> dict:
    out = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in ("source", "ignored")}
    out["datasets"] = [{k: v for k, v in vars(d).items() if v is not None} for d in cfg.datasets]
    return out


def patch_options(cfg: "TrainConfig") -> dict:
    """Every patch_model keyword argument for this config. gradient_checkpointing: offload keeps checkpoints
    on the host in every run; true leaves it to patch_model (offloaded in single-process runs)."""
    return {"fused_mlp": cfg.fused_mlp, "fused_qkv": cfg.fused_qkv, "rope": cfg.rope_kernel,
            "rms_norm": cfg.rms_norm_kernel, "add_norm": cfg.add_norm_kernel, "chunked_loss": cfg.chunked_loss,
            "bf16_frozen_weights": cfg.bf16_frozen_weights, "packed_attention": cfg.packed_attention,
            "offload_checkpoints": True if cfg.gradient_checkpointing == "offload" else None,
            "keep_attention_outputs": cfg.keep_attention_outputs, "parameter_count": cfg.parameter_count}
