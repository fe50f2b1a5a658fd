"""The on-disk layout of an export (`experiments.export_compiled`), read and written here.

An export directory holds:
  manifest.json             what is in it: family, functions with their argument shapes and
                            dtypes, platforms, model sizes, tokenizer files, versions, source run
  <name>.jax_exported       each function, serialized by `jax.export` (StableHLO + calling
                            convention), taking the weights as its first argument
  weights.safetensors       the weights as plain arrays, one per `/`-joined parameter path (the
                            first argument of every function, as a flat dict)
  the tokenizer's files     (language models) as the run kept them, for
                            `genai_jax.tokenization.load_tokenizer`

Reading an export needs jax, numpy and safetensors only: no flax, no model code.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import safetensors.numpy
from jax import export as jax_export

from genai_jax.errors import UserError

MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
FORMAT = "genai_jax-export"
FORMAT_VERSION = 1
FUNCTION_SUFFIX = ".jax_exported"
IMAGE_FUNCTION = "generate"  # an image family's one exported function


class ExportError(UserError):
    """An export directory that is missing, incomplete or of another format version."""


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested dicts (string or int keys) of arrays as one `{"a/b/0/c": array}` dict."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "/"))
        else:
            flat[name] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict:
    """The inverse of `flatten`; keys that are digits become ints (list positions in NNX)."""
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = [int(p) if p.isdigit() else p for p in name.split("/")]
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def save_weights(directory: pathlib.Path, flat: Mapping[str, Any]) -> None:
    safetensors.numpy.save_file({k: np.asarray(v) for k, v in flat.items()},
                                str(directory / WEIGHTS))


def load_weights(directory: pathlib.Path) -> dict[str, np.ndarray]:
    return safetensors.numpy.load_file(str(directory / WEIGHTS))


def save_function(directory: pathlib.Path, name: str, exported: jax_export.Exported) -> dict:
    """Write `exported` as `<name>.jax_exported`; returns its manifest entry."""
    (directory / f"{name}{FUNCTION_SUFFIX}").write_bytes(exported.serialize())
    # The weights (first argument) are listed once in the manifest, not per function.
    return {"file": f"{name}{FUNCTION_SUFFIX}",
            "inputs": _describe(exported.in_tree, exported.in_avals, skip_first=True),
            "outputs": _describe(exported.out_tree, exported.out_avals),
            "platforms": list(exported.platforms)}


def _describe(tree, avals, skip_first: bool = False) -> list[str]:
    """`dtype[shape]` of each argument or result (symbolic sizes by name); one made of N arrays
    alike (the KV cache's layers) as `N x dtype[shape]`."""
    parts = tree.children() or [tree]  # a single array has no children
    if len(parts) == 2 and not parts[1].num_leaves:  # in_tree: ((args...), {kwargs})
        parts = parts[0].children()
    if skip_first:  # the weights, listed once in the manifest
        avals, parts = avals[parts[0].num_leaves:], parts[1:]
    out, i = [], 0
    for part in parts:
        names = {f"{a.dtype}{list(a.shape)}".replace("'", "") for a in avals[i:i + part.num_leaves]}
        name = names.pop() if len(names) == 1 else " | ".join(sorted(names))
        out.append(name if part.num_leaves == 1 else f"{part.num_leaves} x {name}")
        i += part.num_leaves
    return out


def load_function(directory: pathlib.Path, entry: Mapping) -> jax_export.Exported:
    path = directory / entry["file"]
    if not path.is_file():
        raise ExportError(f"{directory} lacks {entry['file']}: export the run again with "
                          "python -m experiments.export_compiled")
    return jax_export.deserialize(bytearray(path.read_bytes()))


def write_manifest(directory: pathlib.Path, manifest: Mapping) -> None:
    text = json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **manifest},
                      indent=1, sort_keys=True)
    (directory / MANIFEST).write_text(text + "\n")


def read_manifest(directory: str | pathlib.Path) -> dict:
    directory = pathlib.Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ExportError(f"--export {directory} has no {MANIFEST}: write one with "
                          "python -m experiments.export_compiled --workdir=W --out=DIR")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{path} is not a {FORMAT} version {FORMAT_VERSION} manifest: export "
                          "the run again with this version of genai_jax")
    return manifest


def platform() -> str:
    """The platform name `jax.export` uses for this process's default backend."""
    return jax_export.default_export_platform()
