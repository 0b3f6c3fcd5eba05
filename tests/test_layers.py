"""The package's layers (docs/concepts.md, "Layers"): no import up a layer, no import cycle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: where the installed package names live in the checkout (pyproject's package-dir)
SOURCES = {"blt_decode": ROOT / "blt_decode", "blt_decode.strategies": ROOT / "strategies",
           "blt_decode.backends": ROOT / "backends"}


def documented_layers() -> list[tuple[str, list[str]]]:
    """(layer, its places as checkout paths) in the order of docs/concepts.md's table, lowest first."""
    text = (ROOT / "docs" / "concepts.md").read_text()
    table = text[text.index("## Layers"):].split("\n## ")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "`" in line]
    return [(row.split("|")[1].strip(), re.findall(r"`([^`]+)`", row.split("|")[2])) for row in rows]


def modules() -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    found = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def layer_of(path: Path, layers: list[tuple[str, list[str]]]) -> int:
    rel = path.relative_to(ROOT).as_posix()
    hits = [i for i, (_, places) in enumerate(layers) for place in places
            if rel == place or (place.endswith("/") and rel.startswith(place))]
    assert len(hits) == 1, f"{rel} is in {len(hits)} layers of docs/concepts.md (must be in exactly one)"
    return hits[0]


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(path: Path, name: str, known: dict[str, Path]) -> set[str]:
    """The package modules ``path`` imports anywhere (function bodies too; ``if TYPE_CHECKING`` aside)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking_only(node):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:  # `from pkg import module` depends on the module, not the package face
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {m for m in found if m in known and m != name}


def graph() -> tuple[dict[str, Path], dict[str, set[str]]]:
    known = modules()
    return known, {name: imports(path, name, known) for name, path in known.items()}


def test_docs_list_every_folder_of_the_package_as_a_layer():
    layers = documented_layers()
    assert [name for name, _ in layers][:2] == ["base", "model"], layers
    places = {place for _, ps in layers for place in ps}
    for place in places:
        assert (ROOT / place).exists(), f"docs/concepts.md names {place}, which does not exist"
    folders = {f"blt_decode/{p.name}/" for p in (ROOT / "blt_decode").iterdir()
               if p.is_dir() and (p / "__init__.py").exists()}
    assert folders <= places, f"package folders missing from docs/concepts.md's layers: {sorted(folders - places)}"
    for path in modules().values():  # every module sits in exactly one layer
        layer_of(path, layers)


def test_no_module_imports_from_a_higher_layer():
    layers = documented_layers()
    known, edges = graph()
    wrong = []
    for name, targets in edges.items():
        mine = layer_of(known[name], layers)
        for target in targets:
            theirs = layer_of(known[target], layers)
            if theirs > mine:
                wrong.append(f"{name} ({layers[mine][0]}) imports {target} ({layers[theirs][0]})")
    assert not wrong, "imports up a layer:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles():
    _, edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def walk(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(edges[name]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                walk(target, path + [target])
        state[name] = 2

    for name in sorted(edges):
        if name not in state:
            walk(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_check_sees_an_import_up_a_layer(tmp_path):
    # the checker itself: a model module importing the engine is caught (and a TYPE_CHECKING one is not)
    source = tmp_path / "probe.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from blt_decode.decoding import session\n"
                      "def f():\n    from blt_decode.engine.core import Engine\n")
    known = modules()
    assert imports(source, "blt_decode.model.probe", known) == {"blt_decode.engine.core"}


def test_tests_mirror_the_layout():
    # a test folder is named after the layer folder (or the repository folder) whose code it tests
    folders = {p.name for p in (ROOT / "blt_decode").iterdir() if p.is_dir()} | {p.name for p in ROOT.iterdir() if p.is_dir()}
    tests = [p for p in (ROOT / "tests").iterdir() if p.is_dir() and not p.name.startswith((".", "_"))]
    assert tests, "tests/ has no folders"
    wrong = sorted(p.name for p in tests if p.name not in folders)
    assert not wrong, f"test folders named after no code folder: {wrong}"
