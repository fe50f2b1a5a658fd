"""Main of each Bazel py_test: runs one pytest file, `bazel_pytest.py TEST_FILE [PYTEST_ARGS...]`.

Bazel runs it from the runfiles tree, so the test file and setup.cfg (pytest's settings) are
found there. Exit code 5 (no test collected) passes when extra arguments (e.g. `-m "not slow"`
from `--config=fast`) deselected a whole file.
"""

import os
import sys

import pytest


def main(argv: list[str]) -> int:
    test_file, *extra = argv
    args = [test_file, "-q", "-p", "no:cacheprovider", *extra]
    if "TEST_TMPDIR" in os.environ:  # under `bazel test`: temporary files and a JUnit report
        args.append(f"--basetemp={os.environ['TEST_TMPDIR']}/pytest")
    if "XML_OUTPUT_FILE" in os.environ:
        args.append(f"--junitxml={os.environ['XML_OUTPUT_FILE']}")
    code = pytest.main(args)
    return 0 if code == pytest.ExitCode.NO_TESTS_COLLECTED and extra else int(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
