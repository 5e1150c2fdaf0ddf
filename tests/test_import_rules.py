"""Import rules of the library, checked on the source with ``ast`` (issue #14: the library decides, the
stages adapt).

The scan sees every ``import`` statement in a module, wherever it is: at the top, inside a function (a
lazy import), under ``if TYPE_CHECKING:``, and ``importlib.import_module("dfka....")`` with a constant
name. So a rule cannot be dodged by hiding an import in a function body.

1. The training core (the method, ``dfka.amalgamation``, and the engine, ``dfka.engine``) imports
   nothing from the orchestration layers (stages, bench, CLI, ops tooling, experiment schema) nor kfp,
   directly or through other dfka modules.
2. The engine is below the method: ``dfka.engine`` never reaches ``dfka.amalgamation`` or the baselines.
3. No dfka module imports kfp: ``components/`` and ``pipelines/`` (outside ``src/dfka``) wrap the library.
4. The dfka-internal import graph has no cycles.
"""

from __future__ import annotations

import ast
import textwrap
from collections import deque
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "dfka"
CORE = ("dfka.amalgamation", "dfka.engine")
ENGINE = ("dfka.engine",)
#: what the engine must not reach: the method it runs
FORBIDDEN_FOR_ENGINE = ("dfka.amalgamation", "dfka.baselines")
#: what the training core must not reach, directly or transitively
FORBIDDEN_FOR_CORE = (
    "dfka.stages",
    "dfka.bench",
    "dfka.cli",
    "dfka.ops",
    "dfka.pipeline_config",
    "kfp",
)


@dataclass(frozen=True)
class Edge:
    source: str  # importing module
    target: str  # imported module: a dfka module of the tree, or an external top-level package
    line: int


def _inside(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def scan(root: Path, package: str = PACKAGE) -> tuple[set[str], list[Edge]]:
    """The modules of ``package`` under ``root`` and every import edge between them (plus edges to
    external top-level packages), from the source alone: nothing is imported."""
    files = {_module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}
    modules = set(files)
    # namespace packages (folders without __init__.py) are importable names too, but run no code
    packages = {m.rsplit(".", 1)[0] for m in modules if "." in m} | {package}

    def resolve(name: str, line: int, source: str) -> Edge | None:
        if not _inside(name, package):
            return Edge(source, name.split(".")[0], line)
        while name and name not in modules:  # ``import dfka.a.b.attr``-style: the deepest module named
            if name in packages:
                return None  # a namespace package: nothing runs
            name = name.rpartition(".")[0]
        return Edge(source, name, line) if name and name != source else None

    edges: list[Edge] = []
    for module, path in files.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            found: list[Edge | None] = []
            if isinstance(node, ast.Import):
                found = [resolve(alias.name, node.lineno, module) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = module.split(".") if is_pkg else module.split(".")[:-1]
                    base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if _inside(base, package) and (sub in modules or sub in packages):
                        found.append(resolve(sub, node.lineno, module))
                    else:
                        found.append(resolve(base, node.lineno, module))
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute | ast.Name)
                and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id)
                == "import_module"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                found = [resolve(node.args[0].value, node.lineno, module)]
            edges.extend(e for e in found if e is not None)
    return modules, edges


def _parents(module: str, modules: set[str]) -> list[str]:
    """The package ``__init__`` modules Python runs before ``module``."""
    parts = module.split(".")
    return [p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in modules]


def _chain(path: list[Edge]) -> str:
    return " -> ".join(f"{e.source}:{e.line}" for e in path) + f" -> {path[-1].target}"


def forbidden_imports(
    modules: set[str], edges: list[Edge], sources: tuple[str, ...], forbidden: tuple[str, ...]
) -> list[str]:
    """One message per (source module, forbidden target) reachable through dfka modules, shortest
    chain first. Importing ``a.b.c`` runs the ``__init__`` of ``a`` and ``a.b``: those count as reached."""
    out: dict[str, list[Edge]] = {}
    for e in edges:
        out.setdefault(e.source, []).append(e)
        for parent in _parents(e.target, modules):
            if parent != e.source:
                out[e.source].append(Edge(e.source, parent, e.line))
    problems = []
    for start in sorted(m for m in modules if any(_inside(m, s) for s in sources)):
        seen = {start}
        queue: deque[tuple[str, list[Edge]]] = deque([(start, [])])
        hits: dict[str, list[Edge]] = {}
        while queue:
            module, path = queue.popleft()
            for e in out.get(module, []):
                bad = next((f for f in forbidden if _inside(e.target, f)), None)
                if bad is not None:
                    hits.setdefault(e.target, [*path, e])
                elif e.target in modules and e.target not in seen:
                    seen.add(e.target)
                    queue.append((e.target, [*path, e]))
        for target, path in sorted(hits.items()):
            first = path[0]
            problems.append(
                f"{start} (line {first.line}) reaches forbidden {target}: {_chain(path)}"
                + ("" if len(path) == 1 else " (transitively)")
            )
    return problems


