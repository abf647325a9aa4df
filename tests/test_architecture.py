"""What the layout promises: no import circle, and no torch or Opacus on the ALS path."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("client", "server", "shared", "simulations", "deploy")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _project_modules() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Every project module `path` imports, wherever the import stands (top level, inside a
    function, under TYPE_CHECKING), with the packages each import loads on the way."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            parts = target.split(".")
            found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {m for m in found if m in modules and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_circle():
    modules = _project_modules()
    graph = {name: _imports(path, name, modules) for name, path in modules.items()}
    assert len(graph) > 50 and sum(map(len, graph.values())) > 100  # the scan sees the project
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


ALS_ROUND = """
import sys, tempfile
from pathlib import Path

import server.server_app, client.client_app  # what Flower loads
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.client_app import app
from server.strategies import build_strategy
from shared.config import RunConfig
from shared.data.sources import load_catalog
from shared.params import init_global_arrays
from shared.wire import ARRAYS, CONFIG, SERVER_ROUND, to_array_record
from shared.flower_internals import server_identity

out = Path(tempfile.mkdtemp())
cfg = RunConfig.from_flower({"privacy": "none", "output-dir": str(out), "state-dir": str(out / "state"), "synthetic-users": 200,
                             "synthetic-ads": 60, "synthetic-merchants": 2, "num-rounds": 1, "seed": 3})
catalog = load_catalog(cfg)
strategy, _ = build_strategy(cfg, 2, catalog)
arrays = init_global_arrays(len(catalog), cfg.factors, cfg.seed)
replies = []
with server_identity():
    for kind in ("train", "evaluate"):
        msg = Message(content=RecordDict({ARRAYS: to_array_record(arrays), CONFIG: ConfigRecord({SERVER_ROUND: 1})}),
                      dst_node_id=5, message_type=kind)
        context = Context(run_id=1, node_id=5, node_config={"partition-id": 0, "num-partitions": 2},
                          state=RecordDict(), run_config=cfg.to_flower())
        reply = app(msg, context)
        assert not reply.has_error(), reply.error
        replies.append(reply)
    aggregated, _ = strategy.aggregate_train(1, replies[:1])
    assert aggregated is not None
print(sorted(m for m in ("torch", "opacus") if m in sys.modules))
"""


def test_the_als_path_imports_neither_torch_nor_opacus():
    """The ServerApp and ClientApp modules, and a whole non-private ALS round through them (the
    client's train and evaluate handlers, the server's strategy and aggregation), load neither
    torch nor Opacus: a run pays their seconds of import only when it uses SGD or DP."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(ALS_ROUND)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_the_probe_would_see_torch():
    """Control for the test above: an SGD solver's module does load torch in the same probe."""
    probe = "import sys\nimport client.solvers.sgd\nprint(sorted(m for m in ('torch', 'opacus') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "['torch']"
