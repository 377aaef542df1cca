"""``sage-transport bench pd``: the compute calibration, the request mix, the figures, and a small real run of the
sage_transport variants between two processes (the full bench lives in bench/, its figures in bench/README.md)."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
from pathlib import Path

import pytest

from sage_transport.cli import main
from sage_transport.errors import ConfigError
from sage_transport.pd.decode import run_variant
from sage_transport.pd.report import summarise, targets
from sage_transport.pd.timing import ComputeModel
from sage_transport.pd.workload import poisson_mix, saturating


def test_the_calibration_reproduces_the_published_run_and_grows_faster_than_the_prompt() -> None:
    qwen3 = ComputeModel.for_model("qwen3-8b")
    assert math.isclose(qwen3.prefill_s(32768), 0.7496, rel_tol=1e-9)
    assert math.isclose(qwen3.prefill_layer_s(32768) * 1e3, 749.6 / 36, rel_tol=1e-9)
    qwen25 = ComputeModel.for_model("qwen2.5-7b")
    assert qwen25.prefill_s(131072) > 4 * qwen25.prefill_s(32768)  # attention: more than linear
    assert qwen25.decode_step_s([131072]) > qwen25.decode_step_s([4096]) > 0.002
    assert math.isclose(ComputeModel.for_model("qwen2.5-7b", 2.0).prefill_s(4096), 2 * qwen25.prefill_s(4096))
    with pytest.raises(ConfigError, match="model='llama' has no compute calibration"):
        ComputeModel.for_model("llama")


def test_the_mix_is_poisson_and_seeded_and_saturating_runs_arrive_together() -> None:
    mix = poisson_mix(400, 2.0, 16, lengths={4096: 1, 131072: 1}, seed=3)
    assert mix == poisson_mix(400, 2.0, 16, lengths={4096: 1, 131072: 1}, seed=3)
    gaps = [b.arrival_s - a.arrival_s for a, b in itertools.pairwise(mix)]
    assert 0.4 < sum(gaps) / len(gaps) < 0.6  # mean inter-arrival 1/rate
    assert {r.tokens for r in mix} == {4096, 131072}
    together = saturating(32768, 3, 8)
    assert [r.arrival_s for r in together] == [0.0] * 3 and together[0].request_id == "s32k-0"
    with pytest.raises(ConfigError, match="rate=0"):
        poisson_mix(3, 0, 8)


def record(rid: str, tokens: int, prefill: tuple[float, float], transfer: tuple[float, float], first: float) -> dict:
    return {
        "request_id": rid, "tokens": tokens, "output_tokens": 3, "kv_bytes": 10**9, "arrival": 0.0, "error": "",
        "prefill_start": prefill[0], "prefill_end": prefill[1], "transfer_start": transfer[0], "kv_ready": transfer[1],
        "token_times": [first, first + 0.01, first + 0.02],
    }  # fmt: skip


def test_figures_count_transfer_time_hidden_behind_the_prefill_and_check_the_targets() -> None:
    after = {"variant": "a", "description": "", "elapsed_s": 3, "records": [record("x", 32768, (0, 1), (1, 2), 2.1)]}
    overlapped = {"variant": "c", "description": "", "elapsed_s": 2, "records": [record("x", 32768, (0, 1), (0, 1.2), 1.3)]}
    a, c = summarise(after), summarise(overlapped)
    assert a["transfer_hidden_fraction"] == 0 and a["transfer_exposed_ms"] == pytest.approx(1000)
    assert c["transfer_hidden_ms"] == pytest.approx(1000) and c["transfer_exposed_ms"] == pytest.approx(200)
    assert c["ttft_p50_ms"] == pytest.approx(1300) and c["tpot_p50_ms"] == pytest.approx(10)
    assert c["by_length"]["32K"]["ttft_p50_ms"] == pytest.approx(1300)
    checks = {t["target"]: t["met"] for t in targets({"mix_runs": [a, c], "saturating": {}})}
    assert checks == {"TTFT p50 at 32K ≥10% lower": True, "TPOT p99 no worse than 5%": True}


def test_layer_wise_overlap_hides_the_transfer_between_real_processes() -> None:
    mix = poisson_mix(2, 1.0, 4, lengths={16384: 1}, seed=1)

    async def both() -> tuple[dict, dict]:
        after = await run_variant("b", mix, bulk_gbps=0.2, bulk_mib=16)
        overlapped = await run_variant("c", mix, bulk_gbps=0.2, bulk_mib=16)
        return summarise(after), summarise(overlapped)

    b, c = asyncio.run(both())
    assert b["completed"] == c["completed"] == 2, (b["errors"], c["errors"])
    assert b["transfer_hidden_fraction"] == 0 and c["transfer_hidden_fraction"] > 0.3
    assert c["ttft_p50_ms"] < b["ttft_p50_ms"]


def test_requests_are_dealt_to_several_decode_processes() -> None:
    run = asyncio.run(run_variant("c", poisson_mix(4, 4.0, 3, lengths={4096: 1}), bulk_gbps=0.1, bulk_mib=8, decodes=2))
    figures = summarise(run)
    assert figures["completed"] == 4, figures["errors"]
    assert run["decodes"] == 2 and {r["instance"] for r in run["records"]} == {"decode0", "decode1"}
    assert run["decode_steps"] >= 2 * 3


def test_variant_a_without_nixl_moves_one_message_per_block_after_the_prefill(monkeypatch: pytest.MonkeyPatch) -> None:
    import sage_transport.pd.decode as decode

    monkeypatch.setattr(decode, "nixl_api", lambda: None)  # as where NIXL is not installed
    run = asyncio.run(run_variant("a", poisson_mix(1, 1.0, 2, lengths={4096: 1}), bulk_gbps=0))
    figures = summarise(run)
    assert not run["nixl"] and figures["completed"] == 1 and figures["transfer_hidden_fraction"] == 0


def test_the_cli_refuses_bad_arguments_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "pd", "--variants", "a,z"]) == 2
    assert "--variants='a,z'" in capsys.readouterr().err
    assert main(["bench", "pd", "--lengths", "4K:1,lots:2"]) == 2
    assert "--lengths: 'lots' is not a token count" in capsys.readouterr().err


def test_one_command_writes_the_json_and_markdown_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    json_path, md_path = tmp_path / "pd.json", tmp_path / "pd.md"
    argv = ["bench", "pd", "--variants", "b,c", "--requests", "2", "--rate", "2", "--output-tokens", "4", "--lengths", "4K:1"]
    argv += ["--saturate", "4K", "--saturate-count", "2", "--bulk-gbps", "0.1", "--json", str(json_path), "--md", str(md_path)]
    assert main(argv) == 0
    record = json.loads(json_path.read_text())
    for variant in ("b", "c"):
        assert record[f"{variant}_ttft_p50_ms"] > 0 and record[f"{variant}_tpot_p99_ms"] > 0
        assert record[f"{variant}_tokens_per_s"] > 0
    assert sorted(record["raw"]) == ["4K-b", "4K-c", "mix-b", "mix-c"]
    assert [s["variant"] for s in record["saturating"]["4K"]] == ["b", "c"]
    assert md_path.read_text() == capsys.readouterr().out
    assert "## Request mix, overall" in md_path.read_text()


def test_a_pull_asked_ahead_that_comes_after_its_whole_prefill_is_still_served() -> None:
    """Variant c asks before the prefill, but a slow decode's pull may reach the prefill only once every layer is
    computed (the regression behind the two-decode hang): it must be served from the finished blocks, not wait."""
    from sage_transport.channel import KVTransferChannel
    from sage_transport.config import KVTransportConfig
    from sage_transport.memory import KVMemory
    from sage_transport.pd.prefill import PrefillInstance
    from sage_transport.plan import TransferPlan

    async def scenario() -> None:
        prefill = PrefillInstance("qwen2.5-7b", 8, KVTransportConfig(allow_pull=True), seed=1, scale=0.01)
        async with prefill.channel:
            prefill.channel.register(prefill.pool)
            prefill.channel.pull_resolver = prefill.resolve
            address = await prefill.channel.listen()
            worker = asyncio.ensure_future(prefill.prefills())
            prefill.early.add("late")
            prefill.queue.put_nowait({"id": "late", "tokens": 32})
            while "late" not in prefill.prefilled_early:  # the whole prefill runs before anyone asks
                await asyncio.sleep(0.005)
            schema = prefill.schema
            memory = KVMemory.allocate(schema, 4, fill=0)
            async with KVTransferChannel(None, KVTransportConfig(), name="decode") as decode:
                decode.register(memory)
                peer = await decode.connect(address)
                plan = TransferPlan.for_blocks(peer, schema, [2, 3], [2, 3], transfer_id="late")
                result = await asyncio.wait_for(decode.pull(plan), 10)
            worker.cancel()
        assert result.chunks > 0 and result.bytes == 2 * schema.bytes_per_block
        assert "late" not in prefill.prefilled_early and "late" not in prefill.serving
        landed = sum(bytes(view).count(0x5A) for view in memory.views)  # the prefill's pool bytes, nothing else
        assert landed == 2 * schema.bytes_per_block

    asyncio.run(scenario())
