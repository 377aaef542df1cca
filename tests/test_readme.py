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
    ci = (README.parent / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in text, "README's test command and .ci/run differ"
    assert "pip install -q . && .venv/bin/sage-transport migrate\n" in text
