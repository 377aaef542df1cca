"""Packaging promises: a light import, the public API, the core's single seam."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import sage_transport

PACKAGE = pathlib.Path(sage_transport.__file__).parent
CORE_MODULES = [
    "planner.py", "scheduler.py", "transfers.py", "handshake.py", "wire.py", "chunk_copies.py",
    "channel.py", "channel_core.py", "channel_peers.py", "channel_sending.py", "channel_receiving.py",
    "channel_pulls.py", "channel_stats.py", "channel_lanes.py",
    "session.py", "session_host.py", "session_state.py", "session_send.py", "session_receive.py",
]  # fmt: skip
CORE_MODULE_LINES = 400  # no core module over this: each part of the channel and the session has one job
FORBIDDEN_IN_CORE = {"ucxx", "ucp", "torch", "prometheus_client"}
SEAM = {"transports.base", "transports.registry"}  # all the core may import of the transports package


def test_import_pulls_no_heavy_backend() -> None:
    code = (
        "import sys, sage_transport; "
        "heavy = [m for m in ('torch', 'ucxx', 'prometheus_client', 'pynvml', 'numba') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import sage_transport imported {out.stdout.strip()}"


def test_public_api_is_explicit() -> None:
    for name in sage_transport.__all__:
        assert hasattr(sage_transport, name), name
    assert "KVTransferChannel" in sage_transport.__all__
    assert (PACKAGE / "py.typed").exists()


def test_async_core_imports_only_the_transport_seam() -> None:
    for module in CORE_MODULES:
        tree = ast.parse((PACKAGE / module).read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            if isinstance(node, ast.ImportFrom) and node.level and node.module == "transports":
                names = [f".transports.{a.name}" for a in node.names]  # from .transports import tcp
            for name in names:
                root = name.lstrip(".").split(".")[0]
                assert root not in FORBIDDEN_IN_CORE, f"{module} imports {name}"
                if "transports" in name.split("."):
                    assert name.lstrip(".") in SEAM, f"{module} imports {name}: the core may import only {sorted(SEAM)}"


def _runtime_imports(module: str) -> set[str]:
    """The package modules ``module`` imports when it runs (not those imported only for type checking)."""
    tree = ast.parse((PACKAGE / module).read_text())
    found: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                found.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
            for field in ("body", "orelse", "handlers", "finalbody"):
                visit(getattr(node, field, []) or [])

    visit(tree.body)
    return {name + ".py" for name in found}


def test_the_core_reads_in_one_direction() -> None:
    """No import cycle among the core's modules, none of them over CORE_MODULE_LINES, and the session's modules
    never import the channel (not even for type checking): a session reports through the SessionHost it is given."""
    graph = {m: _runtime_imports(m) & set(CORE_MODULES) for m in CORE_MODULES}
    done: set[str] = set()

    def walk(module: str, path: list[str]) -> None:
        for dep in graph[module]:
            assert dep not in path, f"import cycle: {' -> '.join([*path[path.index(dep) :], dep])}"
            if dep not in done:
                walk(dep, [*path, dep])
        done.add(module)

    for module in CORE_MODULES:
        walk(module, [module])
        lines = len((PACKAGE / module).read_text().splitlines())
        assert lines <= CORE_MODULE_LINES, f"{module} has {lines} lines (at most {CORE_MODULE_LINES})"
    for module in ("session.py", "session_state.py", "session_send.py", "session_receive.py", "session_host.py"):
        text = (PACKAGE / module).read_text()
        assert "from .channel" not in text and "import channel" not in text, f"{module} imports the channel"


def test_the_core_loads_no_transport_implementation_even_indirectly() -> None:
    """What the core's own imports pull in, transitively: the seam and the registry, no transport and no heavy
    backend (transports are imported by name, lazily, when a channel opens one)."""
    modules = ", ".join(f"sage_transport.{m.removesuffix('.py')}" for m in CORE_MODULES)
    code = (
        f"import sys, {modules}; "
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('sage_transport.transports') "
        "or m.split('.')[0] in ('torch', 'ucxx', 'ucp', 'prometheus_client'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(out.stdout.split())
    assert loaded <= {"sage_transport.transports", *(f"sage_transport.{name}" for name in SEAM)}, loaded


def test_no_pickle_anywhere_in_the_package() -> None:
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text and "pickle.loads" not in text, path


def test_cli_entry_point_is_installed() -> None:
    out = subprocess.run([sys.executable, "-m", "sage_transport.cli", "--help"], capture_output=True, text=True, check=True)
    assert "migrate" in out.stdout
