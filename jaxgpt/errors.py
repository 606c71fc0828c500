"""User-facing errors: raised for bad input, printed as one line by the CLIs (no traceback)."""

import sys
from collections.abc import Callable
from functools import wraps


class UserError(Exception):
    """A mistake in what the user asked for (bad name, missing data, invalid shape)."""


def cli_main(fn: Callable[..., int | None]) -> Callable[..., int | None]:
    """Wrap a CLI entry point so that a UserError prints `error: ...` and exits 2."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper
