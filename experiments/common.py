"""What every experiment entry point shares: user errors as one line, the saved config."""

from __future__ import annotations

import functools
import pathlib
import sys

from absl import flags
from ml_collections import config_flags

from genai_jax import config as config_lib
from genai_jax.errors import UserError


def user_errors_as_one_line(main):
    """Print a UserError as `error: ...` on stderr and exit 2 (no traceback)."""

    @functools.wraps(main)
    def wrapped(argv):
        try:
            return main(argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapped


def load_workdir_config(workdir: str):
    path = pathlib.Path(workdir) / "config.json"
    if not path.exists():
        raise UserError(f"--workdir {workdir} has no config.json: train there first "
                        "(python -m experiments.train --config=... --workdir=...)")
    return config_lib.load(path)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad flag, config file or `--config.KEY=VALUE` override (an
    unknown key, a value of the wrong type) reported as one line and exit code 2."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        message = str(e)
    except (AttributeError, KeyError) as e:
        cause = e.args[0] if e.args else e
        cause = cause.args[0] if isinstance(cause, Exception) and cause.args else cause
        message = f"unknown config key {cause}".replace("\n", "; ")
    except (TypeError, ValueError, OSError) as e:
        message = str(e)
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(2)


def config_from_flag(holder):
    """The value of a `config_flags.DEFINE_config_file` flag (its file loads lazily)."""
    path = config_flags.get_config_filename(flags.FLAGS[holder.name])
    if not pathlib.Path(path.split(":")[0]).exists():
        raise UserError(f"config file {path} does not exist (see experiments/configs/)")
    try:
        config = holder.value
        config.seed  # noqa: B018 - a file that failed to load raises on first use
        return config
    except OSError as e:
        raise UserError(" ".join(str(e).split())) from None
