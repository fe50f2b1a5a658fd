"""Tokenise text into ArrayRecord shards for training at scale:
`python -m experiments.prepare_data --input=GLOB --out=DIR [--tokenizer=byte]
[--validation_fraction=0.1] [--text_key=text] [--workers=0]`.

Text files (one document each) and JSONL (one document per line, its `--text_key` field)
become the train and validation token streams of DIR, every document ended by the
end-of-document token, in parallel over the CPU cores; an interrupted preparation resumes when
run again with the same flags (`genai_jax.data.prepare`). PNG/JPEG files (labelled by class
folder) or MNIST IDX pairs become image records. Train on it with
`--config.data.name=array_record --config.data.path=DIR`.
"""

from __future__ import annotations

import glob
import json
import pathlib

from absl import app, flags

from experiments.cli import parse_flags
from experiments.common import user_errors_as_one_line
from genai_jax.data import prepare
from genai_jax.errors import DataError

_INPUT = flags.DEFINE_string("input", None, "files to prepare: a glob, or several "
                             "comma-separated (quote it for the shell)")
_OUT = flags.DEFINE_string("out", None, "the directory to write (new or empty, or one this "
                           "command was preparing: it resumes)")
_TOKENIZER = flags.DEFINE_string("tokenizer", "byte", "byte, char, gpt2, bpe:N or hf:DIR "
                                 "(data.tokenizer's forms), or none: keep the text, and "
                                 "tokenise it on the fly in training")
_VALIDATION = flags.DEFINE_float("validation_fraction", 0.1, "the share of documents (of a "
                                 "single-document file: its tail) held out for validation")
_TEXT_KEY = flags.DEFINE_string("text_key", "text", "the JSONL field that holds a document")
_WORKERS = flags.DEFINE_integer("workers", 0, "processes (0: one per CPU core)")
_UNIT_MB = flags.DEFINE_float("unit_mb", 64, "MB of input per work unit (and shard)")
flags.mark_flags_as_required(["input", "out"])


def input_files(patterns: str) -> list[pathlib.Path]:
    files = []
    for pattern in (p.strip() for p in patterns.split(",") if p.strip()):
        matched = sorted(pathlib.Path(f) for f in glob.glob(str(pathlib.Path(pattern)
                                                                 .expanduser()), recursive=True))
        matched = [f for f in matched if f.is_file()]
        if not matched:
            raise DataError(f"--input {pattern!r} matches no file")
        files += matched
    return list(dict.fromkeys(files))


@user_errors_as_one_line
def main(argv):
    del argv
    files = input_files(_INPUT.value)
    images = [prepare.is_image_input(f) for f in files]
    if any(images) and not all(images):
        raise DataError(f"--input matches images and text ({files[images.index(True)].name}, "
                        f"{files[images.index(False)].name}): prepare them apart")
    if all(images):
        index = prepare.prepare_images(files, pathlib.Path(_OUT.value),
                                       validation_fraction=_VALIDATION.value,
                                       workers=_WORKERS.value)
        print(json.dumps({"out": _OUT.value, "kind": "image", "shape": index["shape"],
                          "num_classes": index["num_classes"],
                          **{f"{s}_images": index["splits"][s]["records"]
                             for s in ("train", "validation")}}))
        return
    index = prepare.prepare_text(
        files, pathlib.Path(_OUT.value), _TOKENIZER.value,
        validation_fraction=_VALIDATION.value, text_key=_TEXT_KEY.value,
        workers=_WORKERS.value, unit_bytes=int(_UNIT_MB.value * 2**20))
    print(json.dumps({"out": _OUT.value, "kind": index["kind"], "tokenizer": index["tokenizer"],
                      "token_dtype": index.get("token_dtype"),
                      **{f"{s}_{k}": v for s in ("train", "validation")
                         for k, v in index["splits"][s].items() if k != "shards"}}))


def run():
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
