"""Errors meant for the person at the keyboard: the CLI prints them on one line, no traceback."""


class UserError(Exception):
    """Bad input or an impossible request: a flag, a model name, a budget that cannot work."""
