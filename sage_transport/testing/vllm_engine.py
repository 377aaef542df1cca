"""A real vLLM engine with :class:`~sage_transport.integrations.vllm.SageKVConnector`, in a process of its own.

For end-to-end checks and benchmarks of prefill/decode disaggregation without a model hub: :func:`write_tiny_llama`
writes a two-layer Llama checkpoint (random weights, seeded, large enough that the KV decides the output), and
:class:`EngineProcess` starts ``python -m sage_transport.testing.vllm_engine`` with it: a :class:`vllm.LLM` built
from the given ``kv_transfer_config`` and tensor-parallel size, driven by JSON lines on stdin, answering JSON lines on
stdout (prefixed ``@@``: vLLM's own logs share that stream). Commands:

* ``{"generate": [{"id", "prompt": [token ids], "max_tokens", "kv_transfer_params"?}, ...]}``: one
  :meth:`vllm.LLM.generate` call; answers per request ``id``, ``token_ids``, ``kv_transfer_params``,
  ``finish_reason`` and ``seconds`` (the batch's wall time).
* ``{"digests": {"blocks": [ids]}}``: per TP rank, a digest of each block's pages in every layer, read by
  :class:`KVInspector` (a vLLM worker extension) from the worker's own KV cache.
* ``{"loads": {}}``: per TP rank, the connector's recent pulls (request, transfer, remote and local blocks).
* ``{"stats": {}}``: a ``kv_transfer_params``-free health check (answers ``{"alive": true}``).

Needs vLLM (the ``.ci/engines`` venv); importing this module does not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

__all__ = ["EngineProcess", "KVInspector", "write_tiny_llama"]

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256, "intermediate_size": 512,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "num_hidden_layers": 2, "vocab_size": 512,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "torch_dtype": "float32", "rope_theta": 10000.0,
    "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "initializer_range": 0.3,
}  # fmt: skip


def write_tiny_llama(path: str | Path, seed: int = 0) -> Path:
    """A two-layer Llama (2 KV heads of 64, vocabulary 512) with seeded random weights, as a local checkpoint, and
    a word-level tokenizer (token ``i`` is the word ``t<i>``) so that vLLM's API server serves it as it is.

    ``initializer_range`` 0.3 (not 0.02) so that attention is sharp: what a request's KV holds changes its output.
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    if (path / "model.safetensors").exists() and (path / "tokenizer.json").exists():
        return path
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))
    model.save_pretrained(path, safe_serialization=True)
    vocab_size = int(TINY_LLAMA["vocab_size"])  # type: ignore[call-overload]
    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="t0", bos_token="t1", eos_token="t2").save_pretrained(path)
    return path


class KVInspector:
    """A vLLM worker extension (``worker_extension_cls``): digests of the worker's own KV blocks, and the
    connector's recent pulls, reachable through :meth:`vllm.LLM.collective_rpc`."""

    def sage_block_digests(self, blocks: Sequence[int]) -> dict[str, Any]:
        import hashlib

        from vllm.distributed.kv_transfer import get_kv_transfer_group

        connector = get_kv_transfer_group()
        paged = connector._paged
        page = paged.schema.page_bytes
        digests: dict[str, str] = {}
        for block in blocks:
            h = hashlib.blake2b(digest_size=16)
            for layer in range(paged.schema.num_layers):
                buffer, offset = _page_of(paged, layer, block, page)
                h.update(buffer[offset : offset + page].numpy().tobytes())
            digests[str(block)] = h.hexdigest()
        return {"tp_rank": connector._tp_rank, "digests": digests}

    def sage_recent_loads(self) -> dict[str, Any]:
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        connector = get_kv_transfer_group()
        return {"tp_rank": connector._tp_rank, "loads": list(connector.recent_loads.copy())}  # appended on the loop


def _page_of(paged: Any, layer: int, block: int, page: int) -> tuple[Any, int]:
    """The buffer (as bytes) holding a page of one schema layer and block, and the page's byte offset in it,
    addressed as the channel addresses it (``KVGeometry.strides``); ``paged.schema`` has one plane."""
    import torch

    from ..memory import KVMemory

    geometry = KVMemory(paged.schema, paged.num_blocks, list(paged.buffers)).geometry
    in_buffer, segment = geometry.strides(paged.schema)
    index = {"layer": layer, "plane": 0, "block": block}
    buffer = sum(index[axis] * stride for axis, stride in segment.items())
    offset = sum(index[axis] * stride for axis, stride in in_buffer.items()) * page
    return paged.buffers[buffer].view(torch.uint8), offset


def _sampling(sampling_params: Any, job: dict[str, Any]) -> Any:
    params = job.get("kv_transfer_params")
    extra = {"kv_transfer_params": params} if params else None
    return sampling_params(max_tokens=job["max_tokens"], temperature=0, detokenize=False, extra_args=extra)


