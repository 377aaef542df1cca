"""``sage-transport``: ``migrate`` (the main job), ``serve`` (its receiving side on its own), ``probe``
(topology, recommended preset, transport profile; ``--peer`` measures a path), ``presets`` and ``bench
collectives``."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from .errors import SageTransportError

__all__ = ["main"]


class _Stderr:
    """Whatever ``sys.stderr`` is at each write (tests and embedders swap it; a bound file would go stale)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _configure_logging(json_logs: bool, verbose: bool) -> None:
    import logging

    import structlog

    renderer = structlog.processors.JSONRenderer() if json_logs else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso"), renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO if verbose else logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(_Stderr()),  # type: ignore[arg-type]  # logs never interleave with a command's output
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sage-transport", description="KV-cache transport for LLM inference")
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("migrate", help="migrate a paged KV cache of a real model's shape and verify it")
    m.add_argument(
        "--transport", default=None, help="transport name (default: the config's backend, ucx; mock: both ends in this process)"
    )
    m.add_argument("--receivers", type=int, default=1, help="local receiver processes to migrate to at once (default 1)")
    m.add_argument(
        "--peer", action="append", default=[], metavar="HOST:PORT", help="send to a `sage-transport serve` there (repeatable)"
    )
    m.add_argument("--store", default=None, metavar="URL", help="find receivers in etcd://HOST:PORT or tcpstore://HOST:PORT")
    m.add_argument(
        "--to", action="append", default=[], metavar="NAME", help="send to the `serve --store` registered as NAME (repeatable)"
    )
    m.add_argument("--to-all", action="store_true", help="send to every `serve --store` registered in --store now")
    m.add_argument("--no-reference", action="store_true", help="skip the references (ucx_perftest, the in-process shuffled copy)")
    m.add_argument(
        "--compare",
        action="append",
        default=[],
        choices=["nixl"],
        help="also run the job with NIXL as vLLM's NixlConnector drives it, in the same run (needs nixl-cu12)",
    )
    m.add_argument("--progress", choices=("auto", "on", "off"), default="auto", help="progress bar on stderr (auto: on a tty)")
    m.add_argument("--model", default="qwen2.5-7b", help="model shape (llama-3-8b, llama-3-70b, qwen2.5-7b, qwen3-8b, ...)")
    m.add_argument("--tokens", type=int, default=32768, help="context length to migrate (default 32768)")
    m.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    _config_arguments(m)
    m.add_argument("--no-shuffle", action="store_true", help="keep the destination block table in order")
    m.add_argument("--repeat", type=int, default=3, help="transfers to time (median reported, default 3)")
    m.add_argument("--seed", type=int, default=0, help="seed of the fill pattern and the shuffled block tables")
    m.add_argument("--json", dest="json_path", type=Path, default=None, help="write the record as JSON to PATH")
    m.add_argument(
        "--metrics-port", type=int, default=None, metavar="P",
        help="serve /metrics, /summary and /control on P during the job (0: any free port, printed)",
    )  # fmt: skip
    m.add_argument("--linger", type=float, default=0.0, metavar="S", help="keep serving metrics S seconds after the job")
    m.add_argument("--trace", type=Path, default=None, metavar="PATH", help="write a Chrome/Perfetto trace of every chunk")
    m.add_argument("--log-json", action="store_true", help="logs as JSON lines")
    m.add_argument("-v", "--verbose", action="store_true", help="log one line per transfer")
    p = sub.add_parser("probe", help="print this host's topology, the recommended preset and the transport profile")
    p.add_argument("--json", action="store_true", help="print TopologyInfo with recommended_preset, reason and profile as JSON")
    p.add_argument("--peer", default=None, metavar="HOST:PORT", help="measure the path to a `sage-transport serve` there")
    p.add_argument("--transport", default=None, help="transport for --peer (default: the config's backend)")
    p.add_argument("--samples", type=int, default=200, help="latency transfers for --peer (default 200)")
    p.add_argument(
        "--device", default=None, help="profile buffers on this device (gpu0, numa1; default: this process's NUMA node)"
    )
    p.add_argument("--nccl-xml", type=Path, default=None, metavar="PATH", help="write an NCCL topology file (where GPUs are)")
    p.add_argument("--no-vendors", action="store_true", help="skip the accelerator probes (sysfs only)")
    _config_arguments(p)
    r = sub.add_parser("presets", help="list the presets, or show one")
    r.add_argument("name", nargs="?", default=None, help="preset to show with every setting")
    r.add_argument("--json", action="store_true", help="print as JSON")
    r.add_argument("--file", type=Path, default=None, help="a preset file to validate and list instead of the shipped one")
    b = sub.add_parser("bench", help="benchmarks shipped with the package")
    bench_sub = b.add_subparsers(dest="bench", required=True)
    c = bench_sub.add_parser("collectives", help="our collectives against raw torch.distributed, and fused against unfused")
    c.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    c.add_argument("--ranks", type=int, default=2, help="rank processes (default 2)")
    c.add_argument("--sizes", default="4KiB,64KiB,1MiB,4MiB,16MiB", help="message sizes per rank (default 4KiB..16MiB)")
    c.add_argument("--repeats", type=int, default=20, help="at least this many op pairs per size (default 20)")
    c.add_argument("--seconds", type=float, default=2.0, help="time to spend per size and op (default 2 s)")
    c.add_argument("--fused-count", type=int, default=1000, help="4 KiB all-reduces in the fusion comparison (default 1000)")
    c.add_argument("--pin", action="store_true", help="pin each rank process to one CPU (less noise on small hosts)")
    c.add_argument("--json", dest="json_path", type=Path, default=None, help="write the record as JSON to PATH")
    d = bench_sub.add_parser(
        "pd", help="prefill→decode disaggregation: TTFT, TPOT and tokens/s of three transfer variants on one request mix"
    )
    d.add_argument(
        "--variants",
        default="a,b,c",
        help="a: per-block pull after prefill (NIXL when installed); b: sage, after prefill; c: sage, layer-wise + priorities",
    )
    d.add_argument("--model", default="qwen2.5-7b", help="KV shape and compute calibration (qwen2.5-7b, qwen3-8b)")
    d.add_argument("--requests", type=int, default=12, help="requests in the Poisson mix (default 12)")
    d.add_argument("--rate", type=float, default=0.8, help="mean arrivals per second (default 0.8)")
    d.add_argument("--output-tokens", type=int, default=64, help="tokens each request decodes (default 64)")
    d.add_argument("--lengths", default="4K:3,8K:2,16K:2,32K:3,64K:2,128K:1", help="prompt lengths and weights")
    d.add_argument("--saturate", default="32K,64K,128K", help="context lengths run with requests arriving together ('' for none)")
    d.add_argument("--saturate-count", type=int, default=3, help="requests per saturating run (default 3)")
    d.add_argument("--bulk-gbps", type=float, default=0.5, help="offered load of the bulk migration stream (0: none)")
    d.add_argument("--decodes", type=int, default=1, help="decode instances (processes), requests dealt round-robin")
    d.add_argument("--scale", type=float, default=1.0, help="stretch every emulated compute time by this factor")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--json", dest="json_path", type=Path, default=None, help="write the record as JSON to PATH")
    d.add_argument("--md", dest="md_path", type=Path, default=None, help="write the Markdown report to PATH")
    d.add_argument("--png", dest="png_path", type=Path, default=None, help="plot to PATH (needs matplotlib)")
    _config_arguments(d)
    t = sub.add_parser("token", help="print a fresh auth_token (32 random bytes), or write it to a file only you can read")
    t.add_argument("--file", type=Path, default=None, help="write it to FILE (mode 0600; refuses to overwrite)")
    s = sub.add_parser("serve", help="run the receiving side of migrate and print its address")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    s.add_argument("--port", type=int, default=0, help="job port (default 0: any free port, printed)")
    s.add_argument("--once", action="store_true", help="exit after one job")
    s.add_argument("--store", default=None, metavar="URL", help="register in etcd://HOST:PORT or tcpstore://HOST:PORT")
    s.add_argument("--name", default=None, help="the name to register (default serve-HOST-PORT)")
    s.add_argument("--advertise", default=None, metavar="HOST", help="the host peers reach this at (default --host)")
    s.add_argument("--ttl", type=float, default=10.0, help="seconds the registration outlives a crash (default 10)")
    s.add_argument("--log-json", action="store_true", help="logs as JSON lines")
    s.add_argument("-v", "--verbose", action="store_true", help="log more")
    return parser


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", "--comm-backend", dest="config", default=None,
        help='settings as "key=value,..." (e.g. "preset=high-bw,chunk_size=8MiB,kv_dtype=fp8_e4m3")',
    )  # fmt: skip
    parser.add_argument("--preset", default=None, help="named preset (high-bw, low-latency, low-cost)")
    parser.add_argument("--kv-dtype", default=None, help="KV dtype on the wire (target_dtype), e.g. fp8_e4m3")


