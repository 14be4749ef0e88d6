"""Every Python block in README.md and docs/*.md runs as written.

The blocks of one file run in order in one namespace (a page may build an example over
several blocks), in a temporary working directory. An expression statement whose line ends
in a bare number (``privacy.epsilon(...)  # 2.32``) must give that number to the digits
shown. A block that cannot run here is marked in the page itself, visibly, with
``<!-- not-run: reason -->`` on the line before it; it is still compiled, and the marker is
listed by :func:`test_not_run_blocks_say_why_and_compile`. Nothing is skipped silently.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(
    r"(?:^<!--\s*not-run:\s*(?P<reason>[^>]*?)\s*-->\s*\n)?^```python[ \t]*\n(?P<code>.*?)^```[ \t]*$",
    flags=re.S | re.M,
)
SHOWN_NUMBER = re.compile(r"#\s*(-?\d+(?:\.\d+)?)\s*$")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # line of the first code line in the page
    code: str
    not_run: str | None


def blocks(page: Path) -> list[Block]:
    text = page.read_text()
    out = []
    for m in BLOCK.finditer(text):
        line = text.count("\n", 0, m.start("code")) + 1
        out.append(Block(page, line, m.group("code"), m.group("reason")))
    return out


def _where(block: Block) -> str:
    return f"{block.page.relative_to(ROOT)}:{block.line}"


def run_block(block: Block, namespace: dict) -> None:
    """Execute one block statement by statement; check numbers shown in end-of-line comments."""
    tree = ast.parse(block.code, filename=str(block.page))
    ast.increment_lineno(tree, block.line - 1)  # tracebacks point at the page's own lines
    lines = block.code.splitlines()
    filename = str(block.page)
    for node in tree.body:
        last = lines[node.end_lineno - block.line]
        shown = SHOWN_NUMBER.search(last)
        if isinstance(node, ast.Expr) and shown:
            value = eval(compile(ast.Expression(node.value), filename, "eval"), namespace)
            text = shown.group(1)
            digits = len(text.split(".")[1]) if "." in text else 0
            got = round(float(value), digits)
            assert got == float(text), (
                f"{block.page.relative_to(ROOT)}:{node.end_lineno} shows {text} but the code gives {value!r}; "
                f"update the comment to {got}")
        else:
            exec(compile(ast.Module([node], type_ignores=[]), filename, "exec"), namespace)


#: pages whose blocks another test runs (and checks what they leave behind); not run twice
RUN_BY = {ROOT / "docs" / "quickstart.md": ROOT / "tests" / "test_quickstart.py"}
PAGES_WITH_CODE = [p for p in PAGES if p not in RUN_BY and any(b.not_run is None for b in blocks(p))]


def test_pages_run_elsewhere_are_run_there():
    for page, test in RUN_BY.items():
        assert f'"{page.name}"' in test.read_text(), f"{test.name} must run every block of {page.name}"


#: pages whose blocks take long on a 2-core machine run in the slow suite (`make test-slow`)
SLOW = {
    ROOT / "README.md": "100 clients x 10^4 parameters through masking and CKKS, ~50 s",
    ROOT / "docs" / "accounting.md": "PRV accounting over 14,062 steps, ~30 s",
}


@pytest.mark.parametrize("page", [pytest.param(p, marks=[pytest.mark.slow] if p in SLOW else [])
                                  for p in PAGES_WITH_CODE],
                         ids=[str(p.relative_to(ROOT)) for p in PAGES_WITH_CODE])
def test_python_blocks_run(page, tmp_path, monkeypatch):
    pytest.importorskip("torch")
    import torch

    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__main__"}
    for block in blocks(page):
        if block.not_run is None:
            run_block(block, namespace)


def test_not_run_blocks_say_why_and_compile():
    marked = [b for p in PAGES for b in blocks(p) if b.not_run is not None]
    for block in marked:
        assert len(block.not_run.strip()) >= 10, f"{_where(block)}: say why the block cannot run here"
        compile(block.code, _where(block), "exec")
    # kept rare on purpose: a page's examples are meant to run
    assert len(marked) <= 3, [_where(b) for b in marked]


def test_the_block_finder_sees_markers():
    page = ROOT / "README.md"
    found = blocks(page)
    assert found and all(b.code.strip() for b in found)
    sample = "text\n<!-- not-run: needs a GPU cluster -->\n```python\nx = 1\n```\n```python\ny = 2\n```\n"
    got = [(m.group("reason"), m.group("code")) for m in BLOCK.finditer(sample)]
    assert got == [("needs a GPU cluster", "x = 1\n"), (None, "y = 2\n")]
