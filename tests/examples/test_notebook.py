"""The Colab notebook runs top to bottom (tiny random model, shipped data, CPU)."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).parents[2] / "examples" / "qlora_fast_colab.ipynb"


def test_colab_notebook_executes_without_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_FAST_MODEL", "random:tiny-llama")
    monkeypatch.setenv("QLORA_FAST_MAX_STEPS", "3")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for cell in nb.cells for o in cell.get("outputs", []))
    assert "qlora_fast: patched 14 LoRA NF4 layers" in outputs
    assert (tmp_path / "outputs" / "colab" / "adapter" / "adapter_config.json").is_file()
