"""The package's layout holds: imports run only down the stages, no module imports itself back through others,
and private names stay in their module.

Every import counts: top-level ones, those inside functions (lazy imports hide circles from a top-level check)
and those under ``TYPE_CHECKING``. ``mpexport/__init__.py`` is the facade: it names the public functions of every
stage in its lazy map (strings, imported on first use) and imports only ``base`` itself.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mpexport"

# Lower stages first; a module may import its own folder and any folder on an earlier line.
LAYERS = (
    ("base",),
    ("graph", "backends"),
    ("bundle", "data"),
    ("sources",),
    ("integrations",),
    ("capture",),
    ("precision",),
    ("deploy",),
    ("check",),
    ("minimize",),
    ("commands",),
    ("cli",),
)
RANK = {folder: rank for rank, folders in enumerate(LAYERS) for folder in folders}
LARGEST_MODULE = 500


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, int, list[str]]]:
    """(imported mpexport module, line, names taken from it) for every import statement anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if not base.startswith("mpexport"):
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in known:
                    found.append((submodule, node.lineno, []))
                else:
                    found.append((base, node.lineno, [alias.name]))
        elif isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, []) for alias in node.names if alias.name.startswith("mpexport")]
    return found


def folder(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in RANK) else None


def layering_problems() -> list[str]:
    """Every import that runs up the stages or sideways into a sibling folder, and every private name used
    outside its module."""
    known = modules()
    problems = []
    for name, path in known.items():
        if name == "mpexport":
            continue
        mine = folder(name)
        if mine is None:
            problems.append(f"{name}: a module outside the stage folders")
            continue
        for target, line, names in imports_of(name, path, known):
            theirs = folder(target)
            where = f"{path.relative_to(PACKAGE.parent)}:{line}"
            if theirs is None:
                problems.append(f"{where}: imports the facade {target}")
            elif theirs != mine and RANK[theirs] >= RANK[mine]:
                problems.append(f"{where}: {mine}/ imports {target} ({theirs}/ is not below it)")
            private = [item for item in names if item.startswith("_") and not item.startswith("__")]
            if private and target != name:
                problems.append(f"{where}: takes private {', '.join(private)} from {target}")
    return problems


def circles() -> list[list[str]]:
    """Strongly connected groups of modules (more than one module, or one importing itself)."""
    known = modules()
    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in known.items():
        if name == "mpexport":
            continue
        for target, _, _ in imports_of(name, path, known):
            if target in known and target != "mpexport":
                edges[name].add(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(edges[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in edges[node]:
                groups.append(sorted(group))

    for name in sorted(known):
        if name not in index:
            visit(name)
    return groups


def test_imports_run_only_down_the_stages() -> None:
    assert layering_problems() == []


def test_no_import_circles() -> None:
    assert circles() == []


def test_the_facade_imports_only_base() -> None:
    known = modules()
    targets = {target for target, _, _ in imports_of("mpexport", known["mpexport"], known)}
    assert all(target.startswith("mpexport.base") for target in targets), targets


def test_modules_stay_readable() -> None:
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert {name: size for name, size in sizes.items() if size > LARGEST_MODULE} == {}


def test_the_checks_see_a_circle_and_an_upward_import(tmp_path: Path, monkeypatch) -> None:
    """The walkers themselves: a lazy import inside a function that closes a circle, and one that runs up."""
    package = tmp_path / "mpexport"
    for folder_name in ("base", "graph"):
        (package / folder_name).mkdir(parents=True)
        (package / folder_name / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "base" / "a.py").write_text("def f():\n    from mpexport.graph.b import g\n")
    (package / "graph" / "b.py").write_text("from mpexport.base.a import f\nfrom mpexport.base.a import _x\n")
    monkeypatch.setitem(globals(), "PACKAGE", package)
    assert circles() == [["mpexport.base.a", "mpexport.graph.b"]]
    problems = layering_problems()
    assert any("base/ imports mpexport.graph.b" in problem for problem in problems)
    assert any("private _x" in problem for problem in problems)


if __name__ == "__main__":
    for problem in layering_problems():
        print(problem)
    for group in circles():
        print("circle:", " <-> ".join(group))
    for name, path in modules().items():
        size = len(path.read_text().splitlines())
        if size > LARGEST_MODULE:
            print(f"too large: {name} {size} lines")
