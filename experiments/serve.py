"""Serve a trained run or an export over HTTP with OpenAI's API:
`python -m experiments.serve --workdir=W | --export=DIR [--port=8000] [--api_key=KEY]`.

`--workdir` exports the run's latest checkpoint into a temporary directory first (so a run and
its export are served by the same code); `--export` serves a directory written by
`experiments.export_compiled`, in a process that never imports flax or the model code.
Language models answer `/v1/completions` (and `/v1/chat/completions` with a chat template)
with continuous batching over `--slots` decode slots; image families answer
`/v1/images/generations`. `GET /healthz` is 200 once compilation is done; `GET /metrics` is in
Prometheus's format. SIGTERM drains: requests in flight finish (within `--grace` seconds), then
the server exits 0. The first line on stdout names the address (`--port=0`: a free port).
"""

from __future__ import annotations

import pathlib
import sys
import tempfile

from absl import app, flags, logging

from experiments.cli import parse_flags
from genai_jax.errors import UserError
from genai_jax.serving.server import Server

_WORKDIR = flags.DEFINE_string("workdir", None, "a directory written by experiments.train")
_EXPORT = flags.DEFINE_string("export", None, "a directory written by "
                              "experiments.export_compiled")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "address to listen on")
_PORT = flags.DEFINE_integer("port", 8000, "port to listen on (0: any free port)")
_API_KEY = flags.DEFINE_string("api_key", None, "require Authorization: Bearer KEY on /v1/")
_MODEL_NAME = flags.DEFINE_string("model_name", None, "the model id clients name (default: "
                                  "the workdir's or export's directory name)")
_SLOTS = flags.DEFINE_integer("slots", 16, "decode slots: sequences generated together")
_MAX_QUEUE = flags.DEFINE_integer("max_queue", 256, "sequences that may wait for a slot; more "
                                  "are answered 429")
_GRACE = flags.DEFINE_float("grace", 30.0, "seconds SIGTERM leaves requests in flight")
_MESH = flags.DEFINE_string("mesh", None, "DATA,FSDP,TENSOR mesh to restore --workdir's "
                            "checkpoint onto (serving itself runs on one device)")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    try:
        status = _serve()
    except UserError as e:  # one line, like every entry point (experiments.common's wrapper
        sys.stderr.write(f"error: {e}\n")  # would import flax: see experiments.cli)
        sys.exit(2)
    sys.exit(status)


def _serve() -> int:
    if (_WORKDIR.value is None) == (_EXPORT.value is None):
        raise UserError("give one of --workdir=W (a trained run) or --export=DIR")
    if _SLOTS.value < 1 or _MAX_QUEUE.value < 1:
        raise UserError("--slots and --max_queue must be at least 1")
    with tempfile.TemporaryDirectory(prefix="genai_serve_") as tmp:
        directory = _EXPORT.value or _export_workdir(_WORKDIR.value, pathlib.Path(tmp) / "export")
        name = _MODEL_NAME.value or pathlib.Path(_WORKDIR.value or _EXPORT.value).resolve().name
        server = Server(directory, model_name=name, api_key=_API_KEY.value, slots=_SLOTS.value,
                        max_queue=_MAX_QUEUE.value)
        return server.run(_HOST.value, _PORT.value, _GRACE.value)


def _export_workdir(workdir: str, out: pathlib.Path) -> pathlib.Path:
    # imported here, not above: serving an --export never loads the model code
    from experiments.common import load_workdir_config, with_mesh
    from genai_jax.serving import export
    from genai_jax.train import prepare

    run = prepare(with_mesh(load_workdir_config(workdir), _MESH.value), workdir, read_only=True)
    if run.start_step == 0:
        logging.warning("%s has no checkpoint: serving an untrained model", workdir)
    export.export_run(run, out, export.parse_platforms(None))
    return out


def run():
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
