import subprocess
import sys
from importlib import resources
from pathlib import Path

import torch

from qlora_fast.harness.models import byte_tokenizer, random_causal_lm
from tests.helpers import user_environment

SCRIPT = Path(__file__).parents[2] / "examples" / "train_with_patch_model.py"


def test_example_script_trains_a_local_model(tmp_path):
    random_causal_lm("tiny-llama", torch.float32).save_pretrained(tmp_path / "model")
    byte_tokenizer().save_pretrained(tmp_path / "model")
    data = str(resources.files("qlora_fast") / "data" / "tiny_instructions.jsonl")
    run = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "model"), data, "2"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600, env=user_environment())
    assert run.returncode == 0, run.stderr[-3000:]
    assert "patched 14 LoRA NF4 layers" in run.stdout
    assert (tmp_path / "outputs" / "example" / "adapter_config.json").is_file()


def test_example_script_without_arguments_prints_its_usage(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=user_environment())
    assert run.returncode != 0
    assert run.stderr.strip().startswith("usage: python") and "Traceback" not in run.stderr
