"""The error type of bad evaluation input, so commands can print its message alone (it is the user's to fix)."""

from dinocell.errors import UserError


class EvalError(UserError, ValueError):
    """Bad input to an evaluation: a missing column, an incomplete feature directory, mismatched settings..."""
