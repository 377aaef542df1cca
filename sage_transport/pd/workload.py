"""The request mix: Poisson arrivals, prompt lengths from 4K to 128K tokens, a fixed number of output tokens."""

from __future__ import annotations

import dataclasses
import random

from ..errors import ConfigError

__all__ = ["DEFAULT_LENGTHS", "Request", "poisson_mix", "saturating"]

#: prompt lengths and their weights in the mix (long contexts are the point; short ones keep decodes running)
DEFAULT_LENGTHS = {4096: 3, 8192: 2, 16384: 2, 32768: 3, 65536: 2, 131072: 1}


@dataclasses.dataclass(frozen=True)
class Request:
    """One request: it arrives ``arrival_s`` after the run starts with ``tokens`` of prompt, wants ``output_tokens``."""

    request_id: str
    arrival_s: float
    tokens: int
    output_tokens: int


def poisson_mix(
    count: int, rate_per_s: float, output_tokens: int, *, lengths: dict[int, int] | None = None, seed: int = 0
) -> list[Request]:
    """``count`` requests arriving as a Poisson process of ``rate_per_s``. Prompt lengths follow the weights, each
    length at least once when ``count`` allows (so every context length is measured), in a seeded random order."""
    if count <= 0 or not rate_per_s > 0 or output_tokens <= 0:
        raise ConfigError(f"requests={count}, rate={rate_per_s} and output_tokens={output_tokens} must be positive")
    lengths = lengths or DEFAULT_LENGTHS
    rng = random.Random(seed)
    total = sum(lengths.values())
    drawn = [n for n, w in lengths.items() for _ in range(max(1, round(count * w / total)))]
    while len(drawn) < count:
        drawn.append(rng.choices(list(lengths), list(lengths.values()))[0])
    rng.shuffle(drawn)
    if len(drawn) > count:  # keep one of each length first, then the rest in their shuffled order
        firsts: list[int] = []
        rest: list[int] = []
        for n in drawn:
            (rest if n in firsts else firsts).append(n)
        drawn = firsts + rest[: max(0, count - len(firsts))]
        rng.shuffle(drawn)
    at, out = 0.0, []
    for i, tokens in enumerate(drawn[:count]):
        out.append(Request(f"r{i}", at, tokens, output_tokens))
        at += rng.expovariate(rate_per_s)
    return out


def saturating(tokens: int, count: int, output_tokens: int, *, prefix: str = "s") -> list[Request]:
    """``count`` requests of ``tokens`` all arriving at once: the throughput of one context length."""
    return [Request(f"{prefix}{tokens // 1024}k-{i}", 0.0, tokens, output_tokens) for i in range(count)]
