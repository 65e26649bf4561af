"""The layering rules of docs/architecture.md, checked on the source with `ast` (nothing is imported):

- every module imports only from its own layer or those below (the table of docs/architecture.md);
- `calm.models` and `calm.data` reach neither the store, the evaluation nor the commands, directly or
  through other modules;
- no import cycle between modules of `calm`;
- no module of 400 lines or more, no function (or method) over 60 lines;
- every module opens with a docstring (its one job), and docs/architecture.md names every top-level one.

Every import statement counts: module level, inside functions and methods, under `if TYPE_CHECKING:`.
An import names the most specific module it loads (`from calm.store import reader` -> calm.store.reader,
`from calm.store import load_features` -> calm.store).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
FORBIDDEN_FOR_LOWER_LAYERS = ("calm.store", "calm.evaluate", "calm.commands")
# docs/architecture.md, "Layers": a top-level module or package of calm -> its layer
LAYERS = {
    # the package root, the public face: at run time it imports only calm._version and calm.errors
    # and loads the public names lazily; its `if TYPE_CHECKING:` imports name them from layers 1-5.
    "calm": 5,
    "calm._version": 0,
    "calm.errors": 0,
    "calm._files": 0,
    "calm._safetensors": 0,
    "calm.cache": 0,
    "calm._heads": 0,
    "calm._calibration": 0,
    "calm.prompts": 0,
    "calm.methods": 0,  # the method registry: data and lazily imported factories, importing no calm module
    "calm.audio": 1,
    "calm.video": 1,
    "calm.audio_inputs": 1,
    "calm.audio_stream": 1,
    "calm.data": 1,
    "calm.models": 2,
    "calm.answering": 2,  # the model answering: chat_lm, parse, zeroshot, pseudolabel, clips
    "calm.store": 3,
    "calm.serialization": 4,
    "calm.classifiers": 4,
    "calm.selftraining": 4,
    "calm.evaluate": 5,
    "calm.figures": 5,
    "calm.inference": 5,
    "calm.clip_features": 5,
    "calm.audio_classifier": 5,
    "calm.audio_classifier_files": 5,
    "calm.detection": 5,
    "calm.timeline": 5,
    "calm.serve": 6,
    "calm.commands": 6,
    "calm.cli": 6,
}


def all_modules(src: Path = SRC) -> dict[str, Path]:
    """Dotted name -> file of every module of the `calm` package under `src`."""
    modules = {}
    for path in sorted((src / "calm").rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The calm modules `name` (at `path`) imports anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
    return {m for m in found if m in modules and m != name}


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """Module -> the calm modules it imports."""
    modules = all_modules(src)
    return {name: imports_of(name, path, set(modules)) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def reachable(graph: dict[str, set[str]], start: str) -> dict[str, str]:
    """Every module `start` loads, directly or not, mapped to the module that imports it."""
    via: dict[str, str] = {}
    todo = [start]
    while todo:
        v = todo.pop()
        for w in sorted(graph[v]):
            if w not in via and w != start:
                via[w] = v
                todo.append(w)
    return via


def in_package(module: str, package: str) -> bool:
    """Whether `module` is `package` or inside it."""
    return module == package or module.startswith(package + ".")


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "calm"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from calm.sub import c\n    import calm.a\n")
    (pkg / "sub" / "c.py").write_text("from ..a import x\n")
    (pkg / "a.py").write_text("if True:\n    from .sub.b import f\n")
    graph = import_graph(tmp_path)
    assert graph == {
        "calm": set(),
        "calm.a": {"calm.sub.b"},
        "calm.sub": {"calm.sub.b"},
        "calm.sub.b": {"calm.sub.c", "calm.a"},
        "calm.sub.c": {"calm.a"},
    }
    assert cycles(graph) == [["calm.a", "calm.sub.b", "calm.sub.c"]]
    assert reachable(graph, "calm.sub.c") == {"calm.a": "calm.sub.c", "calm.sub.b": "calm.a"}


@pytest.mark.parametrize("layer", ["calm.models", "calm.data"])
def test_models_and_data_never_reach_store_evaluation_or_commands(layer):
    graph = import_graph()
    bad = []
    for module in (m for m in graph if in_package(m, layer)):
        for target, importer in reachable(graph, module).items():
            if any(in_package(target, f) for f in FORBIDDEN_FOR_LOWER_LAYERS):
                bad.append(f"{module} -> ... -> {importer} -> {target}")
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_modules_under_400_lines_and_functions_at_most_60():
    too_long = []
    for name, path in all_modules().items():
        text = path.read_text()
        if text.count("\n") >= 400:
            too_long.append(f"{name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > 60:
                    too_long.append(f"{name}.{node.name} (line {node.lineno}): {length} lines")
    assert not too_long, "\n".join(too_long)


def top_level(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_every_module_imports_only_its_own_layer_or_lower():
    graph = import_graph()
    unplaced = sorted({top_level(m) for m in graph} - set(LAYERS))
    assert not unplaced, f"give these a layer in docs/architecture.md and LAYERS: {unplaced}"
    upward = [
        f"{a} (layer {LAYERS[top_level(a)]}) imports {b} (layer {LAYERS[top_level(b)]})"
        for a, targets in graph.items()
        for b in sorted(targets)
        if LAYERS[top_level(b)] > LAYERS[top_level(a)]
    ]
    assert not upward, "\n".join(upward)


def test_every_module_says_its_job_and_the_architecture_doc_names_it():
    doc = (SRC.parent / "docs" / "architecture.md").read_text()
    silent = [m for m, p in all_modules().items() if not ast.get_docstring(ast.parse(p.read_text()))]
    assert not silent, f"modules without an opening docstring: {silent}"
    missing = sorted(m for m in {top_level(m) for m in all_modules()} if f"`{m}`" not in doc)
    assert not missing, f"docs/architecture.md does not name {missing}"
