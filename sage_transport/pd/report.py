"""From per-request records to the figures issue 10 asks for: TTFT and TPOT p50/p99, KV-transfer time hidden behind
compute, end-to-end tokens/s, per context length and overall; Markdown and PNG renderings."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["markdown", "plot", "summarise"]

BUCKETS = {"32K": 32768, "64K": 65536, "128K": 131072}


def _pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def _figures(records: list[dict[str, Any]]) -> dict[str, Any]:
    done = [r for r in records if not r["error"] and r["token_times"]]
    ttft = [r["token_times"][0] * 1e3 for r in done]
    tpot = [
        (r["token_times"][-1] - r["token_times"][0]) / (len(r["token_times"]) - 1) * 1e3
        for r in done
        if len(r["token_times"]) > 1
    ]
    hidden = exposed = 0.0
    for r in done:
        hidden += _overlap(r["transfer_start"], r["kv_ready"], r["prefill_start"], r["prefill_end"])
        exposed += max(0.0, r["kv_ready"] - max(r["prefill_end"], r["transfer_start"]))
    tokens = sum(len(r["token_times"]) for r in done)
    span = max((r["arrival"] + r["token_times"][-1] for r in done), default=0.0) - min((r["arrival"] for r in done), default=0.0)
    return {
        "requests": len(records), "completed": len(done), "errors": [r["error"] for r in records if r["error"]][:5],
        "ttft_p50_ms": _pct(ttft, 0.5), "ttft_p99_ms": _pct(ttft, 0.99),
        "tpot_p50_ms": _pct(tpot, 0.5), "tpot_p99_ms": _pct(tpot, 0.99),
        "transfer_hidden_ms": hidden * 1e3, "transfer_exposed_ms": exposed * 1e3,
        "transfer_hidden_fraction": hidden / (hidden + exposed) if hidden + exposed > 0 else 0.0,
        "kv_gbps": sum(r["kv_bytes"] for r in done) / max(1e-9, hidden + exposed) / 1e9,
        "output_tokens": tokens, "tokens_per_s": tokens / span if span > 0 else 0.0,
        "prompt_tokens_per_s": sum(r["tokens"] for r in done) / span if span > 0 else 0.0,
    }  # fmt: skip


def summarise(run: dict[str, Any]) -> dict[str, Any]:
    """A variant's run → its figures overall and per context length (requests of exactly that prompt length)."""
    records = run["records"]
    out = {"variant": run["variant"], "description": run["description"], **_figures(records)}
    out["by_length"] = {}
    for name, tokens in BUCKETS.items():
        bucket = [r for r in records if r["tokens"] == tokens]
        if bucket:
            out["by_length"][name] = _figures(bucket)
    return out


def markdown(record: dict[str, Any]) -> str:
    """The bench record as Markdown tables (overall, then per context length and the saturating runs)."""
    lines = [f"# sage-transport bench pd: {record['model']}", "", f"Compute calibration: {record['compute']['source']}."]
    lines += [f"Per-layer prefill at 32K: {record['compute']['prefill_layer_ms_32k']} ms; decode step (1 × 32K): "
              f"{record['compute']['decode_step_ms_1x32k']} ms. Mix: {record['mix']}.", ""]  # fmt: skip
    header = "| variant | TTFT p50 / p99 ms | TPOT p50 / p99 ms | transfer hidden | tokens/s | completed |"
    rule = "|---|---|---|---|---|---|"

    def row(name: str, f: dict[str, Any]) -> str:
        return (
            f"| {name} | {f['ttft_p50_ms']:.0f} / {f['ttft_p99_ms']:.0f} | {f['tpot_p50_ms']:.1f} / {f['tpot_p99_ms']:.1f} | "
            f"{f['transfer_hidden_fraction'] * 100:.0f}% ({f['transfer_hidden_ms']:.0f} of "
            f"{f['transfer_hidden_ms'] + f['transfer_exposed_ms']:.0f} ms) | {f['tokens_per_s']:.1f} | "
            f"{f['completed']}/{f['requests']} |"
        )

    lines += ["## Request mix, overall", "", header, rule]
    lines += [row(f"{s['variant']}: {s['description']}", s) for s in record["mix_runs"]]
    for bucket in BUCKETS:
        rows = [(s, s["by_length"][bucket]) for s in record["mix_runs"] if bucket in s["by_length"]]
        if rows:
            lines += ["", f"## Mix, {bucket}-token prompts", "", header, rule]
            lines += [row(s["variant"], f) for s, f in rows]
    if record.get("saturating"):
        lines += ["", "## Throughput per context length (requests arriving together)", "", header, rule]
        for bucket, runs in record["saturating"].items():
            lines += [row(f"{bucket} {s['variant']}", s) for s in runs]
    if record.get("targets"):
        lines += ["", "## Targets ((c) against (a))", "", "| target | reached | value |", "|---|---|---|"]
        lines += [f"| {t['target']} | {'yes' if t['met'] else 'no'} | {t['value']} |" for t in record["targets"]]
    return "\n".join(lines) + "\n"


