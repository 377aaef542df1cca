"""Engine adapters: each module imports without its engine installed and fails only when an adapter is built.

* :mod:`.vllm`: ``SageKVConnector``, a vLLM v1 KV connector (decode pulls the prefill's KV).
* :mod:`.lmdeploy`: ``SageMigrationBackend``, an LMDeploy PD migration backend (decode pulls; registered on import).
* :mod:`.sagellm`: ``SageCommBackend`` (sageLLM's comm backend, registered on import) and ``SageKVTransferBackend``
  (the transfer backend of sageLLM's ``KVTransferEngine``).
* :mod:`.sagellm_runtime`: ``KVRuntimeBridge``, sageLLM's kv_runtime migration plans as our transfers.
"""
