"""User-facing errors: raised for bad input, printed as one line by the CLIs (no traceback)."""


class UserError(Exception):
    """A mistake in what the user asked for (bad name, missing data, invalid shape)."""
