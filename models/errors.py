"""Errors the model layer reports to a person: one clear line, no traceback."""


class ModelError(Exception):
    """A model could not be loaded or used (bad spec, unsupported file, too-long prompt)."""
