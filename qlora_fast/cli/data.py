"""Datasets from the config, checked and shaped into the records TRL's SFTTrainer takes."""

from pathlib import Path

from .config import LOCAL_FORMATS, ConfigError, DatasetSpec, TrainConfig


def _load(spec: DatasetSpec):
    import datasets

    local = Path(spec.path).is_file()
    if local and Path(spec.path).stat().st_size == 0:
        raise ConfigError(f"dataset file {spec.path!r} is empty; point the datasets entry at a file with examples")
    try:
        if local:
            return datasets.load_dataset(LOCAL_FORMATS[Path(spec.path).suffix], data_files=spec.path,
                                         split=spec.split)
        return datasets.load_dataset(spec.path, spec.name, split=spec.split)
    except Exception as exc:  # noqa: BLE001  (datasets raises many kinds; the user gets one line either way)
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"cannot load dataset {spec.path!r} (split {spec.split!r}): {first_line}") from None


# Stanford Alpaca's prompts, which axolotl's `type: alpaca` uses too
ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_PROMPT_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                            "further context. Write a response that appropriately completes the request.\n\n"
                            "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


def _check_columns(spec: DatasetSpec, ds):
    for column in spec.required_columns():
        if column not in ds.column_names:
            if spec.type == "alpaca":
                fix = "Alpaca records have 'instruction' and 'output' (and 'input', which may be empty)."
            else:
                key = {spec.text_column: "text_column", spec.prompt_column: "prompt_column",
                       spec.completion_column: "completion_column", spec.messages_column: "messages_column"}[column]
                fix = f"Set '{key}' in its datasets entry to the right column."
            raise ConfigError(f"dataset {spec.path!r} (type {spec.type}) has no column '{column}'; it has "
                              f"{ds.column_names}. {fix}")


ROLE_SPELLINGS = {"human": "user", "gpt": "assistant"}  # ShareGPT's role names, as chat templates name them


def _turns(spec: DatasetSpec, turns: list) -> list:
    """A conversation's turns as chat templates take them: keys renamed by message_property_mappings (with
    ShareGPT's role names), system turns dropped where drop_system_message is set."""
    mapping = spec.message_property_mappings
    if mapping:
        role, content = mapping.get("role", "role"), mapping.get("content", "content")
        try:
            turns = [{"role": ROLE_SPELLINGS.get(t[role], t[role]), "content": t[content]} for t in turns]
        except (KeyError, TypeError):
            raise ConfigError(f"dataset {spec.path!r}: a turn has no key {role!r} or {content!r}; set "
                              "message_property_mappings to the keys its turns use, e.g. {role: from, content: "
                              "value}") from None
    if spec.drop_system_message:
        turns = [t for t in turns if t.get("role") != "system"]
    return turns


def _alpaca_record(record: dict) -> dict:
    """An Alpaca record as a prompt (the template around its instruction and input) and its output."""
    given = record.get("input")
    template = ALPACA_PROMPT_WITH_INPUT if given else ALPACA_PROMPT
    return {"prompt": template.format(instruction=record["instruction"], input=given),
            "completion": record["output"]}


def _to_records(spec: DatasetSpec, ds, train_on_inputs: bool):
    """text -> {text}; prompt_completion and alpaca -> {prompt, completion}; chat -> {messages}, or, for loss
    on the answer only, {prompt: all turns before the last, completion: [last assistant turn]}."""
    if spec.type == "alpaca":
        return ds.map(_alpaca_record, remove_columns=ds.column_names)
    if spec.type == "text":
        return ds.map(lambda r: {"text": r[spec.text_column]}, remove_columns=ds.column_names)
    if spec.type == "prompt_completion":
        return ds.map(lambda r: {"prompt": r[spec.prompt_column], "completion": r[spec.completion_column]},
                      remove_columns=ds.column_names)
    if train_on_inputs:
        return ds.map(lambda r: {"messages": _turns(spec, r[spec.messages_column])}, remove_columns=ds.column_names)

    def split_last_turn(r):
        turns = _turns(spec, r[spec.messages_column])
        if not turns or turns[-1].get("role") != "assistant":
            raise ConfigError(f"dataset {spec.path!r}: a conversation does not end with an assistant turn; "
                              "set train_on_inputs: true to train on whole conversations")
        return {"prompt": turns[:-1], "completion": turns[-1:]}

    return ds.map(split_last_turn, remove_columns=ds.column_names)


def _usable(record: dict) -> bool:
    """A record with something in every field (None and empty text or turns give the trainer nothing)."""
    return all(value is not None and (not isinstance(value, (str, list)) or len(value) > 0)
               for value in record.values())


def load_training_data(cfg: TrainConfig):
    """(train, eval or None): every dataset loaded, its columns checked, and all concatenated."""
    import datasets

    parts = []
    for spec in cfg.datasets:
        ds = _load(spec)
        _check_columns(spec, ds)
        records = _to_records(spec, ds, cfg.train_on_inputs)
        if len(ds) and not any(_usable(r) for r in records):
            raise ConfigError(f"dataset {spec.path!r}: none of its {len(ds)} rows has text in every column "
                              f"{spec.required_columns()}; check the column mapping of its datasets entry")
        parts.append(records)
    kinds = {tuple(sorted(p.column_names)) for p in parts}
    if len(kinds) > 1:
        raise ConfigError(f"datasets mix record kinds {sorted(kinds)}; use one type for all of them")
    train = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if len(train) == 0:
        raise ConfigError("the datasets hold no examples")
    if not cfg.val_set_size:
        return train, None
    size = int(cfg.val_set_size) if cfg.val_set_size >= 1 else cfg.val_set_size
    split = train.train_test_split(test_size=size, seed=cfg.seed)
    return split["train"], split["test"]
