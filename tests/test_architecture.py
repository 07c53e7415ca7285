"""The package's layout: imports go from a stage to an earlier stage or to a shared module only.

Every ``knowlm_nb/*.py`` is read with ``ast`` (imports inside functions
included, so a lazy import cannot hide a cycle). The rules, from the design
handbook:

* stage modules (00-06) import earlier stages and shared modules, never a
  later stage; shared modules import only shared modules; the runners
  (``batch``, ``bench``) may import anything and nothing imports them;
* no import cycle, lazy or not;
* no private name (``_x``) of a module is used from another module or a notebook;
* every module's docstring says its job in its first line.
"""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from knowlm_nb import ROOT

PACKAGE = ROOT / "knowlm_nb"
NOTEBOOKS = ROOT / "notebooks"

# module -> stage number; a stage may import modules of its own or an earlier stage
STAGES = {
    "tiny": 0, "copybase": 0,
    "corpus": 1, "chunking": 1, "indexed_dataset": 1,
    "pretrain": 2, "launch": 2, "sizing": 2,
    "instruct": 3,
    "weights": 4,
    "inference": 5, "serve": 5,
    "widgets": 6,
}
SHARED = {"__init__", "files", "config", "report", "names", "decoding", "ie", "preflight"}
RUNNERS = {"batch", "bench"}


def modules() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PACKAGE.glob("*.py"))}


def _imported(node: ast.AST, importer: str, known: set[str]) -> list[str]:
    """The package modules an ``import`` / ``from ... import`` node brings in."""
    out = []
    if isinstance(node, ast.Import):
        for alias in node.names:
            parts = alias.name.split(".")
            if parts[0] == "knowlm_nb":
                out.append(parts[1] if len(parts) > 1 else "__init__")
    elif isinstance(node, ast.ImportFrom):
        if node.level == 0 and (node.module or "").split(".")[0] != "knowlm_nb":
            return []
        if node.level > 1:
            return []  # nothing lives above the package
        parts = (node.module or "").split(".")
        if node.level == 0:
            parts = parts[1:]
        if parts and parts[0]:
            out.append(parts[0])
        else:  # ``from . import a, b``: modules, or names of the package's __init__
            out += [a.name if a.name in known else "__init__" for a in node.names]
    return [m for m in out if m != importer]


def import_edges() -> list[tuple[str, str, int]]:
    """``(importer, imported, line)`` for every import of a package module, lazy ones included."""
    mods = modules()
    edges = []
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            for target in _imported(node, name, set(mods)):
                edges.append((name, target, node.lineno))
    return edges


def where(module: str, line: int) -> str:
    return f"knowlm_nb/{module}.py:{line}"


def layering_problems(edges, known: set[str]) -> list[str]:
    """Every import that breaks the stage rules, named ``file:line``."""
    problems = []
    for src, dst, line in edges:
        if dst not in known:
            problems.append(f"{where(src, line)}: imports {dst!r}, which is not a module of the package")
        elif dst in RUNNERS:
            problems.append(f"{where(src, line)}: imports the runner {dst!r}; nothing may import a runner")
        elif src in RUNNERS:
            continue
        elif src in SHARED and dst in STAGES:
            problems.append(f"{where(src, line)}: shared module {src!r} imports stage module {dst!r} "
                            f"(stage {STAGES[dst]:02d}); a shared module imports only shared ones")
        elif src in STAGES and dst in STAGES and STAGES[dst] > STAGES[src]:
            problems.append(f"{where(src, line)}: stage {STAGES[src]:02d} module {src!r} imports "
                            f"{dst!r} of the later stage {STAGES[dst]:02d}")
    return problems


def find_cycles(edges) -> list[str]:
    """Each import cycle once, with the line of every import on it."""
    graph: dict[str, dict[str, int]] = {}
    for src, dst, line in edges:
        graph.setdefault(src, {}).setdefault(dst, line)
    cycles, seen = [], set()

    def walk(node, path):
        for nxt in sorted(graph.get(node, {})):
            if nxt in path:
                loop = path[path.index(nxt):] + [nxt]
                key = frozenset(zip(loop, loop[1:]))
                if key not in seen:
                    seen.add(key)
                    cycles.append(" -> ".join(f"{a} ({where(a, graph[a][b])})"
                                              for a, b in zip(loop, loop[1:])) + f" -> {nxt}")
            elif len(path) < 12:
                walk(nxt, path + [nxt])

    for start in sorted(graph):
        walk(start, [start])
    return cycles


def test_every_module_is_placed_in_the_layout():
    unknown = sorted(set(modules()) - set(STAGES) - SHARED - RUNNERS)
    assert not unknown, (
        f"knowlm_nb modules {unknown} are in no stage: add each to STAGES (a stage module), "
        f"SHARED or RUNNERS in {Path(__file__).relative_to(ROOT)}")


def test_imports_follow_the_stages():
    problems = layering_problems(import_edges(), set(modules()))
    assert not problems, "imports against the layout:\n" + "\n".join(problems)


