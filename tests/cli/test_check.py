"""cli/check.py: `qlora-fast verify` on a packing config checks the packed path TRL's packing will take."""

from qlora_fast.cli.check import verify_config
from qlora_fast.cli.config import config_to_dict, load_config, parse_config
from qlora_fast.cli.main import default_config_path


def test_verify_on_a_packing_config_runs_packed_rows(tmp_path, capsys):
    raw = config_to_dict(load_config(default_config_path()))
    raw.update(output_dir=str(tmp_path), packing=True, micro_batch_size=4, val_set_size=0.0)
    report = verify_config(parse_config(raw), steps=1)
    assert report.passed, report.verdict()
    assert report.calls["packed_attention"] == 2 * 2  # two layers, forward and the checkpoint's recompute
    assert "PASS" in capsys.readouterr().out
