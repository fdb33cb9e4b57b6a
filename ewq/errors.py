"""User-facing errors: one line on stderr, exit code 2, no traceback."""


class UserError(Exception):
    """Bad input from the user (missing model, corrupt plan, ...)."""
