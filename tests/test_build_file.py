"""The Bazel BUILD file covers every Python module, data file, test file and entry point.

BUILD is Starlark, which is close enough to Python to evaluate here with stand-ins for Bazel's
functions (glob, py_library, ...), so this check needs no Bazel and runs in milliseconds.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("genai_jax", "pallas_kernels", "experiments", "tests")


def build_targets(root: pathlib.Path) -> list[dict]:
    """The targets of root/BUILD: each one's attributes and its rule ("py_test", ...)."""
    targets = []

    def rule(kind):
        return lambda **attrs: targets.append(dict(attrs, rule=kind))

    def glob(include, exclude=()):
        def matches(patterns):
            return {str(p.relative_to(root)) for pattern in patterns for p in root.glob(pattern)
                    if p.is_file()}
        return sorted(matches(include) - matches(exclude))

    names = dict(glob=glob, package=lambda **_: None, load=lambda *_, **__: None,
                 **{kind: rule(kind) for kind in ("py_library", "py_binary", "py_test")})
    exec(compile((root / "BUILD").read_text(), str(root / "BUILD"), "exec"), names)
    return targets


def imported_test_files(root: pathlib.Path, file: str) -> list[str]:
    """The test files that test `file` imports (`from tests.test_cli import ...`, or
    `from test_lowering import ...` from its own folder)."""
    tree = ast.parse((root / file).read_text())
    modules = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names]
    modules += [node.module for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module and not node.level]
    folder = pathlib.PurePath(file).parent
    paths = {str(folder / f"{m}.py") for m in modules} | {f"{m.replace('.', '/')}.py"
                                                           for m in modules}
    return sorted(p for p in paths if pathlib.PurePath(p).name.startswith("test_")
                  and (root / p).is_file())


def problems(root: pathlib.Path) -> list[str]:
    """What root/BUILD misses, one line each."""
    targets = build_targets(root)
    srcs = {f for t in targets for f in [*t.get("srcs", []), t.get("main")] if f}
    data = {f for t in targets for f in t.get("data", [])}
    mains = {t["main"] for t in targets if t["rule"] == "py_binary"}
    tests = {t.get("args", [""])[0]: t for t in targets if t["rule"] == "py_test"}
    found = []
    for package in PACKAGES:
        files = sorted(str(p.relative_to(root)) for p in (root / package).rglob("*")
                       if p.is_file() and p.suffix != ".pyc")
        for file in files:
            is_python, name = file.endswith(".py"), pathlib.PurePath(file).name
            if not is_python and file not in data:
                found.append(f"{file}: in no target's data")
            if is_python and file not in srcs:
                found.append(f"{file}: in no target's srcs")
            if package == "tests" and name.startswith("test_") and is_python:
                if file not in tests:
                    found.append(f"{file}: no py_test runs it")
                else:
                    found += [f"{file}: imports {other}, not in its py_test's srcs"
                              for other in imported_test_files(root, file)
                              if other not in tests[file]["srcs"]]
            if package != "tests" and is_python and file not in mains \
                    and 'if __name__ == "__main__":' in (root / file).read_text():
                found.append(f"{file}: an entry point with no py_binary")
    found += [f"{file}: named in BUILD, missing" for file in sorted(srcs | data)
              if not (root / file).is_file()]
    return found


def test_build_file_covers_every_module_and_test_file():
    assert problems(ROOT) == []


def test_missing_targets_are_reported(tmp_path):
    (tmp_path / "BUILD").write_text(
        'py_library(name = "lib", srcs = glob(["genai_jax/*.py"], exclude = ["genai_jax/b.py"]))\n'
        'py_binary(name = "gone", srcs = ["experiments/gone.py"], main = "experiments/gone.py")\n'
        '[py_test(name = f[:-3], srcs = [f], args = [f]) for f in ["tests/test_a.py"]]\n')
    files = {"genai_jax/a.py": "", "genai_jax/b.py": "", "genai_jax/table.json": "{}",
             "experiments/run.py": 'if __name__ == "__main__":\n    pass\n',
             "tests/test_a.py": "import test_c\n", "tests/test_c.py": ""}
    for file, text in files.items():
        (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / file).write_text(text)
    assert problems(tmp_path) == [
        "genai_jax/b.py: in no target's srcs",
        "genai_jax/table.json: in no target's data",
        "experiments/run.py: in no target's srcs",
        "experiments/run.py: an entry point with no py_binary",
        "tests/test_a.py: imports tests/test_c.py, not in its py_test's srcs",
        "tests/test_c.py: in no target's srcs",
        "tests/test_c.py: no py_test runs it",
        "experiments/gone.py: named in BUILD, missing",
    ]