def test_no_import_cycle():
    cycles = find_cycles(import_edges())
    assert not cycles, "import cycles (lazy imports count):\n" + "\n".join(cycles)


def test_the_checks_catch_a_cycle_and_a_forward_import():
    """The rules themselves, on a made-up graph: the test above can fail."""
    edges = [("tiny", "instruct", 618), ("instruct", "tiny", 55), ("files", "tiny", 3),
             ("corpus", "batch", 9), ("bench", "instruct", 4), ("copybase", "tiny", 5)]
    known = {"tiny", "instruct", "files", "corpus", "batch", "bench", "copybase"}
    problems = layering_problems(edges, known)
    assert problems == [
        "knowlm_nb/tiny.py:618: stage 00 module 'tiny' imports 'instruct' of the later stage 03",
        "knowlm_nb/files.py:3: shared module 'files' imports stage module 'tiny' (stage 00); "
        "a shared module imports only shared ones",
        "knowlm_nb/corpus.py:9: imports the runner 'batch'; nothing may import a runner"]
    assert find_cycles(edges) == [
        "instruct (knowlm_nb/instruct.py:55) -> tiny (knowlm_nb/tiny.py:618) -> instruct"]


# ---------------------------------------------------------------- private names

def _private_uses(tree: ast.AST, here: str | None, known: set[str]) -> list[tuple[int, str]]:
    """``(line, what)`` for each private name of another package module used in ``tree``."""
    bound: dict[str, str] = {}  # local name -> package module it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            pkg = node.level == 1 and not node.module or node.level == 0 and node.module == "knowlm_nb"
            for a in node.names:
                if pkg and a.name in known:
                    bound[a.asname or a.name] = a.name
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "knowlm_nb" and len(parts) == 2 and a.asname:
                    bound[a.asname] = parts[1]
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mods = _imported(node, here or "", known)
            target = mods[0] if len(mods) == 1 and node.module else None
            for a in node.names:
                if target and target != here and _private(a.name):
                    uses.append((node.lineno, f"from {'.' * node.level}{node.module} import {a.name}"))
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            base = node.value
            if isinstance(base, ast.Name) and bound.get(base.id) not in (None, here):
                uses.append((node.lineno, f"{base.id}.{node.attr}"))
            elif (isinstance(base, ast.Attribute) and isinstance(base.value, ast.Name)
                  and base.value.id == "knowlm_nb" and base.attr in known and base.attr != here):
                uses.append((node.lineno, f"knowlm_nb.{base.attr}.{node.attr}"))
    return uses


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _notebook_code(path: Path) -> str:
    """A notebook's code cells as one module (IPython magics and shell lines blanked)."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    lines = []
    for cell in cells:
        if cell["cell_type"] == "code":
            src = "".join(cell["source"])
            lines += ["" if ln.lstrip().startswith(("%", "!")) else ln for ln in src.splitlines()]
    return "\n".join(lines)


# Uses that another open change removes (issue 22 makes config's type check public);
# ``file: what``, without the line. Delete an entry once that change is merged.
PENDING: set[str] = set()  # private uses waiting for a fix elsewhere (none)


def test_no_private_name_is_used_outside_its_module():
    known = set(modules())
    problems = []
    for name, path in modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        problems += [f"{where(name, line)}: {what}" for line, what in _private_uses(tree, name, known)
                     if f"knowlm_nb/{name}.py: {what}" not in PENDING]
    for nb in sorted(NOTEBOOKS.glob("*.ipynb")):
        tree = ast.parse(_notebook_code(nb))
        problems += [f"notebooks/{nb.name} (code line {line}): {what}"
                     for line, what in _private_uses(tree, None, known)]
    assert not problems, "private names used outside their module:\n" + "\n".join(problems)


def test_the_private_name_check_sees_every_form():
    code = ("from . import tiny, instruct\nfrom .tiny import _ZH_GIVEN, NameMaker\n"
            "import knowlm_nb.report as report\n"
            "def f():\n    from .tiny import _byte_level_bytes\n"
            "    return tiny._MONTHS, report._atomic_write_json, instruct._own, tiny.__name__\n")
    uses = _private_uses(ast.parse(code), "instruct", {"tiny", "instruct", "report"})
    assert sorted(uses) == [(2, "from .tiny import _ZH_GIVEN"), (5, "from .tiny import _byte_level_bytes"),
                            (6, "report._atomic_write_json"), (6, "tiny._MONTHS")]


# ---------------------------------------------------------------- docstrings

@pytest.mark.parametrize("name", sorted(modules()))
def test_every_module_states_its_job_in_its_first_docstring_line(name):
    doc = ast.get_docstring(ast.parse(modules()[name].read_text(encoding="utf-8")))
    first = (doc or "").strip().splitlines()[0].strip() if (doc or "").strip() else ""
    assert first, f"knowlm_nb/{name}.py has no docstring saying its job in its first line"
    assert len(first) <= 110, f"knowlm_nb/{name}.py: first docstring line over 110 characters: {first!r}"
