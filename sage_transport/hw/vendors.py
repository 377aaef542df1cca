"""How a vendor probe runs: find its tool, run it with a deadline, parse the output, never raise.

A :class:`ToolProbe` is data (the tool, its arguments, a parser from text to :class:`VendorResult`); the
:class:`ProbeEnv` supplies ``which`` and ``run`` so tests feed recorded outputs instead of running tools.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .model import ProbeStatus, VendorResult

__all__ = ["ProbeEnv", "ToolError", "ToolProbe", "run_tool"]

#: A vendor tool that does not answer within this many seconds is reported unavailable.
TOOL_TIMEOUT_S = 5.0


class ToolError(Exception):
    """A tool could not be run or exited with an error (the message says which and why)."""


def run_tool(argv: Sequence[str], timeout: float = TOOL_TIMEOUT_S) -> str:
    """Run ``argv`` and return its standard output; raise :class:`ToolError` on failure or timeout."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise ToolError(f"`{' '.join(argv)}` did not finish within {timeout:g} s") from None
    except OSError as exc:
        raise ToolError(f"`{' '.join(argv)}` could not run: {exc}") from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ToolError(f"`{' '.join(argv)}` exited with status {done.returncode}: {detail[0]}")
    return done.stdout


@dataclass(frozen=True)
class ProbeEnv:
    """Where probes look: the sysfs and procfs roots, how to find a tool, how to run one."""

    sys_root: Path = Path("/sys")
    proc_root: Path = Path("/proc")
    which: Callable[[str], str | None] = shutil.which
    run: Callable[[Sequence[str]], str] = run_tool
    nvml: object | None = field(default=None)  # a pynvml-like module or nvidia.NVML_MISSING (tests); None: import lazily


@dataclass(frozen=True)
class ToolProbe:
    """A probe that runs ``tool`` with ``args`` and parses its output with ``parse``.

    ``parse`` raises ``ValueError`` when the output is not what it expects; the probe then reports
    ``available=False`` with that reason.
    """

    name: str
    tool: str
    args: tuple[str, ...]
    parse: Callable[[str], VendorResult]

    def probe(self, env: ProbeEnv) -> tuple[ProbeStatus, VendorResult]:
        start = time.perf_counter()

        def status(available: bool, reason: str, result: VendorResult | None = None) -> ProbeStatus:
            return ProbeStatus(
                name=self.name, available=available, reason=reason,
                devices=len(result.devices) if result else 0, links=len(result.links) if result else 0,
                elapsed_ms=round((time.perf_counter() - start) * 1e3, 3),
            )  # fmt: skip

        path = env.which(self.tool)
        if path is None:
            return status(False, f"{self.tool} not found on PATH"), VendorResult()
        command = " ".join((self.tool, *self.args))
        try:
            text = env.run([path, *self.args])
        except ToolError as exc:
            return status(False, str(exc)), VendorResult()
        try:
            result = self.parse(text)
        except (ValueError, KeyError, IndexError) as exc:
            return status(False, f"`{command}` printed nothing this probe understands: {exc}"), VendorResult()
        if not result.devices:
            return status(False, f"`{command}` lists no devices", result), result
        return status(True, f"`{command}`", result), result
