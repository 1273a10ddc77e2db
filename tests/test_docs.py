"""Every ```python block of README.md and docs/*.md runs (blocks of one page share a namespace, top to bottom).

A block preceded by the line ``<!-- norun -->`` is skipped (it needs data, a GPU or minutes of CPU).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- norun -->\s*\n)?```python\n(.*?)```", re.S)


def blocks(page: Path) -> list[str]:
    return [code for skip, code in BLOCK.findall(page.read_text()) if not skip]


@pytest.mark.parametrize("page", [p for p in PAGES if p.exists()], ids=lambda p: p.name)
def test_page_examples_run(page: Path) -> None:
    code = blocks(page)
    if not code:
        pytest.skip(f"{page.name} has no runnable python block")
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for i, source in enumerate(code):
        try:
            exec(compile(source, f"{page.name}[block {i}]", "exec"), namespace)
        except Exception as err:  # noqa: BLE001 - re-raised with the page and block named
            raise AssertionError(f"{page.name}, python block {i} failed: {err!r}\n{source}") from err
