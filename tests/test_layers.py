"""The package layers: no import cycle between memmcl's packages and top-level modules (`memmcl.tasks` lowest), none
between its modules (files), and no module reading another module's private names."""

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


# Between modules (files) rather than packages, every memmcl import counts: typing-only ones (`if TYPE_CHECKING:`)
# and function-level ones too, since two files that name each other are coupled however the import is guarded.

def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Returns {dotted module name: file} of memmcl/ and callbacks/ (installed as `memmcl.callbacks`)."""
    files = {}
    for top, package in ((root / "memmcl", "memmcl"), (root / "callbacks", "memmcl.callbacks")):
        for path in sorted(top.rglob("*.py")):
            parts = path.relative_to(top).with_suffix("").parts
            files[".".join([package, *(parts[:-1] if parts[-1] == "__init__" else parts)])] = path
    return files


def owning_module(dotted: str, modules: dict[str, Path]) -> str | None:
    """Returns the longest prefix of `dotted` that is a memmcl module, or None."""
    while dotted and dotted not in modules:
        dotted = dotted.rpartition(".")[0]
    return dotted or None


def module_imports(name: str, tree: ast.Module, modules: dict[str, Path]) -> list[tuple[str, str | None, str, int]]:
    """Returns (module, name taken from it or None, local name bound, line) for every memmcl import in module `name`:
    `import memmcl.a.b` gives memmcl.a.b (binding `memmcl`), `from memmcl.a import b` with b a module gives
    memmcl.a.b (binding `b`), `from memmcl.a import f` gives (memmcl.a, f); relative imports are resolved."""
    package = name if modules[name].name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if module := owning_module(alias.name, modules):
                    found.append((module, None, alias.asname or alias.name.split(".")[0], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package
                for _ in range(node.level - 1):
                    parent = parent.rpartition(".")[0]
                base = f"{parent}.{base}".rstrip(".")
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:
                    found.append((f"{base}.{alias.name}", None, alias.asname or alias.name, node.lineno))
                elif module := owning_module(base, modules):
                    found.append((module, alias.name, alias.asname or alias.name, node.lineno))
    return found


def module_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Edges module -> module for every memmcl import (see `module_imports`)."""
    modules = module_files(root)
    return {name: {m for m, *_ in module_imports(name, ast.parse(path.read_text()), modules)} - {name}
            for name, path in modules.items()}


def module_cycles(graph: dict[str, set[str]]) -> list[str]:
    """Returns every elementary cycle as `a -> b -> a` (memmcl. left off), starting at its smallest module."""
    found = []

    def walk(start: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(path[-1], ())):
            if nxt == start:
                found.append(" -> ".join(m.removeprefix("memmcl.") for m in [*path, start]))
            elif nxt > start and nxt not in path:
                walk(start, [*path, nxt])

    for start in sorted(graph):
        walk(start, [start])
    return found


def is_private(attr: str) -> bool:
    return attr.startswith("_") and not attr.startswith("__")


def private_accesses(root: Path = ROOT) -> list[str]:
    """Returns `module:line other_module._name` for each private name of another memmcl module that a module imports
    (`from memmcl.a import _x`) or reads from an imported module (`a._x`, `memmcl.a._x`)."""
    modules = module_files(root)
    found = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        bound: dict[str, str] = {}  # local name -> the module it is
        for module, taken, local, line in module_imports(name, tree, modules):
            if taken is None:
                bound[local] = "memmcl" if local == "memmcl" else module
            elif is_private(taken) and module != name:
                found.append(f"{name}:{line} {module}.{taken}")
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and is_private(node.attr)):
                continue
            chain, base = [], node.value
            while isinstance(base, ast.Attribute):
                chain.insert(0, base.attr)
                base = base.value
            if isinstance(base, ast.Name) and base.id in bound:
                module = ".".join([bound[base.id], *chain])
                if module in modules and module != name:
                    found.append(f"{name}:{node.lineno} {module}.{node.attr}")
    return sorted(found)


def test_module_checks_see_typing_only_relative_and_module_imports(tmp_path):
    files = {
        "memmcl/__init__.py": "",
        "memmcl/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from memmcl.sub.b import B\n",
        "memmcl/sub/__init__.py": "",
        "memmcl/sub/b.py": "from . import c\nfrom ..a import _hidden\n",
        "memmcl/sub/c.py": "import memmcl.a\nfrom memmcl import a as alias\nx = memmcl.a._y, alias._z, alias.__doc__\n",
        "callbacks/__init__.py": "from memmcl.callbacks.d import D\n",
        "callbacks/d.py": "def f():\n    from memmcl.sub import b\n    return b._w\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    graph = module_graph(tmp_path)
    assert graph["memmcl.a"] == {"memmcl.sub.b"} and graph["memmcl.sub.b"] == {"memmcl.sub.c", "memmcl.a"}
    assert graph["memmcl.callbacks"] == {"memmcl.callbacks.d"} and graph["memmcl.callbacks.d"] == {"memmcl.sub.b"}
    assert module_cycles(graph) == ["a -> sub.b -> a", "a -> sub.b -> sub.c -> a"]
    assert private_accesses(tmp_path) == ["memmcl.callbacks.d:3 memmcl.sub.b._w", "memmcl.sub.b:2 memmcl.a._hidden",
                                          "memmcl.sub.c:3 memmcl.a._y", "memmcl.sub.c:3 memmcl.a._z"]


def test_no_import_cycle_between_modules():
    cycles = module_cycles(module_graph())
    print("\n".join(["module import cycles:", *cycles]))
    assert not cycles, f"{len(cycles)} module import cycle(s):\n" + "\n".join(cycles)


def test_no_module_reads_another_modules_private_names():
    found = private_accesses()
    print("\n".join(["private names read across modules:", *found]))
    assert not found, "private names read across modules:\n" + "\n".join(found)
