"""hybridtune's import graph, built from the source (function-level imports counted, `TYPE_CHECKING`
blocks not: they never run): no cycle, and no import from a lower layer into a higher one. The layers
are named in docs/ARCHITECTURE.md ("Layers"); a module not in any layer fails the test too."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "hybridtune"
# bottom to top; a module's layer is that of the longest name (a dotted prefix) that matches it
LAYERS = [
    (
        "",
        "errors",
        "paths",
        "safe_yaml",
        "durable",
        "device",
        "distributed",
        "batching",
        "children",
        "train.precision",
    ),
    ("bundled", "rundir", "model", "data", "generation"),
    ("tasks",),  # the registry and the contract: tasks/__init__.py, base.py, baseline.py
    ("report",),  # renderers and statistics over run files
    ("strategy",),
    ("tasks.classification", "tasks.token_classification", "tasks.prompt_classification", "tasks.causal_lm"),
    ("recipe", "ensemble.config", "self_training.config"),
    ("train",),
    ("inference",),
    ("run",),
    ("ensemble", "export", "distillation", "self_training"),
    ("serve",),
    ("compare", "search"),
    ("api",),
    ("cli", "cli_artifacts", "__main__"),
]


def modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def layer_of(module: str) -> int | None:
    rel = module.removeprefix("hybridtune").removeprefix(".")
    best = None
    for i, names in enumerate(LAYERS):
        for n in names:
            if rel == n or (n and rel.startswith(n + ".")):
                if best is None or len(n) >= best[1]:
                    best = (i, len(n))
    return best[0] if best else None


def imports(mods: dict[str, Path]) -> list[tuple[str, str, bool, int]]:
    """(importer, imported module, inside a function, line) for every hybridtune import that runs."""
    found = []
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip, in_function = set(), set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
                skip |= {id(n) for n in ast.walk(node)}
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                in_function |= {id(n) for n in ast.walk(node)}
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in skip or not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*up, base] if base else up)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for target in targets:
                if not target.startswith("hybridtune"):
                    continue
                while target not in mods and "." in target:
                    target = target.rpartition(".")[0]
                if target in mods and target != name:
                    found.append((name, target, id(node) in in_function, node.lineno))
    return found


def test_every_module_has_a_layer():
    assert [m for m in modules() if layer_of(m) is None] == []


def test_no_import_goes_up_a_layer():
    mods = modules()
    up = [
        f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)}), line {line}"
        for a, b, _, line in imports(mods)
        if layer_of(b) > layer_of(a) and not b.startswith(a + ".")  # a package may import its own modules
    ]
    assert up == []


def test_no_cycle_function_level_imports_included():
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for a, b, _, _ in imports(mods):
        if not b.startswith(a + "."):  # a package importing its own modules is not a cycle back
            graph[a].add(b)
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert cycles == []


def test_the_checks_see_an_import_inside_a_function(tmp_path):
    """The checks can fail: a lower module importing a higher one inside a function is found."""
    fake = tmp_path / "hybridtune"
    fake.mkdir()
    (fake / "errors.py").write_text("def f():\n    from hybridtune import api\n")
    (fake / "api.py").write_text("from hybridtune import errors\n")
    mods = {"hybridtune.errors": fake / "errors.py", "hybridtune.api": fake / "api.py"}
    found = imports(mods)
    assert ("hybridtune.errors", "hybridtune.api", True, 2) in found
    assert layer_of("hybridtune.api") > layer_of("hybridtune.errors")
