"""User-facing errors for the CLIs: `UserError` (defined in the spec) and the entry-point wrapper that prints it."""

import sys
from collections.abc import Callable
from functools import wraps

from jaxgpt.spec.errors import UserError

__all__ = ["UserError", "cli_main"]


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
