"""Errors that are the user's to fix: the entry points print them as one line and exit non-zero."""


class UserError(Exception):
    """Bad input (config, data set, images, model): one clear line, before expensive work where possible."""
