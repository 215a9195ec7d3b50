"""The package's layering: no module imports, directly or through others, a module that imports it, and
the kernels (ops) import nothing from the layers built on them. Imports inside functions count: a
deferred import that closes a circle only hides it until the function runs."""

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "memjax")


def module_names() -> dict[str, str]:
    """{dotted module name: file} of every module of memjax."""
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for file in files:
            if file.endswith(".py"):
                path = os.path.join(folder, file)
                parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
                out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """{module: the memjax modules it imports}. `from a.b import c` imports a.b.c where that is a module,
    else a.b; a module's own parent packages are not counted (Python initialises them first, whoever
    imports the module)."""
    modules = module_names()
    graph = {}
    for name, path in modules.items():
        is_package = path.endswith("__init__.py")
        edges = set()
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            else:
                continue
            edges.update(t for t in targets if t in modules and not name.startswith(t + ".") and t != name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    visiting, done = [], set()

    def visit(node):
        if node in visiting:
            return visiting[visiting.index(node):] + [node]
        if node in done:
            return None
        visiting.append(node)
        for nxt in sorted(graph[node]):
            cycle = visit(nxt)
            if cycle:
                return cycle
        visiting.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        cycle = visit(node)
        if cycle:
            return cycle
    return None


def test_the_import_graph_has_no_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_kernels_import_no_layer_built_on_them():
    graph = import_graph()
    for name, edges in graph.items():
        if name.startswith("memjax.kernels"):
            assert not {e for e in edges if e.startswith(("memjax.memory", "memjax.models"))}, name


def test_the_block_registry_imports_no_block():
    """Blocks import the registry; the registry finds them by module name when asked (`load`)."""
    assert not {e for e in import_graph()["memjax.models.registry"] if e.startswith("memjax.")}


def test_every_module_imports_in_one_fresh_interpreter_without_defining_flags():
    """The library's modules and command lines together in one interpreter: the command lines define their
    absl flags (process-global) when they run, not when imported, so a script or test may import several."""
    script = ("import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
              "from absl import flags\nassert 'config' not in flags.FLAGS, 'a module defined --config at import'\n")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", script, *sorted(module_names())], cwd=ROOT, capture_output=True,
                            text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
