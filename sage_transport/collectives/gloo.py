"""Gloo through torch.distributed (CPU tensors): the collective backend every machine here has."""

from __future__ import annotations

import datetime
from typing import Any, ClassVar

from .torch_backend import TorchProcessGroupBackend

__all__ = ["GlooBackend"]


class GlooBackend(TorchProcessGroupBackend):
    """``ProcessGroupGloo`` on CPU tensors; ``avg`` is a sum divided here (Gloo has no average)."""

    name: ClassVar[str] = "gloo"
    devices: ClassVar[frozenset[str]] = frozenset({"cpu"})

    def _make_group(self, store: Any, rank: int, world_size: int, timeout: datetime.timedelta) -> Any:
        import torch.distributed as dist

        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
