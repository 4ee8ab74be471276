"""Errors that the CLI reports as one line and a non-zero exit."""


class ClrfaceError(Exception):
    """A user-facing failure: bad input, missing weights, wrong checkpoint."""


class ImageError(ClrfaceError):
    """An input file that is not a usable image."""

    def __init__(self, path: object, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class CheckpointError(ClrfaceError):
    """A checkpoint folder that is missing, incomplete or of the wrong kind/shape."""
