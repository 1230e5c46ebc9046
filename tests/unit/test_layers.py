"""Imports point down the layers of docs/architecture.md: no package imports one above it, and
no two packages import each other (directly or round a cycle). Read from the source with `ast`,
function-level imports included, so a deferred import cannot hide an upward arrow."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import megatron_selfreward

PACKAGE = Path(megatron_selfreward.__file__).parent
NAME = "megatron_selfreward"

# Bottom up. A unit is a sub-package or a top-level module of megatron_selfreward; a unit may
# import units of its own layer or below (cycles are checked separately).
LAYERS: list[set[str]] = [
    {"io", "records", "precision", "progress", "hostlist", "threads", "assets", "tokenizer",
     "kernels", "config", "errors", "perf"},                        # leaves
    {"megatron"},                                                    # Megatron-Core, worlds, checkpoints
    {"convert", "losses", "judging"},                                # conversions, losses, judge text
    {"generation"},                                                  # engines
    {"policy", "data"},                                              # a model directory; batches
    {"train"},                                                       # trainers
    {"stages", "report"},                                            # one verb each
    {"pipeline", "doctor"},                                          # plan and executors
    {"cli", "tool_entry", "__init__", "__main__"},                   # commands
]


def _unit(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != NAME:
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        out[".".join((NAME, *rel.parts))] = path
    return out


def _imports(module: str, path: Path) -> set[str]:
    found = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            if target == NAME:  # from megatron_selfreward import x: x is the unit
                found.update(f"{NAME}.{alias.name}" for alias in node.names)
    return found


def unit_graph() -> dict[str, dict[str, set[str]]]:
    """unit -> imported unit -> the modules that import it (for the failure message)."""
    graph: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for module, path in _modules().items():
        src = _unit(module)
        for target in _imports(module, path):
            dst = _unit(target)
            if dst is not None and dst != src:
                graph[src][dst].add(module)
    return graph


def _layer(unit: str) -> int:
    for index, units in enumerate(LAYERS):
        if unit in units:
            return index
    raise AssertionError(f"megatron_selfreward.{unit} is in no layer of LAYERS (tests/unit/test_layers.py): "
                         "place it there and in docs/architecture.md")


def test_every_unit_has_a_layer():
    units = {_unit(m) for m in _modules()}
    for unit in units:
        _layer(unit)


def test_no_import_points_up():
    upward = [f"{', '.join(sorted(mods))} imports {NAME}.{dst} ({src} is in layer {_layer(src)}, "
              f"{dst} in layer {_layer(dst)})"
              for src, targets in unit_graph().items() for dst, mods in targets.items()
              if _layer(dst) > _layer(src)]
    assert not upward, "\n".join(upward)


def test_no_import_cycle_between_units():
    graph = unit_graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: finished

    def visit(unit: str, path: list[str]) -> None:
        state[unit] = 1
        for nxt in sorted(graph.get(unit, {})):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [unit, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[unit] = 2

    for unit in sorted(graph):
        if unit not in state:
            visit(unit, [unit])
    detail = [" -> ".join(c) + ": " + "; ".join(
        f"{a}->{b} in {', '.join(sorted(graph[a][b]))}" for a, b in zip(c, c[1:])) for c in cycles]
    assert not cycles, "\n".join(detail)


def test_the_checker_sees_an_upward_and_a_cyclic_import(tmp_path, monkeypatch):
    """The graph reads function-level and `from megatron_selfreward import x` imports (what an
    upward arrow hidden in a function would use)."""
    source = tmp_path / "mod.py"
    source.write_text("def f():\n    from megatron_selfreward.pipeline.local import run_local\n"
                      "    from megatron_selfreward import cli\n")
    found = _imports(f"{NAME}.io", source)
    assert {_unit(m) for m in found} >= {"pipeline", "cli"}
