"""User-facing errors: mistakes a person can fix, printed by the CLI as one line.

Anything else that escapes is a bug and keeps its traceback.
"""


class IterkdError(Exception):
    """A problem with the user's input or environment; the message says what and how to fix it."""


class TrainingDiverged(IterkdError):
    """A model's loss became NaN or infinite; the node fails, the search goes on."""
