"""Device-resident KV (GPU memory): moved on the device, never through a host copy it does not need.

* :mod:`.runtime`: the channel's own CUDA stream, events polled from the loop, pinned staging; an emulated
  runtime that runs the same torch operations on host tensors (tests without a GPU).
* :mod:`.kv`: a chunk's gather, scatter, checksum and codec as a few batched kernels per chunk.
* :mod:`.checksum`: fletcher64, reduced where the bytes are; its host form verifies the same value.
* :mod:`.ipc`: CUDA IPC windows for same-host placement straight into a peer's device KV.
"""

from .checksum import fletcher64, fletcher64_pieces
from .kv import DeviceKV
from .runtime import CudaRuntime, DeviceRuntime, EmulatedRuntime

__all__ = ["CudaRuntime", "DeviceKV", "DeviceRuntime", "EmulatedRuntime", "fletcher64", "fletcher64_pieces"]
