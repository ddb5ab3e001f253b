"""User-facing errors.

Anything raised as `LensError` carries a one-line message meant for the user: the UI shows it
in an error box and the CLI prints it and exits non-zero, with no traceback.
"""


class LensError(Exception):
    """A problem with the user's input or environment, described in one line."""


class ModelLoadError(LensError):
    """The requested model could not be loaded."""


class DataError(LensError):
    """A data file or dataset could not be read or has the wrong shape."""
