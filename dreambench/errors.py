"""Errors that are the user's to fix: the entry points print them as one line and exit non-zero."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

USER_ERROR_EXIT_CODE = 2


class UserError(Exception):
    """Bad input (config, data set, images, model): one clear line, before expensive work where possible."""


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """For an entry point's body: a UserError becomes `dreambench: error: ...` on stderr and exit code 2."""
    try:
        yield
    except UserError as e:
        print(f"dreambench: error: {e}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT_CODE)
