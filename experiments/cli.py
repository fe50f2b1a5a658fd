"""Flag parsing for the entry points, apart from `experiments.common` so that a process serving
an export (`experiments.serve --export`) parses its flags without importing flax."""

from __future__ import annotations

import sys

from absl import flags


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
