"""The Colab notebook runs top to bottom (tiny random model, shipped data, CPU), its kernel started from a
user's environment (no test-runner variables)."""

import subprocess
import sys
from pathlib import Path

import nbformat

from tests.helpers import user_environment

NOTEBOOK = Path(__file__).parents[2] / "examples" / "qlora_fast_colab.ipynb"

EXECUTE = """
import sys, nbformat
from nbclient import NotebookClient
nb = nbformat.read(sys.argv[1], as_version=4)
NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": sys.argv[2]}}).execute()
nbformat.write(nb, sys.argv[3])
"""


def test_colab_notebook_executes_without_errors(tmp_path):
    env = dict(user_environment(), QLORA_FAST_MODEL="random:tiny-llama", QLORA_FAST_MAX_STEPS="3")
    done = subprocess.run([sys.executable, "-c", EXECUTE, str(NOTEBOOK), str(tmp_path), str(tmp_path / "out.ipynb")],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    nb = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    outputs = "".join(o.get("text", "") for cell in nb.cells for o in cell.get("outputs", []))
    assert "qlora_fast: patched 14 LoRA NF4 layers" in outputs
    assert (tmp_path / "outputs" / "colab" / "adapter" / "adapter_config.json").is_file()
