"""User-facing errors and the one-line-no-traceback CLI guard shared by every command.

A `UserError` is bad input the user can fix: a wrong file, a wrong option, a model that does
not fit. Commands raise it with a message that says what is wrong and how to fix it; `guard`
turns it into one line on stderr and a non-zero exit. Plain Python, no MLX.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable


class UserError(Exception):
    """Bad input: the message is shown to the user as one line, without a traceback."""

    exit_code = 2


def read_json(path: str | Path, what: str, missing: str = "", invalid: str = "",
              error: type[UserError] = UserError) -> Any:
    """Parse a JSON file the user named; any problem raises `error` as one line
    "<what>: <problem>[; <hint>]": see `profiler.files.read_json` (no such file, a directory,
    a FIFO or device, not valid JSON, NaN / Infinity / over-long numbers, duplicate keys)."""
    from profiler.files import read_json as _read_json

    return _read_json(path, what, missing=missing, invalid=invalid, error=error)


def guard(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a CLI `main(argv) -> int`: bad input becomes one line on stderr and exit code 2.

    Caught: `UserError`, an OSError about a named file (said as what happened to it, not as
    "cannot read"), malformed JSON, Ctrl-C (exit 130).
    Everything else is a bug and keeps its traceback.
    """

    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        prog = getattr(main, "__module__", "command").split(".")[0]
        try:
            rc = main(*args, **kwargs)
            return 0 if rc is None else int(rc)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return e.exit_code
        except json.JSONDecodeError as e:
            print(f"error: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                  "fix the file or regenerate it", file=sys.stderr)
            return 2
        except FileNotFoundError as e:
            print(f"error: no such file: {e.filename}; check the path", file=sys.stderr)
            return 2
        except OSError as e:
            if e.filename is None:  # a socket or pipe error: not about a file the user named
                raise
            print(f"error: {e.filename}: {(e.strerror or str(e)).lower()}; check the path and "
                  "its permissions", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"\n{prog}: interrupted; anything finished was kept", file=sys.stderr)
            return 130

    return wrapped


def exit_with(main: Callable[..., int | None]) -> None:
    """Entry-point helper: `sys.exit(guard(main)())`."""
    sys.exit(guard(main)())
