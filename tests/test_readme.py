"""The README's example is real code: run it as written."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_transfer_example_runs() -> None:
    text = README.read_text()
    match = re.search(r"## `transfer\(plan\)` in one example\n\n```python\n(.*?)```", text, re.S)
    assert match, "README lost its transfer(plan) example"
    proc = subprocess.run([sys.executable, "-c", match.group(1)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "VERIFIED" in proc.stdout and "469762048 112" in proc.stdout


def test_readme_gives_the_two_setup_commands_that_ci_runs() -> None:
    text = README.read_text()
    test_command = "python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' && .venv/bin/pytest"
    assert f"```bash\n{test_command}\n```" in text, "README's test command changed: update this test and .ci/run"
    ci = (README.parent / ".ci" / "run").read_text().splitlines()
    assert test_command in ci, "README's test command is not a line of .ci/run"
    assert "pip install -q . && .venv/bin/sage-transport migrate\n" in text
