"""notebooks/quickstart.ipynb runs top to bottom on a tiny checkpoint (so it cannot rot)."""

import os

import nbformat
from conftest import ROOT
from nbclient import NotebookClient


def test_quickstart_notebook_executes(tiny_ckpt, monkeypatch):
    monkeypatch.setenv("DIFFUSION_LAB_CKPT", str(tiny_ckpt))
    monkeypatch.setenv("DIFFUSION_LAB_NB_FID_N", "8")
    nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # stored stripped
    NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(ROOT / "notebooks")}},
        env=dict(os.environ),
    ).execute()
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 6
