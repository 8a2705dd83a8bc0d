"""Errors that are the user's to fix: the command prints them as one line, without traceback."""


class UserError(ValueError):
    """Bad input: a missing file, a malformed record, an option out of range."""
