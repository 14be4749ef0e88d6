"""The dependency direction of docs/architecture.md, read from the source itself.

Every import statement counts, including ones inside functions (lazy imports), which a test
that only imports modules and inspects ``sys.modules`` cannot see.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Layers from the bottom up; a module may import its own layer and the layers below it.
LAYERS: dict[str, tuple[str, ...]] = {
    "core": ("secagg",),
    "privacy": ("privacy",),
    "federation": ("federation",),
    # The command line is the top layer: it parses, calls one public function and prints.
    "application": ("secagg.cli", "secagg.commands"),
}
ORDER = ("core", "privacy", "federation", "application")
# Third-party packages only some layers may use: the core runs with numpy + cryptography alone.
HEAVY = {"torch": "privacy", "opacus": "privacy", "ray": "federation", "grpc": "federation"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str | None:
    """The most specific layer whose prefix matches ``module``."""
    best, best_len = None, -1
    for layer, prefixes in LAYERS.items():
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = layer, len(prefix)
    return best


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
                found.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                found.add(node.module)
    return found


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
    source = "def f():\n    import federation.engine\n    from ..privacy import ledger\n"
    fake = tmp_path / "mod.py"
    fake.write_text(source)
    found = imports_of(fake, module="secagg.protocol.mod")
    assert found == {"federation.engine", "secagg.privacy"}
    assert layer_of("federation.engine") == "federation" and layer_of("secagg.commands.run") == "application"
