"""The error a researcher's mistake raises: one line that names the problem and the fix.

Entry points print such errors as one line and exit non-zero, before anything compiles and
without touching the workdir; any other exception is a bug and keeps its traceback.
"""


class UserError(ValueError):
    pass


class DataError(UserError):
    """A problem with the user's data or data config; its message names the fix."""
