"""Every notebook in notebooks/ is committed with cleared outputs and runs top to bottom on small fixtures.

No Jupyter kernel: the code cells are exec'd in one namespace, the ``parameters``-tagged cell first as
written and then overridden with the fixture's values (papermill's convention), with a stub ``display``
(IPython's builtin in a real kernel). Fixtures: two results folders written by the real ``twins`` task
(two tiny random models over a few hand-written pairs) plus a cultural-benchmark result each.
"""
import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_VIT
from matplotlib.figure import Figure
from test_report import write_twin_shards

from cultureclip import CultureCLIP
from cultureclip.eval import tasks
from cultureclip.eval.results import write_result

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def results_dirs(tmp_path_factory):
    """``{"RESULTS_A": folder, "RESULTS_B": folder}``, each with a twins and a crope result."""
    torch.set_num_threads(1)  # tiny model: intra-op threads only spin on a busy CPU
    root = tmp_path_factory.mktemp("nb")
    write_twin_shards(root / "val")
    params = {}
    for seed, name in enumerate(("RESULTS_A", "RESULTS_B")):
        torch.manual_seed(seed)
        model = CultureCLIP.from_config(TINY_VIT, name=f"tiny-{seed}").eval()
        metrics, header, extra = tasks.twins(model, str(root / "val"), batch_size=4, concept_context_length=None)
        out = root / name
        write_result(out, model=f"tiny-{seed}", pretrained=None, metrics=metrics, extra=extra, **header)
        write_result(out, model=f"tiny-{seed}", pretrained=None, task="crope", dataset="fixture", split="test",
                     revision=None, seed=0, n=4, metrics={"acc": 0.5 + seed / 4, "n": 4, "acc/role=main": 0.5,
                                                          "n/role=main": 2, "acc/role=definition": 0.5 + seed / 2,
                                                          "n/role=definition": 2})
        params[name] = str(out)
    return params


def code_cells(nb):
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no notebook"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_outputs_are_cleared(path):
    nb = json.loads(path.read_text())
    for cell in code_cells(nb):
        assert cell.get("outputs") == [] and cell.get("execution_count") is None, f"{path.name}: run outputs committed"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, results_dirs):
    nb = json.loads(path.read_text())
    cells = code_cells(nb)
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1 and cells[0] is tagged[0], "the first code cell holds the parameters (tag: parameters)"
    shown = []
    namespace = {"__name__": "__main__", "display": lambda *objs: shown.extend(objs)}
    for i, cell in enumerate(cells):
        exec(compile("".join(cell["source"]), f"{path.name}[code cell {i}]", "exec"), namespace)
        if cell is tagged[0]:
            unknown = set(results_dirs) - set(namespace)
            assert not unknown, f"the parameter cell does not define {unknown}"
            namespace.update(results_dirs)
    figures = [v for v in shown + list(namespace.values()) if isinstance(v, Figure)]
    figures += [f for v in namespace.values() if isinstance(v, (list, dict))
                for f in (v.values() if isinstance(v, dict) else v) if isinstance(f, Figure)]
    assert figures, "the notebook drew no figure"
    if path.name == "compare_models.ipynb":
        twin_figures = namespace["twin_figures"]
        assert len(twin_figures) == 2 and {id(f) for f in shown} >= {id(f) for f in twin_figures}
        assert set(namespace["group_figures"]) == {("crope", "role"), ("twins", "category"), ("twins", "country")}
        for fig in {id(f): f for f in figures}.values():
            fig.savefig(Path(results_dirs["RESULTS_A"]).parent / f"nb-{id(fig)}.png")  # every figure renders
