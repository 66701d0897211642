import pytest

from qlora_fast.cli.config import ConfigError, load_config, parse_config
from qlora_fast.cli.main import default_config_path, run


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n')
    return path


def config(data_file, **overrides):
    raw = {"base_model": "random:tiny-llama", "datasets": [{"path": str(data_file), "type": "prompt_completion"}]}
    raw.update(overrides)
    return raw


def test_default_config_parses_and_resolves_shipped_data():
    cfg = load_config(default_config_path())
    assert cfg.base_model == "random:tiny-llama"
    assert cfg.datasets[0].path.endswith("qlora_fast/data/tiny_instructions.jsonl")


def test_unknown_key_suggests_the_right_one(data_file):
    with pytest.raises(ConfigError, match="unknown config key 'learning_rat'.*did you mean 'learning_rate'"):
        parse_config(config(data_file, learning_rat=1e-4))


def test_unknown_dataset_key_is_named(data_file):
    raw = config(data_file)
    raw["datasets"][0]["promt_column"] = "q"
    with pytest.raises(ConfigError, match=r"'promt_column' in datasets\[0\].*did you mean 'prompt_column'"):
        parse_config(raw)


@pytest.mark.parametrize("key,value,message", [
    ("lora_r", "16", "'lora_r' must be an int"),
    ("learning_rate", "fast", "'learning_rate' must be a float"),
    ("packing", "yes", "'packing' must be a bool"),
    ("lora_dropout", 1.5, r"lora_dropout must be in \[0, 1\)"),
    ("optimizer", "adamw", "did you mean"),
    ("lr_scheduler", "cosin", "did you mean 'cosine'"),
    ("lora_target_modules", 3, "lora_target_modules must be"),
    ("eval_steps", "ten", "'eval_steps' must be an int"),
    ("tokenizer", 5, "'tokenizer' must be a str"),
    ("distributed", "fsdp", "bnb_4bit_quant_storage"),
    ("gradient_checkpointing", "sometimes", "gradient_checkpointing must be true, false or offload"),
])
def test_wrong_values_name_the_key(data_file, key, value, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(config(data_file, **{key: value}))


def test_offloaded_checkpointing_needs_the_patch(data_file):
    assert parse_config(config(data_file, gradient_checkpointing="offload")).gradient_checkpointing == "offload"
    with pytest.raises(ConfigError, match="offload .* needs patch: true"):
        parse_config(config(data_file, gradient_checkpointing="offload", patch=False))


def test_bf16_and_fp16_together_are_refused(data_file):
    with pytest.raises(ConfigError, match="bf16 and fp16 are both true"):
        parse_config(config(data_file, bf16=True, fp16=True))


def test_missing_data_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="no such file: .*missing.jsonl"):
        parse_config({"base_model": "random:tiny-llama", "datasets": [{"path": str(tmp_path / "missing.jsonl")}]})


def test_missing_base_model_and_datasets(data_file):
    with pytest.raises(ConfigError, match="'base_model' is required"):
        parse_config({"datasets": [str(data_file)]})
    with pytest.raises(ConfigError, match="'datasets' must be a non-empty list"):
        parse_config({"base_model": "x"})


def test_axolotl_spellings_are_accepted(data_file):
    cfg = parse_config(config(data_file, sample_packing=True, lora_target_linear=True, optim="adamw_8bit"))
    assert cfg.packing and cfg.lora_target_modules == "all-linear" and cfg.optimizer == "adamw_8bit"


@pytest.mark.parametrize("spelled, value", [("2e-4", 2e-4), ("1.5E-5", 1.5e-5), ("3e2", 300.0)])
def test_a_float_in_scientific_notation_reads_as_its_number(tmp_path, data_file, spelled, value):
    """PyYAML (YAML 1.1) reads `2e-4` as a string; axolotl's configs mean the number."""
    (tmp_path / "cfg.yaml").write_text(f"base_model: random:tiny-llama\nlearning_rate: {spelled}\n"
                                       f"datasets: [{data_file}]\n")
    assert load_config(str(tmp_path / "cfg.yaml")).learning_rate == value


def test_a_key_left_empty_takes_its_default_as_in_axolotl(tmp_path, data_file):
    """axolotl's example configs list keys with no value (`fp16:`, `lora_target_modules:` beside
    `lora_target_linear: true`): unset, not None."""
    (tmp_path / "cfg.yaml").write_text(f"base_model: random:tiny-llama\nlora_r:\nfp16:\nlearning_rate:\n"
                                       f"lora_target_modules:\nlora_target_linear: true\neval_steps:\n"
                                       f"datasets: [{data_file}]\n")
    cfg = load_config(str(tmp_path / "cfg.yaml"))
    assert (cfg.lora_r, cfg.fp16, cfg.learning_rate, cfg.eval_steps) == (16, False, 2e-4, None)
    assert cfg.lora_target_modules == "all-linear"
    with pytest.raises(ConfigError, match="'base_model' is required"):
        parse_config(config(data_file, base_model=None))