def imports_of(edges: list[Edge], package: str) -> list[str]:
    return [f"{e.source} line {e.line} imports {e.target}" for e in edges if e.target == package]


def cycles(modules: set[str], edges: list[Edge]) -> list[str]:
    """One message per strongly connected component of the dfka-internal graph that has a cycle, with
    one concrete cycle (module:line -> ...) in it."""
    graph: dict[str, list[Edge]] = {m: [] for m in modules}
    for e in edges:
        if e.target in modules:
            graph[e.source].append(e)
    # Tarjan, iteratively
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            succ = graph[node]
            if i < len(succ):
                work.append((node, i + 1))
                nxt = succ[i].target
                if nxt not in index:
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                components.append(comp)
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    problems = []
    for comp in components:
        members = set(comp)
        if len(comp) == 1 and not any(e.target == comp[0] for e in graph[comp[0]]):
            continue
        # a concrete cycle: BFS from the smallest member back to itself inside the component
        start = min(members)
        queue: deque[tuple[str, list[Edge]]] = deque([(start, [])])
        seen = {start}
        cycle: list[Edge] = []
        while queue and not cycle:
            node, path = queue.popleft()
            for e in graph[node]:
                if e.target == start:
                    cycle = [*path, e]
                    break
                if e.target in members and e.target not in seen:
                    seen.add(e.target)
                    queue.append((e.target, [*path, e]))
        problems.append(f"import cycle among {sorted(members)}: {_chain(cycle)}")
    return sorted(problems)


def summary(modules: set[str], edges: list[Edge]) -> str:
    internal = {(e.source, e.target) for e in edges if e.target in modules}
    return f"{len(modules)} modules, {len(internal)} internal edges, {len(cycles(modules, edges))} cycles"


# --------------------------------------------------------------------------------------------- the rules


def test_training_core_imports_no_orchestration():
    modules, edges = scan(SRC)
    for package in CORE:
        assert any(_inside(m, package) for m in modules), f"the scan found no {package} module"
    problems = forbidden_imports(modules, edges, CORE, FORBIDDEN_FOR_CORE)
    assert not problems, "the training core must not import orchestration code:\n" + "\n".join(problems)


def test_the_engine_runs_the_method_without_importing_it():
    modules, edges = scan(SRC)
    problems = forbidden_imports(modules, edges, ENGINE, FORBIDDEN_FOR_ENGINE)
    assert not problems, "dfka.engine must not import the method:\n" + "\n".join(problems)


def test_library_never_imports_kfp():
    _, edges = scan(SRC)
    problems = imports_of(edges, "kfp")
    assert not problems, "only components/ and pipelines/ may import kfp:\n" + "\n".join(problems)


def test_no_import_cycles():
    modules, edges = scan(SRC)
    problems = cycles(modules, edges)
    assert not problems, "dfka modules import each other in a cycle:\n" + "\n".join(problems)


# ------------------------------------------------------------------------------ the checker catches things


def test_checker_catches_cycles_lazy_and_transitive_imports(tmp_path):
    pkg = tmp_path / "dfka"
    files = {
        "__init__.py": "",
        "core/a.py": """
            from dfka.core import b
            from ..helper import thing
        """,
        "core/b.py": """
            def later():
                from dfka.core.a import x  # a lazy import closing the cycle a -> b -> a
        """,
        "helper.py": """
            import typing
            if typing.TYPE_CHECKING:
                import dfka.orchestration.doctor
            def f():
                import kfp.dsl
        """,
        "orchestration/__init__.py": "",
        "orchestration/doctor.py": "",
    }
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(textwrap.dedent(text))
    modules, edges = scan(tmp_path)
    assert "dfka.core.a" in modules and "dfka.core" not in modules  # a namespace package

    found = cycles(modules, edges)
    assert len(found) == 1 and "dfka.core.a:2 -> dfka.core.b:3 -> dfka.core.a" in found[0], found

    bad = forbidden_imports(modules, edges, ("dfka.core",), ("dfka.orchestration", "kfp"))
    assert any(
        p.startswith("dfka.core.a (line 3) reaches forbidden kfp")
        and "dfka.core.a:3 -> dfka.helper:6 -> kfp" in p
        for p in bad
    ), bad
    assert any("dfka.helper:4 -> dfka.orchestration.doctor" in p for p in bad), bad
    # b reaches helper through a: the chain names every hop
    assert any("dfka.core.b:3 -> dfka.core.a:3 -> dfka.helper:6 -> kfp" in p for p in bad), bad
    assert imports_of(edges, "kfp") == ["dfka.helper line 6 imports kfp"]
