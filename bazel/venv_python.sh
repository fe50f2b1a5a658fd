#!/bin/sh
# The Python interpreter of Bazel's py_binary/py_test targets: the project's virtual environment
# (`make install` creates .venv at the repository root), found from this file's real location.
root=$(cd "$(dirname "$(readlink -f "$0")")/.." && pwd)
if [ ! -x "$root/.venv/bin/python" ]; then
    echo "bazel/venv_python.sh: no $root/.venv/bin/python; run 'make install' first" >&2
    exit 1
fi
exec "$root/.venv/bin/python" "$@"
