"""The package's import graph, read statically (ast): no import cycles, and an image side on the stdlib.

Two rules the layout rests on, checked here rather than only written in docstrings:

* no cycle among llm2wasm modules. Every import counts, at module level and inside functions: a lazy
  import still ties the two modules (each needs the other to work, and neither can move or be tested
  alone). Only ``if TYPE_CHECKING:`` imports are left out: they never run.
* what ships into the image and runs there imports only the standard library and other image-side
  modules at import time; torch, transformers, mlc_llm ... are imported inside the functions that
  need them, so ``llm2wasm --help``, ``batch check`` or ``preview`` start without them.
"""

from __future__ import annotations

import ast
import itertools
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
PACKAGE = "llm2wasm"

# What runs inside the image is the llm2wasm.image subpackage (images/app/Dockerfile pip-installs the
# package; its ENTRYPOINT is the `llm2wasm` console script, pyproject.toml: llm2wasm.image.cli:main)
# plus the two shared modules below. The host's toolkit (llm2wasm.host) may import the image side,
# never the reverse: the image has none of the host's dependencies.
IMAGE_PACKAGE = "llm2wasm.image"
HOST_PACKAGE = "llm2wasm.host"
SHARED = {
    "llm2wasm": "the package itself (__version__): imported with every module",
    "llm2wasm.errors": "UsageError and the exit status, raised and caught on both sides",
}
# copied alone into a layer and run there as a script (images/ml, images/runtime-env) or piped into
# an image's python (llm2wasm.host.build): nothing of the package is there
SCRIPTS_PACKAGE = "llm2wasm.image.scripts"
ENTRY_POINT = "llm2wasm.image.cli"


def _inside(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def image_side(modules: dict[str, Path]) -> set[str]:
    return {name for name in modules if _inside(name, IMAGE_PACKAGE)} | set(SHARED)


# --- the checker --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported name, absolute ("llm2wasm.image.convert.inputs", "yaml", "os.path")
    line: int
    module_level: bool  # runs when the importing module is imported (not inside a function)
    type_checking: bool  # under `if TYPE_CHECKING:`: never runs


def package_modules(src: Path, package: str) -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name, for its __init__.py)."""
    modules = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, module_level: bool, type_checking: bool) -> Iterator[tuple[ast.AST, bool, bool]]:
    for child in ast.iter_child_nodes(node):
        yield child, module_level, type_checking
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            yield from _walk(child, False, type_checking)
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for statement in child.body:
                yield statement, module_level, True
                yield from _walk(statement, module_level, True)
            for statement in child.orelse:
                yield statement, module_level, type_checking
                yield from _walk(statement, module_level, type_checking)
        else:
            yield from _walk(child, module_level, type_checking)


def module_imports(name: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    """Every import statement of one module, at any depth, resolved to absolute names.

    A name inside the package resolves to the most specific module it names: `from . import docker`
    is llm2wasm.host.docker, `from .. import __version__` is llm2wasm (its __init__)."""
    is_package = path.name == "__init__.py"
    imports = []
    for node, module_level, type_checking in _walk(ast.parse(path.read_text(), str(path)), True, False):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = name.split(".") if is_package else name.split(".")[:-1]
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        for target in dict.fromkeys(targets):
            imports.append(Import(name, target, node.lineno, module_level, type_checking))
    return imports


def internal_module(target: str, modules: dict[str, Path]) -> str | None:
    """The package module an import loads (`llm2wasm.image.convert.inputs.X` -> llm2wasm.image.convert.inputs)."""
    parts = target.split(".")
    while parts:
        if ".".join(parts) in modules:
            return ".".join(parts)
        parts.pop()
    return None


def import_graph(src: Path, package: str) -> dict[str, dict[str, int]]:
    """module -> {package module it imports: first line}, every runtime import (TYPE_CHECKING left out)."""
    modules = package_modules(src, package)
    graph: dict[str, dict[str, int]] = {name: {} for name in modules}
    for name, path in modules.items():
        for found in module_imports(name, path, modules):
            target = internal_module(found.target, modules)
            if target and target != name and not found.type_checking:
                graph[name].setdefault(target, found.line)
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The cycles (first module repeated at the end): in each strongly connected group of modules
    (Tarjan), the shortest cycle through each of its members."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            connect(node)

    cycles = []
    for group in groups:  # the shortest cycle through each member, each cycle once
        for start in sorted(group):
            cycle = _shortest_cycle(graph, group, start)
            turn = cycle.index(min(cycle))
            cycle = [*cycle[turn:-1], *cycle[:turn], cycle[turn]]
            if cycle not in cycles:
                cycles.append(cycle)
    return sorted(cycles)


def _shortest_cycle(graph: dict[str, dict[str, int]], group: set[str], start: str) -> list[str]:
    paths = {start: [start]}
    frontier = [start]
    while frontier:  # breadth first, inside the group: some way back to start always exists
        following = []
        for node in frontier:
            for target in sorted(graph[node]):
                if target == start:
                    return [*paths[node], start]
                if target in group and target not in paths:
                    paths[target] = [*paths[node], target]
                    following.append(target)
        frontier = following
    raise AssertionError(f"{start} is on no cycle of its group")


def describe_cycle(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    steps = [f"{source} (line {graph[source][target]})" for source, target in itertools.pairwise(cycle)]
    return " -> ".join([*steps, cycle[-1]])


def foreign_imports(src: Path, package: str, allowed_modules: set[str], checked: set[str]) -> list[str]:
    """Module-level imports of the `checked` modules that are neither the standard library nor one
    of `allowed_modules` (TYPE_CHECKING imports left out)."""
    modules = package_modules(src, package)
    problems = []
    for name in sorted(checked):
        for found in module_imports(name, modules[name], modules):
            if not found.module_level or found.type_checking:
                continue
            inside = internal_module(found.target, modules)
            if inside is not None:
                if inside not in allowed_modules:
                    problems.append(f"{name} (line {found.line}) imports {inside}, which is not image side")
            elif found.target.split(".")[0] == package:
                problems.append(f"{name} (line {found.line}) imports {found.target}, which does not exist")
            elif found.target.split(".")[0] not in sys.stdlib_module_names:
                problems.append(f"{name} (line {found.line}) imports {found.target} at module level")
    return problems


def reachable(graph: dict[str, dict[str, int]], start: str) -> set[str]:
    seen = {start}
    todo = [start]
    while todo:
        for target in graph[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


# --- the package --------------------------------------------------------------------------------------


def test_no_import_cycles():
    graph = import_graph(SRC, PACKAGE)
    cycles = find_cycles(graph)
    assert not cycles, "import cycles among llm2wasm modules:\n" + "\n".join(
        describe_cycle(cycle, graph) for cycle in cycles
    )


def test_image_side_imports_only_the_standard_library_at_module_level():
    image = image_side(package_modules(SRC, PACKAGE))
    problems = foreign_imports(SRC, PACKAGE, image, image)
    assert not problems, "image-side modules import more than the standard library at import time:\n" + "\n".join(
        problems
    )


def test_image_side_never_imports_the_host_toolkit():
    """Not even inside a function: the host's modules need packages the image does not have."""
    graph = import_graph(SRC, PACKAGE)
    image = image_side(package_modules(SRC, PACKAGE))
    problems = [
        f"{name} (line {line}) imports {target}"
        for name in sorted(image)
        for target, line in graph[name].items()
        if _inside(target, HOST_PACKAGE)
    ]
    assert not problems, "the image side imports the host toolkit:\n" + "\n".join(problems)


