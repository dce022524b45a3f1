"""The package's shape, read from its own source: imports form no circle, every
module is used by the package itself (none ships only for the tests or the
benchmarks), and the README's module map names every module."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "axolotl_ila"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported(path: Path, inside: str = "axolotl_ila") -> set[str]:
    """The modules of ``inside`` that ``path`` imports, at any depth of its code
    (a function's lazy import counts: it is an arrow all the same). ``from
    PACKAGE import module`` names that module."""
    known = modules()
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names if f"{node.module}.{alias.name}" in known}
    return {name for name in found if name == inside or name.startswith(inside + ".")}


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {m for m in imported(path) if m in known and m != name} for name, path in known.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle, found by a depth-first walk (one per back edge)."""
    state: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                found.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_circles_finds_a_circle_where_there_is_one():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_the_package_imports_form_no_circle():
    assert circles(import_graph()) == []


def test_every_module_of_the_wheel_serves_the_package():
    """Reached from the package's entry points (the plugin, the two CLIs and
    ``python -m axolotl_ila.cli``), so nothing in the wheel is there only for
    the tests or the benchmarks."""
    graph = import_graph()
    roots = ["axolotl_ila", "axolotl_ila.plugin", "axolotl_ila.cli.commands", "axolotl_ila.cli.axolotl_group", "axolotl_ila.cli.__main__"]
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(graph.get(name, ()))
        # A subpackage's __init__ runs whenever one of its modules is imported.
        parent = name.rpartition(".")[0]
        if parent:
            todo.append(parent)
    assert sorted(set(graph) - seen) == []


def test_the_readme_module_map_names_every_module():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Module map") :]
    section = section[: section.find("\n## ", 4)] if "\n## " in section[4:] else section
    listed = set(re.findall(r"`(axolotl_ila/[\w/]+\.py)`", section))
    files = {str(path.relative_to(REPO)) for path in PACKAGE.rglob("*.py") if path.name != "__init__.py"}
    assert sorted(files - listed) == [], "modules missing from the README's module map"
    assert sorted(listed - files) == [], "the README's module map names files that do not exist"
