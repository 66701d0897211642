import json

import pytest
import torch

import qlora_fast.patching.lora_linear
from qlora_fast.cli.config import config_to_dict, load_config, parse_config
from qlora_fast.cli.main import default_config_path, run
from qlora_fast.harness.compare import compare_stock_and_patched
from qlora_fast.harness.models import add_lora, quantize_to_nf4_, random_causal_lm
from qlora_fast.harness.report import write_report


def tiny_model(dtype):
    return add_lora(quantize_to_nf4_(random_causal_lm("tiny-llama", dtype), compute_dtype=dtype), init_b_std=0.02)


def batches(n=4):
    ids = [torch.randint(0, 512, (2, 32)) for _ in range(n)]
    return [{"input_ids": i, "labels": i} for i in ids]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patched_training_tracks_stock(dtype):
    result = compare_stock_and_patched(tiny_model(dtype), batches(), dtype, lr=1e-3)
    assert result.passed, result.to_dict()
    assert result.patched_layers == 14 and len(result.patched.losses) == 4


def test_a_wrong_kernel_is_caught(monkeypatch):
    real = qlora_fast.patching.lora_linear.lora_nf4_linear

    def doubled_scaling(x, x_lora, a, b, scaling, *rest, **kwargs):
        return real(x, x_lora, a, b, 2 * scaling, *rest, **kwargs)

    monkeypatch.setattr(qlora_fast.patching.lora_linear, "lora_nf4_linear", doubled_scaling)
    result = compare_stock_and_patched(tiny_model(torch.float32), batches(), torch.float32, lr=1e-3)
    assert not result.passed


def test_model_is_left_unpatched_with_its_initial_weights():
    model = tiny_model(torch.float32)
    before = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    compare_stock_and_patched(model, batches(2), torch.float32)
    assert not any("forward" in vars(m) for m in model.modules())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_report_files(tmp_path):
    result = compare_stock_and_patched(tiny_model(torch.float32), batches(2), torch.float32)
    out = write_report(result, str(tmp_path), "tiny")
    assert json.loads((out / "report.json").read_text())["passed"] is True
    assert "PASS" in (out / "report.md").read_text()
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_command_on_the_default_config(tmp_path, capsys):
    raw = config_to_dict(load_config(default_config_path()))
    raw["micro_batch_size"] = 2
    (tmp_path / "cfg.yaml").write_text(__import__("yaml").safe_dump(raw))
    assert parse_config(raw).datasets
    assert run(["compare", str(tmp_path / "cfg.yaml"), "--steps", "3", "--out", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "loss.png").is_file()
    if not torch.cuda.is_available():  # said on stdout, not only in the report
        assert "the speed figures say nothing about a GPU" in capsys.readouterr().out


def test_random_batches_are_reproducible_per_size():
    from qlora_fast.harness.run import random_batches

    a, b = random_batches(100, "2x16", 3), random_batches(100, "2x16", 3)
    assert len(a) == 3 and a[0]["input_ids"].shape == (2, 16)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert not torch.equal(a[0]["input_ids"], a[1]["input_ids"])


def test_interleaved_timing_alternates_and_leaves_the_model_unpatched(monkeypatch):
    import qlora_fast.harness.compare as compare

    model = tiny_model(torch.float32)
    states = []
    real = compare._forward_backward_seconds
    monkeypatch.setattr(compare, "_forward_backward_seconds",
                        lambda m, b: states.append(any("forward" in vars(x) for x in m.modules())) or real(m, b))
    result = compare_stock_and_patched(model, batches(2), torch.float32, timing_rounds=3)
    assert states == [False, True] * 4  # warm-up round + 3 timed rounds
    stock_s, patched_s = result.interleaved_seconds
    assert result.speedup == pytest.approx(stock_s / patched_s)
    assert not any("forward" in vars(m) for m in model.modules())


def test_weight_snapshots_stay_off_the_device_being_measured():
    from qlora_fast.harness.verify import lora_state

    model = torch.nn.Linear(4, 4)
    assert all(t.device.type == "cpu" and t.data_ptr() != p.data_ptr()
               for t, p in zip(lora_state(model).values(), model.parameters()))


def test_median_throughput_ignores_one_slow_step():
    from qlora_fast.harness.compare import RunStats

    stats = RunStats(step_seconds=[9.0, 1.0, 1.0, 5.0, 1.0], tokens_per_step=100)
    assert stats.median_tokens_per_second == 100.0  # steps after the first: median 1 s
    assert stats.tokens_per_second == 50.0  # 400 tokens in 8 s


def test_fused_and_foreach_adamw_train_alike():
    """The harness steps AdamW fused (Trainer's default) unless told foreach (earlier sessions' figures)."""
    from qlora_fast.harness.compare import train_steps
    from qlora_fast.harness.verify import load_lora_state, lora_state

    model, data = tiny_model(torch.float32), batches(3)
    initial = lora_state(model)
    fused = train_steps(model, data, lr=1e-3)
    load_lora_state(model, initial)
    foreach = train_steps(model, data, lr=1e-3, optimizer="foreach")
    assert fused.losses[0] == foreach.losses[0] and fused.losses == pytest.approx(foreach.losses, rel=1e-5)
    with pytest.raises(ValueError, match="optimizer 'sgd'"):
        train_steps(model, data[:1], optimizer="sgd")
