"""The package's modules import one another without cycles, and along DESIGN.md's layers.

The graph is read from the source with `ast`, so it sees every import: those at the top of a
module and those inside functions (a cycle hidden in a function is still a cycle; it only fails
later, at the first call). Python's rules give the edges:
  - `import a.b.c` and `from a.b import c` run `a.b.c`, and also the `__init__` of every package
    on the way (`a.b`) that the importing module is not itself inside;
  - `from a.b import name`, where `name` is not a submodule, imports the package `a.b`;
  - a string that is exactly a module's dotted name (a registry such as `models.FAMILIES`, handed
    to `importlib.import_module`) counts as an import of that module.
"""

from __future__ import annotations

import ast
import collections
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("genai_jax", "pallas_kernels", "experiments")

# DESIGN.md's layers, top to bottom: a module may import its own layer and the layers below.
# A module's layer is that of the longest name here that it starts with.
LAYERS = (
    ("experiments",),
    ("genai_jax.train",),
    # composes the families' config defaults, and uses of models that are not training
    ("genai_jax.config", "genai_jax.serving", "genai_jax.interop", "genai_jax.privacy"),
    ("genai_jax.models",),
    ("genai_jax.nn", "genai_jax.sampling", "genai_jax.data", "genai_jax.optim",
     "genai_jax.evaluation"),
    ("genai_jax.parallel", "genai_jax.tokenization"),
    ("genai_jax", "genai_jax.config_checks", "genai_jax.errors"),
    ("pallas_kernels",),  # importable without genai_jax
)


def module_files(root: pathlib.Path) -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every module of PACKAGES under root (a package is its
    `__init__.py`)."""
    out = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def imported_names(tree: ast.Module, name: str, is_package: bool, known) -> set[str]:
    """Every module name `tree` (the module `name`) imports, anywhere in it."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, up level - 1 more
                base = name.split(".")[:len(name.split(".")) - node.level + is_package]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and node.value in known:
            found.add(node.value)
    return found


def import_graph(root: pathlib.Path) -> dict[str, set[str]]:
    """Module -> the modules of PACKAGES that importing or running it imports directly."""
    files = module_files(root)
    graph = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        own = set(_ancestors(name)) | {name}
        edges = set()
        for target in imported_names(ast.parse(path.read_text(), str(path)), name, is_package,
                                     files):
            while target and target not in files:  # `a.b.function` or a third-party module
                target = target.rpartition(".")[0]
            if target:
                edges |= {m for m in [*_ancestors(target), target] if m not in own}
        graph[name] = edges
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def a_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One shortest cycle through the first module of `component`, as a path back to it."""
    start, members = component[0], set(component)
    parents, queue = {start: None}, collections.deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(graph[v] & members):
            if w == start:
                path = [v]
                while parents[path[-1]] is not None:
                    path.append(parents[path[-1]])
                return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, v,
                                                                                       start]
            if w not in parents:
                parents[w] = v
                queue.append(w)
    raise AssertionError(f"{component} is not strongly connected")


def cycles(root: pathlib.Path) -> list[str]:
    """One line per import cycle under root: the modules involved and one path around."""
    graph = import_graph(root)
    return [f"{len(c)} modules ({', '.join(c)}), e.g. {' -> '.join(a_cycle(graph, c))}"
            for c in strongly_connected(graph)]


def layer(name: str) -> int:
    matches = [(len(prefix), i) for i, names in enumerate(LAYERS) for prefix in names
               if name == prefix or name.startswith(prefix + ".")]
    if not matches:
        raise AssertionError(f"{name} is in no layer of LAYERS: add its package there")
    return max(matches)[1]


def layer_violations(root: pathlib.Path) -> list[str]:
    """One line per import from a lower layer up to a higher one."""
    graph = import_graph(root)
    return [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
            for a in sorted(graph) for b in sorted(graph[a]) if layer(b) < layer(a)]


def test_no_import_cycles():
    found = cycles(ROOT)
    assert not found, "import cycles:\n" + "\n".join(found)


def test_imports_follow_the_layers():
    found = layer_violations(ROOT)
    assert not found, "imports against DESIGN.md's layers:\n" + "\n".join(found)


def test_the_graph_sees_what_the_trainer_and_families_import():
    """The parser finds real edges (a graph with no edges has no cycles either)."""
    graph = import_graph(ROOT)
    assert "genai_jax.models" in graph["genai_jax.train.trainer"]
    assert "genai_jax.models.gan" in graph["genai_jax.models"]  # the FAMILIES registry
    assert {"genai_jax.models.images", "genai_jax.models.family"} <= graph["genai_jax.models.gan"]
    assert not any(m.startswith("genai_jax") for m in graph["pallas_kernels.flash_attention"])


def _write(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.mark.parametrize("files, expected", [
    # a cycle through an import inside a function
    ({"genai_jax/__init__.py": "", "genai_jax/a.py": "def f():\n    from genai_jax import b\n",
      "genai_jax/b.py": "from genai_jax.a import f\n"},
     ["2 modules (genai_jax.a, genai_jax.b), e.g. genai_jax.a -> genai_jax.b -> genai_jax.a"]),
    # through a package's __init__, which its submodule's importers run first
    ({"genai_jax/__init__.py": "", "genai_jax/p/__init__.py": "from genai_jax.p.x import y\n",
      "genai_jax/p/x.py": "y = 1\n", "genai_jax/q.py": "import genai_jax.p.x\n",
      "genai_jax/p/z.py": "", "genai_jax/r.py": "from .p import z\n",
      "genai_jax/p/w.py": "def g():\n    from ..q import u\n"},
     []),
    ({"genai_jax/__init__.py": "", "genai_jax/p/__init__.py": "import genai_jax.q\n",
      "genai_jax/p/x.py": "", "genai_jax/q.py": "def f():\n    import genai_jax.p.x\n"},
     ["2 modules (genai_jax.p, genai_jax.q), e.g. genai_jax.p -> genai_jax.q -> genai_jax.p"]),
    # a registry of module names handed to importlib
    ({"genai_jax/__init__.py": "", "genai_jax/reg.py": "NAMES = ['genai_jax.fam']\n",
      "genai_jax/fam.py": "from genai_jax.reg import NAMES\n"},
     ["2 modules (genai_jax.fam, genai_jax.reg), e.g. genai_jax.fam -> genai_jax.reg -> "
      "genai_jax.fam"]),
])
def test_the_checker_finds_cycles(tmp_path, files, expected):
    assert cycles(_write(tmp_path, files)) == expected


def test_the_checker_finds_an_upward_import(tmp_path):
    root = _write(tmp_path, {
        "genai_jax/__init__.py": "", "genai_jax/models/__init__.py": "",
        "genai_jax/train/__init__.py": "",
        "genai_jax/models/m.py": "def f():\n    from genai_jax import train\n"})
    assert layer_violations(root) == [
        "genai_jax.models.m (layer 3) imports genai_jax.train (layer 1)"]
