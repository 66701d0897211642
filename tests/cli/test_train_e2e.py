"""The main job end to end on CPU: the tiny default config, patched, kernels in the interpreter."""

import json

import pytest
import torch
import yaml
from peft import PeftModel

from qlora_fast.cli.config import ConfigError, config_to_dict, load_config, parse_config
from qlora_fast.cli.main import default_config_path, run
from qlora_fast.cli.train import add_adapter, load_base_model, train


def tiny_config(tmp_path, **overrides):
    raw = config_to_dict(load_config(default_config_path()))
    raw.update({"output_dir": str(tmp_path / "run"), "max_steps": 4, "val_set_size": 0.0, "logging_steps": 1,
                **overrides})
    return parse_config(raw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("e2e"))
    return cfg, train(cfg)


def test_training_saves_a_plain_peft_adapter_and_the_resolved_config(trained):
    cfg, out = trained
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    saved = yaml.safe_load((out / "qlora_fast_config.yaml").read_text())
    assert saved["base_model"] == "random:tiny-llama" and saved["max_steps"] == 4
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 4 and summary["last_logged_loss"] < summary["first_logged_loss"]
    assert summary["tokens_per_second_after_warmup"] > 0  # steps 3 and 4 of 4


def test_stock_peft_reloads_the_adapter_with_trained_weights(trained):
    cfg, out = trained
    base, _ = load_base_model(cfg, torch.float32)
    model = PeftModel.from_pretrained(base, str(out))
    b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert len(b) == 14 and any(p.abs().sum() > 0 for p in b)  # B starts at zero: it was trained


