"""The package's layout keeps the flow: no import circles, and dependencies point one way.

profile -> planning -> render -> submit -> track (the job generator) never imports the node side or the
training engine; the node side never imports the job generator's later stages; the training engine (what runs
inside torchrun) imports only itself. Function-level imports count too: a circle hidden in a function is
still a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "sftjobs"

GENERATOR = ("sftjobs.profile", "sftjobs.planning", "sftjobs.render", "sftjobs.templating", "sftjobs.datasets",
             "sftjobs.runs", "sftjobs.submit", "sftjobs.status", "sftjobs.executors", "sftjobs.env")
NODE = ("sftjobs.node", "sftjobs.steps")
TRAINER = ("sftjobs.trainer",)
LATER_GENERATOR_STAGES = ("sftjobs.render", "sftjobs.submit", "sftjobs.status", "sftjobs.cli", "sftjobs.runs")
# The debug executor runs a step in this process (the same runtime a job runs on its node): the one place
# the job generator reaches the node side.
ALLOWED = {("sftjobs.executors.local", "sftjobs.node.runtime")}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sftjobs"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    targets.add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name in modules)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_graph_is_read():
    graph = import_graph()
    assert "sftjobs.planning.memory" in graph["sftjobs.planning.run"]
    assert "sftjobs.node.runtime" in graph["sftjobs.steps.__main__"]


def test_no_import_circles():
    graph = import_graph()
    # package __init__ modules are namespaces here: an edge to one is not an edge to its children
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_dependencies_point_one_way():
    wrong = []
    for source, targets in import_graph().items():
        for target in targets:
            if (source, target) in ALLOWED:
                continue
            if _under(source, GENERATOR) and _under(target, NODE + TRAINER):
                wrong.append(f"{source} -> {target} (the job generator reaches into the node side)")
            if _under(source, NODE) and _under(target, LATER_GENERATOR_STAGES):
                wrong.append(f"{source} -> {target} (a node step reaches back into render/submit/track)")
            if _under(source, TRAINER) and not _under(target, TRAINER):
                wrong.append(f"{source} -> {target} (the training engine must stand alone inside torchrun)")
    assert not wrong, "\n".join(sorted(wrong))
