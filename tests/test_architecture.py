"""The package's import graph obeys the layer table in docs/architecture.md.

Every import between fusedist modules is walked from the source (top-level and the ones
inside functions alike): no module imports a layer above its own, within a layer a component
imports only the ones listed before it, the graph has no circles, and every import inside a
function says in a ``# lazy:`` comment why it is not at the top (keeping torch, Ray or MLflow
out of a command's start-up is the reason there is).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "fusedist"


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    line: int
    local: bool


def modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def edges(mods: dict[str, Path]) -> list[Edge]:
    out = []
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        local = {id(n) for f in ast.walk(tree)
                 if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                # ``from pkg import sub`` imports the submodule when there is one
                names = [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for n in names:
                if not n.startswith("fusedist"):
                    continue
                dst = _resolve(n, mods)
                if dst and dst != mod and not mod.startswith(dst + "."):
                    out.append(Edge(mod, dst, node.lineno, id(node) in local))
    return out


def layer_table() -> list[list[str]]:
    """The components of each layer, bottom first, in the order the table lists them."""
    text = (REPO / "docs" / "architecture.md").read_text()
    rows = re.findall(r"^\|\s*(\d+)\.[^|]*\|([^|]*)\|", text, re.M)
    assert rows, "docs/architecture.md has no layer table"
    table = {int(n): re.findall(r"`([^`]+)`", cell) for n, cell in rows}
    return [[c.removesuffix(".py").removesuffix("/").replace("/", ".")
             for c in table[n]] for n in sorted(table)]


def place(mod: str, table: list[list[str]]) -> tuple[int, int]:
    """(layer, position in its row) of a module: the longest listed component it is in."""
    best = None
    for li, row in enumerate(table):
        for ci, comp in enumerate(row):
            full = f"fusedist.{comp}"
            if mod == full or mod.startswith(full + "."):
                if best is None or len(comp) > best[2]:
                    best = (li, ci, len(comp))
    assert best is not None or mod == "fusedist", \
        f"{mod} is in no layer of docs/architecture.md: add it to the layer table"
    return (best[0], best[1]) if best else (-1, -1)


def test_every_module_has_a_layer_and_no_import_runs_up():
    mods, table = modules(), layer_table()
    bad = []
    for e in edges(mods):
        if e.dst == "fusedist":
            continue
        (ls, cs), (ld, cd) = place(e.src, table), place(e.dst, table)
        if ld > ls or (ld == ls and cd > cs):
            bad.append(f"{mods[e.src].relative_to(REPO)}:{e.line} {e.src} -> {e.dst}")
    assert not bad, "imports that run up a layer (docs/architecture.md):\n" + "\n".join(bad)


def cycles(mods: dict[str, Path], es: list[Edge]) -> list[list[str]]:
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for e in es:
        graph[e.src].add(e.dst)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    mods = modules()
    found = cycles(mods, edges(mods))
    assert not found, "import circles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_every_function_local_import_says_why():
    mods = modules()
    bad = []
    for e in edges(mods):
        if not e.local:
            continue
        lines = mods[e.src].read_text().splitlines()
        here = lines[e.line - 1]
        i = e.line - 2  # one comment may head a block of lazy imports
        while i >= 0 and lines[i].strip().startswith(("from ", "import ")):
            i -= 1
        above = lines[i].strip() if i >= 0 else ""
        if "# lazy:" not in here and not above.startswith("# lazy:"):
            bad.append(f"{mods[e.src].relative_to(REPO)}:{e.line} {here.strip()}")
    assert not bad, ("imports inside functions need a '# lazy: <why>' comment (on the line or "
                     "the line above), or belong at the top of the module:\n" + "\n".join(bad))


def test_the_checker_sees_a_violation(tmp_path):
    # The walk itself must catch a function-local import that runs up and one that circles.
    src = "def f():\n    from fusedist.cli import main\n"
    tree = ast.parse(src)
    imp = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)][0]
    assert imp.module == "fusedist.cli"
    table = layer_table()
    assert place("fusedist.cli", table)[0] > place("fusedist.storage", table)[0]
    mods = {"fusedist.a": tmp_path / "a.py", "fusedist.b": tmp_path / "b.py"}
    assert cycles(mods, [Edge("fusedist.a", "fusedist.b", 1, True),
                         Edge("fusedist.b", "fusedist.a", 1, False)]) == [["fusedist.a",
                                                                          "fusedist.b"]]
