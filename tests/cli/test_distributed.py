"""Data-parallel training on CPU: 2 processes over gloo match one process on the same global batch."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from qlora_fast.cli.config import config_to_dict, load_config
from qlora_fast.cli.main import default_config_path


def write_config(path, out, micro_batch_size, distributed):
    raw = config_to_dict(load_config(default_config_path()))
    # offload: the offloaded checkpoint's backward (reentrant, like torch's) under DDP's gradient hooks
    raw.update(output_dir=str(out), max_steps=3, val_set_size=0.0, logging_steps=1,
               micro_batch_size=micro_batch_size, distributed=distributed, gradient_checkpointing="offload")
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def train(args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]


def test_two_process_ddp_matches_single_process(tmp_path):
    ddp_cfg = write_config(tmp_path / "ddp.yaml", tmp_path / "ddp", 4, "ddp")
    single_cfg = write_config(tmp_path / "single.yaml", tmp_path / "single", 8, "none")
    train([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "qlora_fast.cli.main",
           "train", ddp_cfg], tmp_path)
    train([sys.executable, "-m", "qlora_fast.cli.main", "train", single_cfg], tmp_path)
    ddp = json.loads((tmp_path / "ddp" / "train_summary.json").read_text())
    single = json.loads((tmp_path / "single" / "train_summary.json").read_text())
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    assert ddp["logged_losses"] == pytest.approx(single["logged_losses"], rel=1e-3)


def test_leaving_the_process_group_keeps_the_final_barrier_from_gloos_thread(monkeypatch):
    """The final barrier's work stays referenced by the process: freed by gloo's worker thread, it took the
    GIL while the main thread held it to join that thread, and a finished run hung (qlora_fast/cli/train.py)."""
    import socket

    import torch.distributed as dist

    from qlora_fast.cli import train as train_module

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    monkeypatch.setattr(train_module, "_FINAL_BARRIER", [])
    train_module._leave_process_group()
    assert not dist.is_initialized()
    (work,) = train_module._FINAL_BARRIER
    assert work.is_completed()