def test_the_command_reaches_only_the_image_side():
    modules = package_modules(SRC, PACKAGE)
    assert ENTRY_POINT in modules
    outside = reachable(import_graph(SRC, PACKAGE), ENTRY_POINT) - image_side(modules)
    assert not outside, f"{ENTRY_POINT} reaches modules outside the image side: {sorted(outside)}"


def test_the_two_worlds_and_the_shared_modules_are_all_there_is():
    modules = package_modules(SRC, PACKAGE)
    stray = {name for name in modules if not (_inside(name, IMAGE_PACKAGE) or _inside(name, HOST_PACKAGE))}
    assert stray == set(SHARED), f"modules outside llm2wasm.image and llm2wasm.host: {sorted(stray - set(SHARED))}"
    graph = import_graph(SRC, PACKAGE)
    for name in SHARED:
        assert set(graph[name]) <= set(SHARED), f"{name} is shared and may import only {sorted(SHARED)}"


def test_standalone_scripts_import_no_llm2wasm_module():
    """Copied alone into an image (or piped into its python): nothing of the package is there."""
    graph = import_graph(SRC, PACKAGE)
    scripts = [name for name in graph if name.startswith(SCRIPTS_PACKAGE + ".")]
    assert len(scripts) == 3
    for name in scripts:
        assert not graph[name], f"{name} runs alone in an image but imports {sorted(graph[name])}"


# --- the checker can fail -------------------------------------------------------------------------------


def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_checker_reports_a_cycle(tmp_path):
    src = _plant(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from . import b\n",
            "pkg/b.py": "def f():\n    from .a import thing  # lazy, still a cycle\n",
            "pkg/c.py": "import pkg.a\n",
            "pkg/sub/__init__.py": "",
            "pkg/sub/d.py": "from ..c import x\n",
            "pkg/sub/e.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .d import y\n",
        },
    )
    graph = import_graph(src, "pkg")
    assert graph["pkg.a"] == {"pkg.b": 1}
    assert graph["pkg.b"] == {"pkg.a": 2}
    assert graph["pkg.c"] == {"pkg.a": 1}
    assert graph["pkg.sub.d"] == {"pkg.c": 1}
    assert graph["pkg.sub.e"] == {}  # type-only
    cycles = find_cycles(graph)
    assert cycles == [["pkg.a", "pkg.b", "pkg.a"]]
    assert describe_cycle(cycles[0], graph) == "pkg.a (line 1) -> pkg.b (line 2) -> pkg.a"


def test_checker_reports_a_longer_cycle_through_a_subpackage(tmp_path):
    src = _plant(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from .sub.b import f\n",
            "pkg/sub/__init__.py": "",
            "pkg/sub/b.py": "from . import c\n",
            "pkg/sub/c.py": "def g():\n    import pkg.a\n",
        },
    )
    assert find_cycles(import_graph(src, "pkg")) == [["pkg.a", "pkg.sub.b", "pkg.sub.c", "pkg.a"]]


def test_checker_reports_a_third_party_import_on_the_image_side(tmp_path):
    src = _plant(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/img.py": (
                "import json\nimport os.path\nfrom typing import TYPE_CHECKING\n"
                "import yaml\n"
                "from . import host\n"
                "if TYPE_CHECKING:\n    import torch\n"
                "def f():\n    import transformers\n"
            ),
            "pkg/host.py": "import requests\n",
        },
    )
    problems = foreign_imports(src, "pkg", {"pkg", "pkg.img"}, {"pkg.img"})
    assert problems == [
        "pkg.img (line 4) imports yaml at module level",
        "pkg.img (line 5) imports pkg.host, which is not image side",
    ]
    assert foreign_imports(src, "pkg", {"pkg", "pkg.img", "pkg.host"}, {"pkg.img"}) == [problems[0]]
