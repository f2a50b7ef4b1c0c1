"""Errors a user can fix (bad path, unknown source, tampered file).

The CLI turns these into one line on stderr and exit code 2; anything else is an internal failure and keeps
its traceback.
"""


class UserError(Exception):
    """A mistake in the user's input or environment, explained in one line."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type when the message is empty): for one-line errors."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
