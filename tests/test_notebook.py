"""notebooks/quickstart.ipynb runs top to bottom (nbclient, a fresh kernel)."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow  # a fresh kernel generates data, trains and samples: minutes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_notebook_executes(tmp_path):
    path = os.path.join(REPO, "notebooks", "quickstart.ipynb")
    nb = nbformat.read(path, as_version=4)
    os.environ["QK_NOTEBOOK_WORKDIR"] = str(tmp_path)
    client = NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": REPO}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) == 2  # the data example and the generations
    assert any("losses:" in o.get("text", "") for o in outputs if o.output_type == "stream")
