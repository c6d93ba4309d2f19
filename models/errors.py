"""Errors the model layer reports to a person: one clear line, no traceback."""


class ModelError(Exception):
    """A model could not be loaded or used (bad spec, unsupported file, too-long prompt)."""


def one_line(e: BaseException) -> str:
    """An error's message on one line (its type's name when it has none)."""
    return " ".join(str(e).split()) or type(e).__name__