@pytest.mark.parametrize("args, expected", [
    (["--learning_rate", "1e-4", "--max_steps=20"], {"learning_rate": "1e-4", "max_steps": 20}),
    (["--max-steps", "5", "--lora_target_modules", "[q_proj, v_proj]", "--packing", "true"],
     {"max_steps": 5, "lora_target_modules": ["q_proj", "v_proj"], "packing": True}),
    ([], {}),
])
def test_overrides_read_as_axolotl_takes_them(args, expected):
    from qlora_fast.cli.config import parse_overrides

    assert parse_overrides(args) == expected


@pytest.mark.parametrize("args", [["--lora_r"], ["--lora_r", "--max_steps", "3"], ["lora_r", "8"], ["--", "8"],
                                  ["--lora_target_modules", "[unclosed"]])
def test_an_unreadable_override_is_named(args):
    """--key with no value, a word that is no --key, a bare --, a value that is not YAML."""
    from qlora_fast.cli.config import parse_overrides

    with pytest.raises(ConfigError, match="override|not valid YAML"):
        parse_overrides(args)


def test_overrides_replace_the_files_keys_in_any_spelling(tmp_path, data_file):
    (tmp_path / "cfg.yaml").write_text(f"base_model: random:tiny-llama\nsample_packing: false\noptimizer: sgd\n"
                                       f"lora_r: 8\ndatasets: [{data_file}]\n")
    cfg = load_config(str(tmp_path / "cfg.yaml"), {"packing": True, "optim": "adamw_8bit", "learning_rate": "1e-4"})
    assert cfg.packing and cfg.optimizer == "adamw_8bit" and cfg.learning_rate == 1e-4 and cfg.lora_r == 8
    with pytest.raises(ConfigError, match="unknown config key 'lora_rank'"):
        load_config(str(tmp_path / "cfg.yaml"), {"lora_rank": 4})


