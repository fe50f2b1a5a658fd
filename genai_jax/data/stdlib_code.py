"""TFDS builder for the embedded default text corpus: the running interpreter's standard library.

Every `.py` file under `sysconfig.get_paths()["stdlib"]` (without site-packages and test
suites) becomes one example `{"path", "text"}`. Files go to `validation` when a hash of their
relative path falls in the last 5 buckets of 100, so the split is deterministic and by file.
One builder config per Python version (the corpus differs between interpreters).
"""

from __future__ import annotations

import hashlib
import pathlib
import sys
import sysconfig

import tensorflow_datasets as tfds

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
VALIDATION_PERCENT = 5


def stdlib_files() -> list[tuple[str, pathlib.Path]]:
    """(relative path, absolute path) of every stdlib source file of the corpus, sorted."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = []
    for f in root.rglob("*.py"):
        rel = f.relative_to(root)
        if not _SKIP_DIRS.intersection(rel.parts[:-1]):
            files.append((rel.as_posix(), f))
    return sorted(files)


def split_of(rel_path: str) -> str:
    bucket = int(hashlib.sha1(rel_path.encode()).hexdigest(), 16) % 100
    return "validation" if bucket >= 100 - VALIDATION_PERCENT else "train"


class StdlibCode(tfds.core.GeneratorBasedBuilder):
    """Python standard library sources of the running interpreter, one file per example."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="py{}{}".format(*sys.version_info[:2]))]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {"path": tfds.features.Text(), "text": tfds.features.Text()}),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the corpus is on this machine
        files = stdlib_files()
        return {split: self._generate_examples([f for f in files if split_of(f[0]) == split])
                for split in ("train", "validation")}

    def _generate_examples(self, files):
        for rel, path in files:
            yield rel, {"path": rel, "text": path.read_bytes()}
