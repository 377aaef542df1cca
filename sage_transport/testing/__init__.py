"""Test support shipped with the package: the transport conformance kit and pair factories."""

from .conformance import CONFORMANCE_CHECKS, ConnectedPair, PairFactory, local_pair, mock_pair

__all__ = ["CONFORMANCE_CHECKS", "ConnectedPair", "PairFactory", "local_pair", "mock_pair"]