def test_merge_matches_base_plus_adapter(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg, out = trained
    assert run(["merge", cfg.source or default_config_path(), "--adapter", str(out), "--out",
                str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    from qlora_fast.harness.models import byte_tokenizer

    tokenizer = byte_tokenizer()  # the random-init model's config carries Llama's ids (1, 2), not these
    assert (merged.config.bos_token_id, merged.config.eos_token_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    base, _ = load_base_model(cfg, torch.float32)
    # train mode (no dropout here): in eval mode bitsandbytes' CPU path repacks to bf16 scales, inexactly
    adapted = PeftModel.from_pretrained(base, str(out)).train()
    ids = torch.randint(0, 259, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=1e-3, atol=1e-3)


def test_generate_prints_text(trained, capsys):
    cfg, out = trained
    assert run(["generate", default_config_path(), "--adapter", str(out), "--prompt", "What is 1 plus 1?",
                "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip() != ""


def test_unknown_random_shape_and_missing_model_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="unknown model shape 'nope'"):
        train(tiny_config(tmp_path, base_model="random:nope"))
    with pytest.raises(ConfigError, match="no-such-model' is not a directory here"):
        train(tiny_config(tmp_path, base_model=str(tmp_path / "no-such-model")))


def test_hub_name_without_network_is_one_quick_line(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from qlora_fast.cli import train as train_module

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # a user's shell, not the tests'
    monkeypatch.setattr(train_module, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ConfigError, match="not in the hub cache, and the hub cannot be reached"):
        train(tiny_config(tmp_path, base_model="someone/some-model"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only refusal")
def test_activation_offloading_without_gpu_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="activation_offloading .* needs a GPU"):
        train(tiny_config(tmp_path, activation_offloading=True))


def test_offloaded_checkpointing_trains_the_same_run(tmp_path, capsys, monkeypatch):
    from qlora_fast.ops.offloaded_checkpoint import OffloadedCheckpointFunction

    train(tiny_config(tmp_path, output_dir=str(tmp_path / "plain"), max_steps=3, gradient_checkpointing=False))
    calls = []
    apply = OffloadedCheckpointFunction.apply
    monkeypatch.setattr(OffloadedCheckpointFunction, "apply", lambda *a: calls.append(1) or apply(*a))
    train(tiny_config(tmp_path, output_dir=str(tmp_path / "offload"), max_steps=3, gradient_checkpointing="offload"))
    assert "checkpointed layer inputs offloaded to the host" in capsys.readouterr().out
    assert len(calls) == 3 * 2  # every step, both decoder layers
    plain, offload = (json.loads((tmp_path / run / "train_summary.json").read_text())["logged_losses"]
                      for run in ("plain", "offload"))
    assert offload == pytest.approx(plain, rel=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only refusal")
def test_fsdp_without_gpu_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="fsdp .* needs them; on CPU use distributed: ddp"):
        train(tiny_config(tmp_path, distributed="fsdp", bnb_4bit_quant_storage="float32"))


def test_target_modules_that_do_not_exist(tmp_path):
    with pytest.raises(ConfigError, match="lora_target_modules"):
        train(tiny_config(tmp_path, lora_target_modules=["not_a_layer"]))


def test_a_target_that_matches_nothing_beside_others_is_named(tmp_path, capsys):
    cfg = tiny_config(tmp_path, lora_target_modules=["q_proj", "mlp.down_proj", "gate_prj"])
    model = add_adapter(cfg, load_base_model(cfg, torch.float32)[0])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lora_target_modules ['gate_prj'] match no module of 'random:tiny-llama'" in err
    adapted = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"q_proj", "down_proj"}


def test_resume_from_checkpoint_continues_the_same_run(tmp_path):
    # lr_scheduler constant: the 2-step run's schedule must not differ from the 4-step one's
    train(tiny_config(tmp_path, max_steps=2, save_steps=2, lr_scheduler="constant"))
    assert (tmp_path / "run" / "checkpoint-2").is_dir()
    train(tiny_config(tmp_path, max_steps=4, save_steps=2, lr_scheduler="constant", resume_from_checkpoint=True))
    resumed = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    train(tiny_config(tmp_path, output_dir=str(tmp_path / "straight"), lr_scheduler="constant"))
    straight = json.loads((tmp_path / "straight" / "train_summary.json").read_text())
    assert resumed["steps"] == 4
    # the same batches and weights; after a reload the optimizer's sums can differ in the last bits
    assert resumed["logged_losses"][2:] == pytest.approx(straight["logged_losses"][2:], rel=1e-4)


def test_patch_options_from_the_config_reach_patch_model(tmp_path, capsys):
    train(tiny_config(tmp_path, max_steps=1, lora_qkv_kernel=False, liger_rope=False))
    summary = [line for line in capsys.readouterr().out.splitlines() if line.startswith("qlora_fast: patched")]
    assert summary and "gated MLPs" in summary[0]
    assert "q/k/v" not in summary[0] and "rotary" not in summary[0]


def test_packing_trains_on_packed_attention(tmp_path, capsys):
    from qlora_fast.patch import CALLS

    CALLS.clear()
    train(tiny_config(tmp_path, max_steps=2, packing=True))
    summary = [line for line in capsys.readouterr().out.splitlines() if line.startswith("qlora_fast: patched")]
    assert "attention of packed batches within each sequence" in summary[0]
    assert CALLS["packed_attention"] > 0


AXOLOTL_STYLE = """\
base_model: random:tiny-llama
model_type: AutoModelForCausalLM
tokenizer_type: AutoTokenizer
load_in_8bit: false
load_in_4bit: true
strict: false
datasets:
  - path: alpaca.jsonl
    type: alpaca
dataset_prepared_path:
val_set_size: 0.25
output_dir: ./out
adapter: qlora
lora_model_dir:
sequence_len: 512
sample_packing: false
pad_to_sequence_len: true
lora_r: 8
lora_alpha: 16
lora_dropout: 0.0
lora_target_modules:
lora_target_linear: true
wandb_project:
gradient_accumulation_steps: 1
micro_batch_size: 4
num_epochs: 1
optimizer: adamw_torch
lr_scheduler: cosine
learning_rate: 2e-4
train_on_inputs: false
group_by_length: true
bf16: auto
fp16:
tf32: false
gradient_checkpointing: true
resume_from_checkpoint:
logging_steps: 1
flash_attention: true
warmup_steps: 1
evals_per_epoch: 1
saves_per_epoch: 1
save_total_limit: 1
weight_decay: 0.0
special_tokens:
  pad_token: "</s>"
"""


def test_an_axolotl_style_qlora_config_trains_as_the_user_runs_it(tmp_path):
    """A config written as axolotl's QLoRA examples are (no-effect keys, alpaca data, per-epoch evals and
    saves, special_tokens), run by the command in a clean environment: trains, names what it ignored in one
    line, evaluates and saves once an epoch."""
    import subprocess
    import sys

    from tests.helpers import user_environment

    rows = [{"instruction": f"Repeat {i}.", "input": "" if i % 2 else f"{i}", "output": f"{i} {i}"}
            for i in range(16)]
    (tmp_path / "alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "qlora.yml").write_text(AXOLOTL_STYLE)
    done = subprocess.run([sys.executable, "-m", "qlora_fast.cli.main", "train", "qlora.yml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, env=user_environment())
    assert done.returncode == 0, done.stderr[-3000:]
    notes = [line for line in done.stderr.splitlines() if line.startswith("qlora-fast:")]
    assert len(notes) == 1 and "model_type, tokenizer_type (" in notes[0] and "flash_attention (" in notes[0]
    assert "Traceback" not in done.stderr
    out = tmp_path / "out"
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 3  # 12 training rows (a quarter held out) in batches of 4, one epoch
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-3"]  # saved once, at the epoch's end
    assert "'eval_loss'" in done.stdout or "eval_loss" in done.stderr + done.stdout
    assert json.loads((out / "tokenizer_config.json").read_text())["pad_token"] == "</s>"


def test_examples_whose_prompt_fills_sequence_len_are_counted_or_refused(tmp_path, capsys):
    """TRL drops examples left without a completion token by truncation: some are counted in one line, all
    is one config error (the trainer would fail on an empty dataset with a traceback)."""
    from qlora_fast.cli.train import build_trainer

    rows = [{"prompt": "x" * (200 if i % 4 == 0 else 10), "completion": "yes"} for i in range(8)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    datasets = [{"path": str(data), "type": "prompt_completion"}]
    build_trainer(tiny_config(tmp_path, datasets=datasets, sequence_len=64))
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qlora-fast:")]
    assert notes == ["qlora-fast: 2 of 8 training examples have no completion token within sequence_len (64) "
                     "and are left out"]
    with pytest.raises(ConfigError, match=r"no training example has a completion token within sequence_len \(8 "):
        build_trainer(tiny_config(tmp_path, datasets=datasets, sequence_len=8))


def test_tokenizer_checks_come_before_the_model_load(tmp_path, monkeypatch):
    """special_tokens must name tokens the tokenizer has; chat datasets need its chat template. Both are
    one line, raised before any model is built."""
    import qlora_fast.cli.train as train_module
    from qlora_fast.harness.models import byte_tokenizer

    monkeypatch.setattr(train_module, "_base_model", lambda *a: pytest.fail("the model was loaded first"))
    with pytest.raises(ConfigError, match=r"special_tokens.pad_token '<\|end_of_text\|>' is not in the tokenizer"):
        load_base_model(tiny_config(tmp_path, special_tokens={"pad_token": "<|end_of_text|>"}), torch.float32)
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "yo"}]}) + "\n")
    untemplated = byte_tokenizer()
    untemplated.chat_template = None
    monkeypatch.setattr(train_module, "byte_tokenizer", lambda: untemplated)
    with pytest.raises(ConfigError, match="the chat datasets need a chat template.*has none"):
        load_base_model(tiny_config(tmp_path, datasets=[{"path": str(chat), "type": "chat"}]), torch.float32)


def test_trust_remote_code_reaches_the_hub_loaders(tmp_path, monkeypatch):
    """trust_remote_code: true (models that ship their own modeling code) is passed to the tokenizer's and
    the model's from_pretrained; off by default."""
    import transformers

    import qlora_fast.cli.train as train_module
    from qlora_fast.harness.models import byte_tokenizer

    seen = []
    monkeypatch.setattr(train_module, "_check_reachable", lambda name: None)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda name, **kwargs: seen.append(kwargs) or byte_tokenizer())
    for trust in (False, True):
        train_module.load_tokenizer(tiny_config(tmp_path, base_model="org/model", trust_remote_code=trust))
    assert [kwargs["trust_remote_code"] for kwargs in seen] == [False, True]
