"""The command as a user runs it: a clean environment, quiet, every option explained."""

import subprocess
import sys

from qlora_fast.cli.main import _parser
from tests.helpers import user_environment


def test_help_is_quiet_and_every_option_has_help_text():
    done = subprocess.run([sys.executable, "-m", "qlora_fast.cli.main", "train", "--help"], capture_output=True,
                          text=True, env=user_environment(), timeout=300)
    assert done.returncode == 0
    assert "kernels-community" not in done.stdout + done.stderr
    for command in _parser()._subparsers._group_actions[0].choices.values():
        for action in command._actions:
            assert action.help, f"{command.prog} {action.dest}"


def test_bitsandbytes_cpu_kernel_notice_is_filtered():
    done = subprocess.run([sys.executable, "-c", "import qlora_fast.cli.main, bitsandbytes, torch; "
                           "import bitsandbytes.functional"], capture_output=True, text=True,
                          env=user_environment(), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "kernels-community" not in done.stderr
