"""User-facing errors: printed as one line by the command-line entry points, never as a traceback."""
from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """A mistake the user can fix (bad config, missing file, missing weights); the message says how."""


class LostProcess(Exception):
    """A process of a multi-process run was lost (stellar_tok.training.lost_process): the survivors stop; the message
    names it and says how to resume."""


def require(ok: bool, key: str, allowed: str, value) -> None:
    """A UserError naming config key `key`, what it must be (`allowed`) and the value it got, unless `ok`."""
    if not ok:
        raise UserError(f"config key '{key}' must be {allowed} (got {value!r})")


def cli_entry(fn):
    """Wrap a `main(argv)`: UserError -> one line on stderr and exit status 2; LostProcess -> one line, status 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        except LostProcess as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None

    return wrapper
