"""The house rules that keep the package readable, checked: small modules, imports that only go down
the layers, no import circles, and one stage contract (every training stage is a StageSpec)."""

from __future__ import annotations

import ast
import os
import pathlib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "align_jax")
MAX_LINES = 400


def modules() -> dict[str, str]:
    out = {}
    for directory, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[module.removesuffix(".__init__")] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the align_jax modules it imports, at the top or inside functions (a lazy import that
    closes a circle is still a circle)."""
    mods = modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(pathlib.Path(path).read_text())):
            if isinstance(node, ast.Import):
                deps |= {resolve(a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps |= {resolve(f"{node.module}.{a.name}") for a in node.names}
        graph[module] = {d for d in deps if d and d != module and d != "align_jax"}
    return graph


def test_no_module_over_400_lines():
    files = [
        *modules().values(),
        *pathlib.Path(ROOT, "launch").glob("*.py"),
        *pathlib.Path(ROOT, "configs").glob("*.py"),
    ]
    long = {str(p): n for p in files if (n := len(pathlib.Path(p).read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these by what they hold: {long}"


def test_nothing_imports_up_into_stages():
    graph = import_graph()
    up = sorted(
        (m, d)
        for m, ds in graph.items()
        for d in ds
        if d.startswith("align_jax.stages") and not m.startswith("align_jax.stages")
    )
    assert not up, up


def test_no_import_circles():
    graph = import_graph()
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not circles, circles


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo", "grpo", "pas"])
def test_every_training_stage_is_a_spec(stage):
    from align_jax import stages
    from align_jax.stages import runner

    module = stages.get(stage)
    assert callable(module.run)
    if stage != "pas":  # pas curates, then trains through the sft spec
        assert module.run.__doc__.startswith("Trains the stage of"), module.run
        assert callable(module.spec)
    assert callable(runner.Run)


def test_batch_fields_are_declared_once():
    from align_jax.batch import PAIR_BATCH, SFT_BATCH
    from align_jax.data.packing import FIELDS
    from align_jax.data.preference import PREF_BATCH_FIELDS

    assert SFT_BATCH.names == FIELDS and PAIR_BATCH.names == PREF_BATCH_FIELDS
    assert all(f.doc and f.dtype in ("int32", "float32") for f in PAIR_BATCH.fields.values())