def _result(job: dict[str, Any], out: Any, seconds: float) -> dict[str, Any]:
    first = out.outputs[0]
    return {
        "id": job["id"], "token_ids": list(first.token_ids), "finish_reason": first.finish_reason,
        "kv_transfer_params": out.kv_transfer_params, "seconds": seconds,
    }  # fmt: skip


def _serve(model: str, kv_config: dict[str, Any], tensor_parallel_size: int, kv_cache_mb: int) -> None:
    import structlog
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # stdout carries the answers

    llm = LLM(
        model=model, load_format="safetensors", skip_tokenizer_init=True, dtype="float16", max_model_len=4096,
        enforce_eager=True, seed=0, tensor_parallel_size=tensor_parallel_size, kv_cache_memory_bytes=kv_cache_mb << 20,
        kv_transfer_config=kv_config or None, worker_extension_cls="sage_transport.testing.vllm_engine.KVInspector",
        enable_prefix_caching=False,
    )  # fmt: skip

    def answer(payload: Any) -> None:
        print("@@" + json.dumps(payload), flush=True)

    answer({"ready": True})
    for line in sys.stdin:
        command = json.loads(line)
        if "generate" in command:
            jobs = command["generate"]
            prompts = [TokensPrompt(prompt_token_ids=job["prompt"]) for job in jobs]
            params = [_sampling(SamplingParams, job) for job in jobs]
            started = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            seconds = time.perf_counter() - started
            answer({"results": [_result(job, out, seconds) for job, out in zip(jobs, outputs)]})
        elif "digests" in command:
            answer({"ranks": llm.collective_rpc("sage_block_digests", args=(command["digests"]["blocks"],))})
        elif "loads" in command:
            answer({"ranks": llm.collective_rpc("sage_recent_loads")})
        else:
            answer({"alive": True})


class EngineProcess:
    """A vLLM engine in a child process (see the module docstring); ``kv_role`` ``None`` runs it without a
    connector. ``extra`` goes to ``kv_connector_extra_config``; ``kv_failure_policy`` to vLLM's
    ``kv_load_failure_policy``."""

    def __init__(
        self, model: str | Path, kv_role: str | None, *, extra: dict[str, Any] | None = None, tensor_parallel_size: int = 1,
        kv_cache_mb: int = 64, kv_failure_policy: str = "fail", env: dict[str, str] | None = None,
        log_path: str | Path | None = None, wait: bool = True,
    ) -> None:  # fmt: skip
        kv_config: dict[str, Any] = {}
        if kv_role is not None:
            kv_config = {
                "kv_connector": "SageKVConnector", "kv_role": kv_role,
                "kv_connector_module_path": "sage_transport.integrations.vllm",
                "kv_connector_extra_config": dict(extra or {}), "kv_load_failure_policy": kv_failure_policy,
            }  # fmt: skip
        argv = [sys.executable, "-m", "sage_transport.testing.vllm_engine", str(model), json.dumps(kv_config),
                str(tensor_parallel_size), str(kv_cache_mb)]  # fmt: skip
        # several engines share the cores here: unbound OpenMP threads that sleep when idle (spinning ones steal
        # the next engine's time)
        child_env = {
            **os.environ, "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONWARNINGS": "ignore",
            **(env or {}),
        }  # fmt: skip
        self.log_path = Path(log_path) if log_path else None
        self._log: IO[str] | None = open(self.log_path, "w") if self.log_path else None
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log or subprocess.DEVNULL, text=True, env=child_env
        )
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout_s: float = 600) -> None:
        """Until the engine is built (start several with ``wait=False`` first: they build in parallel)."""
        self.read(timeout_s)

    def read(self, timeout_s: float = 300) -> dict[str, Any]:
        """The child's next answer (its log lines are skipped)."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        for line in self.proc.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])  # type: ignore[no-any-return]
            if self._log is not None:
                self._log.write(line)  # vLLM logs to stdout too
            if time.monotonic() > deadline:
                break
        tail = self.log_path.read_text()[-3000:] if self.log_path and self.log_path.exists() else ""
        raise RuntimeError(f"the vLLM engine process ended or stalled without answering (exit {self.proc.poll()}):\n{tail}")

    def ask(self, command: dict[str, Any], timeout_s: float = 300) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self.read(timeout_s)

    def generate(self, jobs: list[dict[str, Any]], timeout_s: float = 300) -> dict[str, dict[str, Any]]:
        """Run one batch; results by request id."""
        return {r["id"]: r for r in self.ask({"generate": jobs}, timeout_s)["results"]}

    def alive(self) -> bool:
        return self.proc.poll() is None and self.ask({"stats": {}}, 60) == {"alive": True}

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if self._log is not None:
            self._log.close()

    def __enter__(self) -> EngineProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    _serve(sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
