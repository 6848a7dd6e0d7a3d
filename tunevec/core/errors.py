"""One exception type for every user-facing error, so the CLI and the server can report it cleanly."""


class TunevecError(ValueError):
    """Bad input or an inconsistent artifact. The message says what was wrong and what to do."""


class NotFoundError(TunevecError):
    """A name (vector, variant, model) that does not exist; servers answer 404 instead of 400."""
