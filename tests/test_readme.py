"""The README's two commands: CI runs the test command verbatim."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    first_block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert first_block, "README.md must open with a bash block holding the two commands"
    return [line for line in first_block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_exactly_two_commands() -> None:
    assert len(readme_commands()) == 2


def test_ci_runs_the_readme_test_command() -> None:
    test_command = readme_commands()[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pytest" in test_command
    normalized = test_command.replace("pip install", "python3 -m pip install").replace("python -m", "python3 -m")
    assert normalized in ci, f"CI must run the README's test command: {test_command!r}"
