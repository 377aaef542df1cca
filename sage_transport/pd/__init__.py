"""``sage-transport bench pd``: prefill→decode disaggregation, emulated on a CPU-only machine with real KV.

A prefill process and one or more decode instances (this process, and child processes for ``decodes`` > 1) run an
engine's step loop. Compute is emulated by waits
calibrated from published GPU timings (:mod:`.timing`), so the CPUs stay free for the transport as they would on a
GPU machine; the KV cache has the model's shape, is paged, lands in shuffled destination blocks and really moves
between the processes. A Poisson request mix (:mod:`.workload`) runs once per variant, with the same arrivals:

* ``a``: transfer after the prefill completes, one READ per request over per-page descriptors prepared once, posted
  without blocking and several in flight, the way vLLM's NixlConnector drives NIXL (:mod:`.nixl_peer`; with NIXL
  itself when ``nixl`` / ``nixl-cu12`` is installed, else one sage_transport message per block);
* ``b``: sage_transport, pulled after the prefill completes (no layer-wise overlap);
* ``c``: sage_transport, pulled when the request arrives and served layer by layer as the prefill computes it,
  decode-critical ahead of a bulk migration stream that runs in every variant.

:mod:`.report` turns the per-request records into TTFT/TPOT percentiles, transfer time hidden behind compute and
tokens/s, per context length and overall (JSON, Markdown, PNG).
"""
