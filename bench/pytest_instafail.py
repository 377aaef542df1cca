"""A pytest plugin for the GPU machine (``-p pytest_instafail``, with bench/ on the path): each failure's report
is printed the moment the test fails, so a run that is cut at its time limit still shows why its tests failed;
a test still running after ``SAGE_TEST_DUMP_S`` seconds (default 25) has every asyncio task's stack taken then and
printed with its failure (output is captured while a test runs)."""

from __future__ import annotations

import asyncio
import gc
import io
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

_out = sys.__stdout__
_dumps: dict[str, str] = {}


def _dump(nodeid: str) -> None:
    text = io.StringIO()
    text.write(f"#### still running after {os.environ.get('SAGE_TEST_DUMP_S', '25')} s: its asyncio tasks\n")
    for loop in [o for o in gc.get_objects() if isinstance(o, asyncio.AbstractEventLoop)]:
        if not loop.is_running():
            continue
        for task in list(asyncio.all_tasks(loop)):
            text.write(f"-- {task!r}\n")
            task.print_stack(limit=12, file=text)
    _dumps[nodeid] = text.getvalue()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: Any) -> Iterator[None]:
    timer = threading.Timer(float(os.environ.get("SAGE_TEST_DUMP_S", "25")), _dump, (item.nodeid,))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def pytest_runtest_logreport(report: Any) -> None:
    if report.failed:
        _out.write(f"\n==== FAILED {report.nodeid} ({report.when}, {report.duration:.1f} s)\n{report.longreprtext}\n")
        for name, content in report.sections:  # captured output and log lines, their ends
            _out.write(f"---- {name}\n{content[-3000:]}\n")
        _out.write(_dumps.pop(report.nodeid, ""))
    elif report.when == "call":
        _out.write(f"\n---- {report.outcome} {report.nodeid} ({report.duration:.1f} s)\n")
    _out.flush()
