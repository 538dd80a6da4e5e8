"""The package's layers import one way, read from the source: states/ (the Lua states)
below request/ (the request path) below ops/ (running as a service), the modules at the
top (the process: server, supervisor, cli, ...) above them all, and no import cycle."""

import ast
import os

from conftest import ROOT

PACKAGE = os.path.join(ROOT, "luafcgid")
# a package may import from the ones after it, and from the top-level modules that import
# nothing of luafcgid's but its version (settings)
LAYERS = ["ops", "request", "states"]


def _imports():
    """{module: set of luafcgid modules it imports}, by dotted name (luafcgid.x.y)."""
    graph = {}
    for directory, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(directory, name)
            parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
            is_package = parts[-1] == "__init__"
            module = ".".join(parts[:-1] if is_package else parts)
            here = module.split(".") if is_package else module.split(".")[:-1]
            found = set()
            for node in ast.walk(ast.parse(open(path).read(), path)):
                if isinstance(node, ast.Import):
                    found |= {alias.name for alias in node.names}
                elif isinstance(node, ast.ImportFrom):
                    base = here[:len(here) - node.level + 1] if node.level else []
                    target = ".".join(base + ([node.module] if node.module else []))
                    # `from . import x` and `from .pkg import x` may name modules
                    found |= {f"{target}.{alias.name}" for alias in node.names} | {target}
            graph[module] = found
    return {module: {target for target in targets if target in graph and target != module}
            for module, targets in graph.items()}


def _layer(module):
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in LAYERS else None


def test_layers_import_only_downwards():
    graph = _imports()
    leaves = {module for module, targets in graph.items()
              if _layer(module) is None and targets <= {"luafcgid"}}
    for module, targets in graph.items():
        layer = _layer(module)
        if layer is None:
            continue
        allowed = set(LAYERS[LAYERS.index(layer):])
        wrong = sorted(target for target in targets
                       if target != "luafcgid" and _layer(target) not in allowed
                       and target not in leaves)
        assert not wrong, f"{module} imports {wrong}, above its layer ({layer})"


def test_no_import_cycle():
    graph = _imports()
    done, path = set(), []

    def visit(module):
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(
                path[path.index(module):] + [module]))
        if module in done:
            return
        path.append(module)
        for target in sorted(graph[module]):
            visit(target)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_the_reader_sees_the_imports():
    """The two tests above read something: the edges they check exist."""
    graph = _imports()
    assert "luafcgid.states.worker" in graph["luafcgid.server"]
    assert "luafcgid.request.fastcgi" in graph["luafcgid.request.parser"]
