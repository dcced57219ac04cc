"""The package layers: no import cycle between memmcl's packages and top-level modules (`memmcl.tasks` lowest)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def import_graph() -> dict[str, set[str]]:
    """Edges unit -> unit for runtime `from memmcl.X import ...` (units: sub-packages and top-level modules of
    memmcl, and memmcl.callbacks for callbacks/); imports under `if TYPE_CHECKING:` do not count."""
    graph: dict[str, set[str]] = {}
    files = [(f, f.relative_to(ROOT / "memmcl").parts[0].removesuffix(".py")) for f in (ROOT / "memmcl").rglob("*.py")]
    files += [(f, "callbacks") for f in (ROOT / "callbacks").rglob("*.py")]
    for path, unit in files:
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and getattr(block.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(block)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and id(node) not in typing_only and (node.module or "").startswith("memmcl."):
                target = node.module.split(".")[1]
                if target != unit:
                    graph.setdefault(unit, set()).add(target)
    return graph


def test_no_import_cycle_between_packages():
    graph = import_graph()
    assert not graph.get("tasks", set()) - {"rundir"}  # tasks is the lowest domain layer
    state: dict[str, int] = {}

    def visit(unit: str, path: list[str]) -> None:
        state[unit] = 1
        for nxt in sorted(graph.get(unit, ())):
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join([*path, unit, nxt])}"
            if nxt not in state:
                visit(nxt, [*path, unit])
        state[unit] = 2

    for unit in sorted(graph):
        if unit not in state:
            visit(unit, [])