def _resolve_config(args: argparse.Namespace) -> Any:
    from .config import KVTransportConfig

    spec = args.config or ""
    if args.preset:
        spec = f"preset={args.preset}" + (f",{spec}" if spec else "")
    if args.kv_dtype:
        spec = (f"{spec}," if spec else "") + f"target_dtype={args.kv_dtype}"
    return KVTransportConfig.resolve(spec or None)


def _console() -> Any:
    """A rich console: the terminal's width on a terminal, 120 columns into a file or pipe."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 120)


def run_async(coro: Any) -> Any:
    """Run ``coro`` on uvloop when it is installed (the TCP transport's receive path needs it for full
    speed), else on the default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def _migrate(args: argparse.Namespace) -> int:
    from .migrate import Observe, progress_bar, run_migration, summary_lines

    config = _resolve_config(args)
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        raise SageTransportError(f"--metrics-port={args.metrics_port} must be in 0..65535")
    if args.linger < 0:
        raise SageTransportError(f"--linger={args.linger} must not be negative")
    observe = Observe(
        metrics_port=args.metrics_port if args.metrics_port is not None else config.metrics_port,
        linger_s=args.linger,
        trace_path=args.trace,
        announce=lambda url: print(f"sage-transport migrate: metrics on {url}/metrics", file=sys.stderr, flush=True),
        notice=lambda line: print(f"sage-transport migrate: {line}", file=sys.stderr, flush=True),
    )
    for name in ("tokens", "repeat", "receivers", "block_size"):
        if getattr(args, name) <= 0:
            raise SageTransportError(f"--{name.replace('_', '-')}={getattr(args, name)} must be positive")
    peers = list(args.peer) + _peers_from_store(args)
    show = args.progress == "on" or (args.progress == "auto" and sys.stderr.isatty())
    if show:
        observe.stage = lambda text: print(f"  {text} ...", file=sys.stderr, flush=True)
    record = run_async(
        run_migration(
            model=args.model,
            tokens=args.tokens,
            block_size=args.block_size,
            transport=args.transport or config.backend,
            config=config,
            shuffle=not args.no_shuffle,
            repeats=args.repeat,
            seed=args.seed,
            receivers=args.receivers,
            peers=peers,
            reference=not args.no_reference,
            progress=progress_bar() if show else None,
            observe=observe,
            compare=args.compare,
        )
    )
    print("\n".join(summary_lines(record)))
    if args.json_path is not None:
        args.json_path.write_bytes(msgspec.json.format(msgspec.json.encode(record), indent=2) + b"\n")
    return 0 if record.verified and not record.failed else 1


