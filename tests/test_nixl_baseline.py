"""The PD bench's NIXL baseline runs NIXL the way vLLM's NixlConnector does, and still works: descriptor lists
prepared once, every request's READ posted without blocking and all in flight together, each notifying the target
with its request id, bytes exact; sage_transport moves the same pages exactly (``bench/nixl_link_check.py``, in a
process of its own: NIXL's bundled libucx cannot share one with ucxx). Runs where NIXL is installed (CI's engine
step installs nixl-cu12)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("nixl_cu12", reason="NIXL is not installed (pip install --no-deps nixl-cu12; .ci/engines does)")

CHECK = Path(__file__).resolve().parents[1] / "bench" / "nixl_link_check.py"


def test_the_nixl_baseline_posts_prepped_reads_in_flight_together_and_both_land_exactly() -> None:
    argv = [sys.executable, str(CHECK), "--model-layers", "4", "--blocks", "256", "--requests", "6", "--per-request", "16"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["nixl_states"] == ["DONE"] and result["nixl_exact"] is True
    assert result["nixl_dlists_prepared_after_init"] == 1  # the remote pool's, at the handshake: none per request
    assert result["all_notified"] is True, result["notified"]  # the target learnt each request id, as vLLM's does
    assert result["sage_exact"] is True
    assert result["nixl_s"] > 0 and result["sage_s"] > 0
