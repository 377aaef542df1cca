"""How long the emulated GPU computes: prefill per layer, decode per step.

Calibration (stated in every report):

* **Prefill.** Mooncake's vLLM v1 disaggregation run (Qwen3-8B, 32K-token prompt, TTFT 749.6 ms; the figure issue 10
  quotes) gives an effective rate: Qwen3-8B's prefill FLOPs for 32K tokens over 749.6 ms, i.e. 20.8 ms per layer.
  FLOPs per token per layer = 2 × (weights of the layer) + 2 × n × (query width) for causal attention over n tokens,
  so the same rate gives any model and prompt length its per-layer time (attention makes it grow faster than n).
* **Decode.** A step is bound by HBM bandwidth (H100 SXM: 3.35 TB/s): read every weight once plus each running
  request's KV, plus a fixed 2 ms of launch and sampling overhead.
"""

from __future__ import annotations

import dataclasses

from ..errors import ConfigError

__all__ = ["ComputeModel", "MODELS", "ModelCompute"]


@dataclasses.dataclass(frozen=True)
class ModelCompute:
    """What the compute emulation needs of a model."""

    name: str
    num_layers: int
    hidden: int  # query width (heads × head_dim)
    layer_params: float  # weights per layer
    kv_bytes_per_token: int  # K and V of all layers, bf16

    @property
    def weight_bytes(self) -> float:
        return self.num_layers * self.layer_params * 2

    def prefill_flops_per_layer(self, tokens: int) -> float:
        return tokens * (2 * self.layer_params + 2 * tokens * self.hidden)


MODELS = {
    # hidden, per-layer weights (attention projections + MLP): Qwen3-8B 4096 × (4096+2×1024+4096) + 3 × 4096 × 12288
    "qwen3-8b": ModelCompute("qwen3-8b", 36, 4096, 4096 * 10240 + 3 * 4096 * 12288, 36 * 2 * 8 * 128 * 2),
    # Qwen2.5-7B 3584 × (3584+2×512+3584) + 3 × 3584 × 18944
    "qwen2.5-7b": ModelCompute("qwen2.5-7b", 28, 3584, 3584 * 8192 + 3 * 3584 * 18944, 28 * 2 * 4 * 128 * 2),
}

_REFERENCE = MODELS["qwen3-8b"]
_REFERENCE_TOKENS, _REFERENCE_TTFT_S = 32768, 0.7496
#: FLOP/s the published run implies (Qwen3-8B prefill FLOPs at 32K over its TTFT)
PREFILL_RATE = _REFERENCE.num_layers * _REFERENCE.prefill_flops_per_layer(_REFERENCE_TOKENS) / _REFERENCE_TTFT_S
HBM_BYTES_PER_S = 3.35e12
STEP_OVERHEAD_S = 0.002


@dataclasses.dataclass(frozen=True)
class ComputeModel:
    """Emulated compute times for ``model``; ``scale`` stretches them all (1.0: the calibration above)."""

    model: ModelCompute
    scale: float = 1.0

    @classmethod
    def for_model(cls, name: str, scale: float = 1.0) -> ComputeModel:
        if name not in MODELS:
            raise ConfigError(f"model={name!r} has no compute calibration; choose one of {', '.join(MODELS)}")
        if not scale > 0:
            raise ConfigError(f"compute scale={scale!r} must be positive")
        return cls(MODELS[name], scale)

    def prefill_layer_s(self, tokens: int) -> float:
        """One layer of a ``tokens``-token prefill."""
        return self.scale * self.model.prefill_flops_per_layer(tokens) / PREFILL_RATE

    def prefill_s(self, tokens: int) -> float:
        return self.model.num_layers * self.prefill_layer_s(tokens)

    def decode_step_s(self, contexts: list[int]) -> float:
        """One decode step for running requests with these context lengths."""
        kv = sum(contexts) * self.model.kv_bytes_per_token
        return self.scale * (STEP_OVERHEAD_S + (self.model.weight_bytes + kv) / HBM_BYTES_PER_S)

    def describe(self) -> dict[str, float | str]:
        return {
            "model": self.model.name,
            "source": "Mooncake vLLM v1 run: Qwen3-8B, 32K prompt, TTFT 749.6 ms (prefill rate); H100 HBM 3.35 TB/s (decode)",
            "prefill_rate_tflops": round(PREFILL_RATE / 1e12, 1),
            "prefill_layer_ms_32k": round(self.prefill_layer_s(32768) * 1e3, 2),
            "prefill_ms_32k": round(self.prefill_s(32768) * 1e3, 1),
            "prefill_ms_128k": round(self.prefill_s(131072) * 1e3, 1),
            "decode_step_ms_1x32k": round(self.decode_step_s([32768]) * 1e3, 2),
            "scale": self.scale,
        }
