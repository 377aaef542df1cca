"""Engine adapters: each module imports without its engine installed and fails only when an adapter is built.

* :mod:`.vllm`: ``SageKVConnector``, a vLLM v1 KV connector (decode pulls the prefill's KV).
"""
