"""The layers of docs/architecture.md, checked against every import in the package (read with ``ast``, not run)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Folder in the repository -> its layer; the first match wins (tunevec/core before tunevec/).
FOLDERS = [
    ("tunevec/core", "core"),
    ("steering", "steering"),
    ("analysis", "analysis"),
    ("server", "server"),
    ("eval", "eval"),
    ("tunevec", "app"),  # cli.py, demo.py, fixtures/
]
# Installed module prefix -> layer.
MODULES = {
    "tunevec.core": "core",
    "tunevec.steering": "steering",
    "tunevec.analysis": "analysis",
    "tunevec.server": "server",
    "tunevec.eval": "eval",
}
# What each layer may import besides itself (docs/architecture.md).
ALLOWED = {
    "core": set(),
    "steering": {"core"},
    "analysis": {"steering", "core"},
    "server": {"steering", "core"},
    "eval": {"server", "analysis", "steering", "core"},
    "app": {"eval", "server", "analysis", "steering", "core"},
}


def layer_of_file(path: Path) -> str:
    rel = path.relative_to(REPO).as_posix()
    return next(layer for folder, layer in FOLDERS if rel.startswith(folder + "/"))


def layer_of_module(name: str) -> str | None:
    if name != "tunevec" and not name.startswith("tunevec."):
        return None
    return next(
        (layer for prefix, layer in MODULES.items() if name == prefix or name.startswith(prefix + ".")), "app"
    )


def imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
    return out


def package_files() -> list[Path]:
    return sorted(p for folder, _ in FOLDERS for p in (REPO / folder).rglob("*.py"))


def test_every_import_points_down_the_layers():
    broken = []
    for path in set(package_files()):
        src = layer_of_file(path)
        for line, module in imports(path):
            dst = layer_of_module(module)
            if dst is not None and dst != src and dst not in ALLOWED[src]:
                broken.append(f"{path.relative_to(REPO)}:{line} ({src}) imports {module} ({dst})")
    assert not broken, "imports against docs/architecture.md:\n" + "\n".join(sorted(broken))


def test_the_layers_named_here_are_the_ones_documented():
    doc = (REPO / "docs/architecture.md").read_text()
    for layer, below in ALLOWED.items():
        assert f"`{layer}`" in doc, layer
        for other in below:
            assert f"`{other}`" in doc


def test_no_module_is_imported_under_a_second_top_level_name():
    """Only ``tunevec`` is importable: the layer folders are not top-level packages of their own."""
    code = "import importlib.util as u; print([n for n in ('server', 'eval', 'steering', 'analysis') if u.find_spec(n)])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    assert out.stdout.strip() == "[]"


BOUNDARY = "steering/vllm"  # the one package that touches vLLM (docs/architecture.md)
DOOR = "tunevec.steering.vllm"


def test_vllm_is_reached_only_through_the_boundary_package_and_its_door():
    """Outside ``steering/vllm/`` no module imports vLLM, nor a module of the boundary other than its door."""
    broken = []
    for path in set(package_files()):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith(BOUNDARY + "/"):
            continue
        for line, module in imports(path):
            if module == "vllm" or module.startswith("vllm."):
                broken.append(f"{rel}:{line} imports {module}")
            elif module.startswith(DOOR + "."):
                broken.append(f"{rel}:{line} imports {module}, past the door {DOOR}")
    assert not broken, "vLLM reached outside its boundary:\n" + "\n".join(sorted(broken))


def test_the_boundary_has_one_version_gate():
    """The versions tunevec's private-API use was verified on are declared once, in compat.py."""
    declared = [
        p.relative_to(REPO).as_posix()
        for p in package_files()
        if "VERIFIED" in p.read_text() and "frozenset({" in p.read_text()
    ]
    assert declared == [f"{BOUNDARY}/compat.py"], declared
