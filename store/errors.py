"""Errors the store reports to a person: one clear line, no traceback."""


class StoreError(Exception):
    """The database file is missing, unreadable, from a newer schema, or not ours."""