def test_the_command_takes_overrides_after_the_config(tmp_path, data_file, monkeypatch, capsys):
    import qlora_fast.cli.train as train_module

    trained = []
    monkeypatch.setattr(train_module, "train", trained.append)
    (tmp_path / "cfg.yaml").write_text(f"base_model: random:tiny-llama\ndatasets: [{data_file}]\n")
    assert run(["train", str(tmp_path / "cfg.yaml"), "--max_steps", "3", "--learning-rate=5e-5"]) == 0
    assert trained[0].max_steps == 3 and trained[0].learning_rate == 5e-5
    assert run(["train", "--max_steps", "4"]) == 0  # the embedded config, its value not read as a config file
    assert trained[1].max_steps == 4 and trained[1].base_model == "random:tiny-llama"
    assert run(["train", str(tmp_path / "cfg.yaml"), "--max_step", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown config key 'max_step'" in err and "did you mean 'max_steps'" in err


def test_relative_dataset_paths_follow_the_config_file(tmp_path, data_file):
    (tmp_path / "cfg.yaml").write_text(f"base_model: random:tiny-llama\ndatasets:\n  - path: {data_file.name}\n")
    assert load_config(str(tmp_path / "cfg.yaml")).datasets[0].path == str(data_file.resolve())


def test_cli_prints_one_clear_line_and_exits_2(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("base_model: random:tiny-llama\nmicro_batch: 2\ndatasets: [x.jsonl]\n")
    assert run(["train", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown config key 'micro_batch'" in err and "Traceback" not in err


def test_invalid_yaml_and_missing_file(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("base_model: [unclosed\n")
    assert run(["train", str(tmp_path / "bad.yaml")]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert run(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["llama-3.1-8b-alpaca", "mistral-7b-alpaca", "qwen2.5-7b-ultrachat"])
def test_shipped_recipes_validate(name):
    from pathlib import Path

    cfg = load_config(str(Path(__file__).parents[2] / "configs" / f"{name}.yaml"))
    assert cfg.datasets and cfg.lora_target_modules == "all-linear"


def test_patch_options_take_their_axolotl_and_liger_spellings(data_file):
    from qlora_fast.cli.config import patch_options

    assert patch_options(parse_config(config(data_file))) == {
        "fused_mlp": True, "fused_qkv": True, "rope": True, "rms_norm": True, "add_norm": True, "chunked_loss": True,
        "bf16_frozen_weights": True, "packed_attention": True, "offload_checkpoints": None,
        "keep_attention_outputs": True, "parameter_count": True}
    cfg = parse_config(config(data_file, lora_qkv_kernel=False, lora_mlp_kernel=False, liger_rope=False,
                              rms_norm_kernel=False, add_norm_kernel=False,
                              liger_fused_linear_cross_entropy=False, bf16_frozen_weights=False,
                              packed_attention=False, keep_attention_outputs=False, parameter_count=False))
    assert not any(patch_options(cfg).values())
    assert patch_options(parse_config(config(data_file, gradient_checkpointing="offload")))["offload_checkpoints"]

    import inspect

    from qlora_fast import patch_model
    every = set(inspect.signature(patch_model).parameters) - {"model", "verbose"}
    assert set(patch_options(cfg)) == every  # every patch_model switch has its config key
    with pytest.raises(ConfigError, match="fused_qkv.* must be a bool"):
        parse_config(config(data_file, fused_qkv="yes"))


def test_axolotl_keys_that_change_nothing_are_named_in_one_line(data_file, capsys, tmp_path):
    from qlora_fast.cli.config import ignored_keys_line

    cfg = parse_config(config(data_file, model_type="AutoModelForCausalLM", tokenizer_type="AutoTokenizer",
                              strict=False, flash_attention=True, pad_to_sequence_len=True, wandb_project=None,
                              load_in_8bit=False, lora_fan_in_fan_out=None, deepspeed=None))
    line = ignored_keys_line(cfg)
    assert line.count("\n") == 0
    for key in ("model_type, tokenizer_type (", "strict (", "flash_attention (", "pad_to_sequence_len ("):
        assert key in line
    assert "wandb_project" not in line  # left empty: unset, as in axolotl
    assert "model_type" not in yaml_dump(cfg)  # the resolved config holds what runs
    assert ignored_keys_line(parse_config(config(data_file))) is None
    path = tmp_path / "cfg.yaml"
    path.write_text(f"base_model: 'random:nope'\nstrict: false\n"
                    f"datasets: [{{path: {data_file}, type: prompt_completion}}]\n")
    assert run(["train", str(path)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qlora-fast:")]
    assert err[0] == "qlora-fast: ignored config keys that change nothing here: strict (every key is checked here)"
    assert len(err) == 2 and "base_model" in err[1]


def yaml_dump(cfg) -> str:
    import yaml

    from qlora_fast.cli.config import config_to_dict

    return yaml.safe_dump(config_to_dict(cfg))


@pytest.mark.parametrize("key,value,fix", [("load_in_8bit", True, "load_in_4bit: true"),
                                           ("deepspeed", "zero2.json", "distributed: ddp or fsdp"),
                                           ("lora_model_dir", "./old", "resume_from_checkpoint"),
                                           ("gradient_checkpointing_kwargs", {"use_reentrant": True},
                                            "non-reentrant")])
def test_axolotl_keys_set_to_what_does_not_run_here_are_refused(data_file, key, value, fix):
    with pytest.raises(ConfigError, match=f"'{key}' is set.*{fix}"):
        parse_config(config(data_file, **{key: value}))


def test_axolotl_chat_config_keys_are_read(data_file):
    """The keys of axolotl's chat QLoRA examples (gemma2/qlora.yml and the like)."""
    from qlora_fast.cli.config import ignored_keys_line

    cfg = parse_config(config(data_file, chat_template="gemma", eot_tokens=["<end_of_turn>"],
                              is_mistral_derived_model=True, loss_watchdog_threshold=5.0,
                              attn_implementation="flash_attention_2", eval_sample_packing=False,
                              ddp_find_unused_parameters=True, tf32=True,
                              gradient_checkpointing_kwargs={"use_reentrant": False}, unfrozen_parameters=None))
    line = ignored_keys_line(cfg)
    assert "chat_template, eot_tokens (conversations are formatted" in line and "attn_implementation" in line
    assert "gradient_checkpointing_kwargs" not in line and cfg.tf32 is True
    assert "is_mistral_derived_model (the model and tokenizer classes" in line and "loss_watchdog_threshold" in line


def test_per_epoch_evals_and_saves(data_file):
    from qlora_fast.cli.train import _every

    cfg = parse_config(config(data_file, num_epochs=4, evals_per_epoch=4, saves_per_epoch=1, save_total_limit=2))
    assert _every(5, cfg.evals_per_epoch, cfg) == ("steps", 1 / 16)  # a fraction of the run's steps
    assert _every(500, cfg.saves_per_epoch, cfg) == ("steps", 1 / 4)
    one_epoch = parse_config(config(data_file, num_epochs=1, saves_per_epoch=1))
    assert _every(500, one_epoch.saves_per_epoch, one_epoch) == ("epoch", 500)
    assert _every(7, None, one_epoch) == ("steps", 7)
    with pytest.raises(ConfigError, match="evals_per_epoch counts per epoch.*use eval_steps with max_steps"):
        parse_config(config(data_file, max_steps=10, evals_per_epoch=2))
    with pytest.raises(ConfigError, match="saves_per_epoch and save_steps are both set"):
        parse_config(config(data_file, saves_per_epoch=2, save_steps=10))


@pytest.mark.parametrize("tokens", [{"pad": "x"}, {"pad_token": 3}, ["pad_token"]])
def test_special_tokens_are_checked(data_file, tokens):
    with pytest.raises(ConfigError, match="special_tokens must map some of bos_token"):
        parse_config(config(data_file, special_tokens=tokens))
