"""The package's layers (docs/ARCHITECTURE.md): every import inside diffusion_lab points down, never up or sideways
between the building blocks (the math knows nothing of the network, data or Lightning; eval/ nothing of lit/)."""

import ast
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGE = ROOT / "diffusion_lab"
LAYER = {
    "checks": 0, "io": 0, "allocator": 0,  # plain helpers
    "diffusion": 1, "nets": 1, "data": 1, "images": 1, "phema": 1,  # the building blocks, independent of each other
    "eval": 2,  # metrics on images and features
    "lit": 3,  # Lightning glue
    "config": 4, "checkpoint": 4, "sample_modes": 4, "loggers": 4, "offline": 4, "cli": 4,
    "tasks": 5,  # the bodies of train.py / evaluate.py / sample.py
}  # fmt: skip


def imports(path: Path, root: Path = ROOT) -> set[str]:
    """The top-level diffusion_lab modules/packages a file imports (relative imports resolved)."""
    parts = path.relative_to(root).with_suffix("").parts  # ('diffusion_lab', 'lit', 'module')
    pkg = parts if path.name == "__init__.py" else parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = list(pkg[: len(pkg) - node.level + 1]) if node.level else []
            target = [*base, *(node.module.split(".") if node.module else [])]
            if target[:1] == ["diffusion_lab"]:
                names = [target[1]] if len(target) > 1 else [a.name for a in node.names]
                found.update(names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("diffusion_lab."))
    return found


def unit(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


FILES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(PACKAGE)) for p in FILES])
def test_imports_point_down(path):
    me = unit(path)
    assert me in LAYER, f"{me} has no layer in this test (and docs/ARCHITECTURE.md)"
    for other in imports(path) - {me}:
        ok = LAYER[other] < LAYER[me] or (LAYER[other] == LAYER[me] == 4)
        assert ok, (
            f"{path.relative_to(ROOT)} imports diffusion_lab.{other}: layer {LAYER[other]} from layer {LAYER[me]}"
        )


def test_the_checker_sees_upward_imports(tmp_path):
    bad = tmp_path / "diffusion_lab" / "eval" / "x.py"
    bad.parent.mkdir(parents=True)
    bad.write_text("from ..lit import EMA\nfrom diffusion_lab.tasks import train\nfrom . import fid\nimport torch\n")
    assert imports(bad, tmp_path) == {"lit", "tasks", "eval"}