def _peers_from_store(args: argparse.Namespace) -> list[str]:
    """``--to`` names (and ``--to-all``: every registered serve) resolved in ``--store``."""
    if not (args.to or args.to_all):
        if args.store is not None:
            raise SageTransportError("--store names where to find receivers: add --to NAME or --to-all")
        return []
    if args.store is None:
        raise SageTransportError("--to and --to-all need --store URL (etcd://HOST:PORT or tcpstore://HOST:PORT)")
    from .rendezvous import SERVE_PREFIX, current_members, lookup, open_store

    async def resolve() -> list[str]:
        store = open_store(args.store)
        try:
            found = await current_members(store, SERVE_PREFIX) if args.to_all else {}
            if args.to_all and not found:
                raise SageTransportError(f"--to-all: no `sage-transport serve` is registered in {args.store}")
            for name in args.to:
                found[name] = await lookup(store, name, timeout_s=10, prefix=SERVE_PREFIX)
            return [found[name] for name in sorted(found)]
        finally:
            await store.close()

    return list(run_async(resolve()))


def _probe(args: argparse.Namespace) -> int:
    from .hw import TopologyManager, TransportProfile, recommend_preset, to_nccl_xml

    config = _resolve_config(args)
    topology = TopologyManager(vendors=() if args.no_vendors else None).probe()
    recommended = recommend_preset(topology)
    if not (args.config or args.preset):
        from .config import KVTransportConfig

        config = KVTransportConfig.resolve(f"preset={recommended[0]}", base=config)
    profile = TransportProfile.derive(topology, config, args.device)
    if args.nccl_xml is not None:
        xml = to_nccl_xml(topology)
        if xml is None:
            print("sage-transport probe: no GPU found; no NCCL topology file written", file=sys.stderr)
        else:
            args.nccl_xml.write_text(xml)
    path = None
    if args.peer:
        from .path_probe import probe_path

        if args.samples <= 0:
            raise SageTransportError(f"--samples={args.samples} must be positive")
        path = run_async(probe_path(args.peer, config, args.transport, latency_samples=args.samples))
    if args.json:
        record = msgspec.to_builtins(topology)
        record.update(recommended_preset=recommended[0], recommended_reason=recommended[1], profile=msgspec.to_builtins(profile))
        if path is not None:
            record["path"] = msgspec.to_builtins(path)
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(record), indent=2).decode() + "\n")
        return 0 if path is None or path.verified else 1
    from .report import print_path, print_topology

    console = _console()
    print_topology(console, topology, recommended, profile)
    if path is not None:
        print_path(console, path)
    return 0 if path is None or path.verified else 1


