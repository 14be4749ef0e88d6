"""The dependency direction of docs/architecture.md, read from the source itself.

Every import statement counts, including ones inside functions (lazy imports), which a test
that only imports modules and inspects ``sys.modules`` cannot see.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Layers from the bottom up; a module may import its own layer and the layers below it.
LAYERS: dict[str, tuple[str, ...]] = {
    "core": ("secagg",),
    "privacy": ("privacy",),
    "federation": ("federation",),
    # The command line is the top layer: it parses, calls one public function and prints.
    "application": ("secagg.cli", "secagg.commands", "secagg.__main__"),
}
ORDER = ("core", "privacy", "federation", "application")
# Third-party packages only some layers may use: the core runs with numpy + cryptography alone.
HEAVY = {"torch": "privacy", "opacus": "privacy", "ray": "federation", "grpc": "federation"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _most_specific(module: str, table: dict[str, tuple[str, ...]]) -> str | None:
    """The key of ``table`` whose longest prefix matches ``module``."""
    best, best_len = None, -1
    for key, prefixes in table.items():
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = key, len(prefix)
    return best


def layer_of(module: str) -> str | None:
    return _most_specific(module, LAYERS)


def imports_of(path: Path, module: str | None = None) -> set[str]:
    """Absolute module names imported anywhere in the file (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = (module or _module_name(path)).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            # `from secagg import wire` imports the module secagg.wire, not the package's __init__
            for alias in node.names:
                submodule = f"{origin}.{alias.name}"
                found.add(submodule if _is_module(submodule) else origin)
    return found


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _sources() -> list[Path]:
    return sorted(p for pkg in ("secagg", "privacy", "federation") for p in (ROOT / pkg).rglob("*.py"))


def test_the_layer_map_covers_every_source_file():
    assert _sources(), "no sources found"
    assert all(layer_of(_module_name(p)) for p in _sources())


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_a_layer_above_its_own(path: Path):
    own = ORDER.index(layer_of(_module_name(path)))
    for imported in imports_of(path):
        target = layer_of(imported)
        if target is not None:
            assert ORDER.index(target) <= own, f"{path.relative_to(ROOT)} ({ORDER[own]}) imports {imported} ({target})"
        top = imported.split(".")[0]
        if top in HEAVY:
            assert ORDER.index(HEAVY[top]) <= own, f"{path.relative_to(ROOT)} ({ORDER[own]}) imports {top}"


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    source = "def f():\n    import federation.engine\n    from .. import wire, no_such_module\n"
    fake = tmp_path / "mod.py"
    fake.write_text(source)
    found = imports_of(fake, module="secagg.protocol.mod")
    assert found == {"federation.engine", "secagg.wire", "secagg"}
    assert layer_of("federation.engine") == "federation" and layer_of("secagg.commands.run") == "application"


# The picture in docs/architecture.md: which part of the code imports which, generated from the
# source by the same AST walk. `SECAGG_WRITE_DOCS=1 pytest tests/test_layers.py` rewrites it.
PARTS: dict[str, tuple[str, ...]] = {
    "cli": ("secagg.cli", "secagg.commands", "secagg.__main__"),
    "federation.engine": ("federation",),
    "federation.transport": ("federation.transport",),
    "privacy": ("privacy",),
    "secagg.api": ("secagg.api", "secagg.bench"),
    # the round seam: interfaces, the one driver loop, the plain baseline mode
    "secagg.rounds": ("secagg.rounds", "secagg.plain"),
    "secagg.protocol": ("secagg.protocol",),
    "secagg.ckks": ("secagg.ckks",),
    # encodings, PRG, keys, Shamir, graphs, the wire format, errors, the result type
    "secagg.base": ("secagg",),
}
DIAGRAM_START, DIAGRAM_END = "<!-- layers:start (generated by tests/test_layers.py) -->", "<!-- layers:end -->"


def part_of(module: str) -> str | None:
    if module == "secagg":  # the package's __init__ re-exports the public API
        return "secagg.api"
    return _most_specific(module, PARTS)


def layer_diagram() -> str:
    """A mermaid graph of the import edges between the parts, from the source."""
    edges: set[tuple[str, str]] = set()
    for path in _sources():
        source = part_of(_module_name(path))
        for imported in imports_of(path):
            target = part_of(imported)
            if target and source and target != source:
                edges.add((source, target))
    lines = ["```mermaid", "graph TD"]
    lines += [f"    {a.replace('.', '_')}[{a}] --> {b.replace('.', '_')}[{b}]" for a, b in sorted(edges)]
    lines.append("```")
    return "\n".join(lines)


def test_every_source_file_belongs_to_a_part_of_the_picture():
    assert all(part_of(_module_name(p)) for p in _sources())


def test_the_architecture_picture_is_the_code():
    doc = ROOT / "docs" / "architecture.md"
    text = doc.read_text()
    start, end = text.index(DIAGRAM_START) + len(DIAGRAM_START), text.index(DIAGRAM_END)
    fresh = "\n" + layer_diagram() + "\n"
    if os.environ.get("SECAGG_WRITE_DOCS") == "1":
        doc.write_text(text[:start] + fresh + text[end:])
        text = doc.read_text()
        start, end = text.index(DIAGRAM_START) + len(DIAGRAM_START), text.index(DIAGRAM_END)
    assert text[start:end] == fresh, "docs/architecture.md is stale: run SECAGG_WRITE_DOCS=1 pytest tests/test_layers.py"