def targets(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 10's targets, (c) against (a): TTFT p50 ≥10% lower at 32K and above, TPOT p99 no worse than 5%,
    throughput ≥2× at 32K–128K."""
    runs = {s["variant"]: s for s in record["mix_runs"]}
    out: list[dict[str, Any]] = []
    if "a" not in runs or "c" not in runs:
        return out
    a, c = runs["a"], runs["c"]
    for bucket in BUCKETS:
        if bucket in a["by_length"] and bucket in c["by_length"]:
            ratio = c["by_length"][bucket]["ttft_p50_ms"] / a["by_length"][bucket]["ttft_p50_ms"]
            out.append({"target": f"TTFT p50 at {bucket} ≥10% lower", "met": ratio <= 0.9, "value": f"{ratio:.2f}× of (a)"})
    ratio = c["tpot_p99_ms"] / a["tpot_p99_ms"]
    out.append({"target": "TPOT p99 no worse than 5%", "met": ratio <= 1.05, "value": f"{ratio:.2f}× of (a)"})
    for bucket, sat in (record.get("saturating") or {}).items():
        by = {s["variant"]: s for s in sat}
        if "a" in by and "c" in by and by["a"]["tokens_per_s"]:
            ratio = by["c"]["tokens_per_s"] / by["a"]["tokens_per_s"]
            out.append({"target": f"throughput at {bucket} ≥2×", "met": ratio >= 2.0, "value": f"{ratio:.2f}× of (a)"})
    return out


def plot(record: dict[str, Any], path: Path) -> bool:
    """TTFT p50/p99 and tokens/s per variant and context length as a PNG (``False`` without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    runs = record["mix_runs"]
    buckets = [b for b in BUCKETS if any(b in s["by_length"] for s in runs)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    width = 0.8 / max(1, len(runs))
    for i, s in enumerate(runs):
        xs = [j + i * width for j in range(len(buckets))]
        axes[0].bar(xs, [s["by_length"].get(b, {}).get("ttft_p50_ms", 0) for b in buckets], width, label=s["variant"])
        axes[1].bar(xs, [s["by_length"].get(b, {}).get("tpot_p99_ms", 0) for b in buckets], width, label=s["variant"])
    sat = record.get("saturating") or {}
    for i, variant in enumerate(s["variant"] for s in runs):
        values = [next((x["tokens_per_s"] for x in sat.get(b, []) if x["variant"] == variant), 0) for b in buckets]
        axes[2].bar([j + i * width for j in range(len(buckets))], values, width, label=variant)
    for ax, title in zip(axes, ("TTFT p50 (ms)", "TPOT p99 (ms)", "tokens/s, requests arriving together")):
        ax.set_xticks([j + width * (len(runs) - 1) / 2 for j in range(len(buckets))], buckets)
        ax.set_title(title)
        ax.legend()
    fig.suptitle(
        f"sage-transport bench pd, {record['model']} (a: per-block pull after prefill; b: sage, after; c: sage, layer-wise)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
