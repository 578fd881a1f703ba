"""The notebooks of experiments/notebooks/ run top to bottom on CPU (nbclient, a fresh kernel
each) with small parameters (SWIFTLM_NOTEBOOK_QUICK=1; each under a minute), and are stored
with their outputs stripped."""
import pathlib

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

from tests.experiments import tiny_corpus, tiny_gguf  # noqa: E402

NOTEBOOK_DIR = pathlib.Path(__file__).parents[2] / "experiments" / "notebooks"
NOTEBOOKS = sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb"))


def test_notebooks_ship_stripped():
    assert {"quickstart.ipynb", "speculative_real_model.ipynb",
            "window_attention_kernel.ipynb"} <= set(NOTEBOOKS)
    for name in NOTEBOOKS:
        nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), name
        # First cell: installs in Colab, shows the devices.
        assert "google.colab" in code[0].source and "jax.devices()" in code[0].source


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tmp_path, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SWIFTLM_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", tiny_corpus.compile_cache(tmp_path_factory))
    monkeypatch.setenv("SWIFTLM_DATA_DIR", tiny_corpus.build(tmp_path / "data"))
    if name == "speculative_real_model.ipynb":
        # A tiny random GGUF with a chat template stands in for SmolLM2 (minutes on 2 cores).
        monkeypatch.setenv("SWIFTLM_NOTEBOOK_GGUF", tiny_gguf.write(tmp_path / "tiny.gguf"))
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute()   # raises CellExecutionError naming the failing cell
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                      for o in c.outputs)
    assert "CpuDevice" in outputs