def _presets(args: argparse.Namespace) -> int:
    from .presets import load_presets

    presets = load_presets(args.file)
    if args.name is not None and args.name not in presets:
        raise SageTransportError(f"preset {args.name!r} is not defined; known presets: {', '.join(presets)}")
    chosen = {args.name: presets[args.name]} if args.name else presets
    if args.json:
        from .config import KVTransportConfig

        settings = {n: q.settings for n, q in presets.items()}
        out = {
            name: {
                "purpose": p.purpose,
                "hardware": p.hardware,
                "settings": p.settings,
                "config": KVTransportConfig.resolve(f"preset={name}", env={}, presets=settings),
            }
            for name, p in chosen.items()
        }
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(out), indent=2).decode() + "\n")
        return 0
    from .report import print_preset, print_presets

    console = _console()
    if args.name:
        print_preset(console, args.name, presets[args.name])
    else:
        print_presets(console, presets)
    return 0


def _tokens(text: str, field: str) -> int:
    value = text.strip().upper()
    try:
        return int(float(value[:-1]) * 1024) if value.endswith("K") else int(value)
    except ValueError:
        raise SageTransportError(f"{field}: {text!r} is not a token count (like 32768 or 32K)") from None


def _bench_pd(args: argparse.Namespace) -> int:
    from .pd.decode import VARIANTS
    from .pd.report import markdown
    from .pd.run import run_pd_bench

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise SageTransportError(f"--variants={args.variants!r}: choose from {', '.join(VARIANTS)}")
    lengths: dict[int, int] = {}
    for item in args.lengths.split(","):
        tokens, _, weight = item.partition(":")
        lengths[_tokens(tokens, "--lengths")] = int(weight or 1)
    saturate = [_tokens(t, "--saturate") for t in args.saturate.split(",") if t.strip()]
    for name in ("requests", "rate", "output_tokens", "saturate_count", "scale", "decodes"):
        if getattr(args, name) <= 0:
            raise SageTransportError(f"--{name.replace('_', '-')}={getattr(args, name)} must be positive")
    record = run_pd_bench(
        variants=variants, model=args.model, requests=args.requests, rate=args.rate, output_tokens=args.output_tokens,
        lengths=lengths, saturate=saturate, saturate_count=args.saturate_count, seed=args.seed, scale=args.scale,
        bulk_gbps=args.bulk_gbps, decodes=args.decodes, config=_resolve_config(args), json_path=args.json_path,
        md_path=args.md_path,
        png_path=args.png_path, progress=lambda message: print(f"bench pd: {message}", file=sys.stderr, flush=True),
    )  # fmt: skip
    print(markdown(record), end="")
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.bench == "pd":
        return _bench_pd(args)
    from .collectives.bench import markdown, run_collectives_bench, write
    from .units import parse_size

    for name in ("ranks", "repeats", "fused_count", "seconds"):
        if getattr(args, name) <= 0:
            raise SageTransportError(f"--{name.replace('_', '-')}={getattr(args, name)} must be positive")
    sizes = [parse_size(s, "--sizes") for s in args.sizes.split(",") if s.strip()]
    bad = [s for s in sizes if s % 4 or s < 4]
    if bad:
        raise SageTransportError(f"--sizes: {bad[0]} bytes is not a whole number of float32 values")
    try:
        record = run_collectives_bench(
            args.backend, args.ranks, sizes=sizes, repeats=args.repeats, fused_count=args.fused_count, pin=args.pin,
            seconds=args.seconds,
        )  # fmt: skip
    except RuntimeError as exc:
        raise SageTransportError(str(exc)) from exc
    write(record, args.json_path)
    print(markdown(record), end="")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from .serve import serve

    if not 0 <= args.port <= 65535:
        raise SageTransportError(f"--port={args.port} must be in 0..65535")
    try:
        from .config import KVTransportConfig

        token = KVTransportConfig.resolve(None).auth_token  # SAGE_TRANSPORT_AUTH_TOKEN
        options = {"store": args.store, "name": args.name, "advertise": args.advertise, "ttl_s": args.ttl}

        async def until_terminated() -> None:  # SIGTERM (a service manager's stop) ends it as Ctrl-C does:
            task = asyncio.current_task()  # its registration is withdrawn at once, not left to expire
            assert task is not None
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
            await serve(args.host, args.port, once=args.once, auth_token=token, **options)

        run_async(until_terminated())
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass
    return 0


def _token(args: argparse.Namespace) -> int:
    from .config import generate_token

    token = generate_token()
    if args.file is None:
        print(token)
        return 0
    try:
        fd = os.open(args.file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise SageTransportError(f"--file={str(args.file)!r}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    print(f"wrote a new token to {args.file}; use auth_token_file={args.file} (SAGE_TRANSPORT_AUTH_TOKEN_FILE) on every peer")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _configure_logging(getattr(args, "log_json", False), getattr(args, "verbose", False))
    try:
        if args.command == "migrate":
            return _migrate(args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "token":
            return _token(args)
        if args.command == "probe":
            return _probe(args)
        if args.command == "presets":
            return _presets(args)
        if args.command == "bench":
            return _bench(args)
    except SageTransportError as exc:
        print(f"sage-transport {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
