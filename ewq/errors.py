"""Failures a user can cause or meet: one line on stderr, exit code 2, no traceback (commands.common.run_main)."""


class UserError(Exception):
    """Bad input from the user (missing model, corrupt plan, ...) or a failure met on the way."""


class ToolError(UserError):
    """An external tool (llama.cpp's) failed; the message names the step and the tool's last line."""
