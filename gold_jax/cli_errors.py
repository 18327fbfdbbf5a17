"""One-line errors for the command-line tools.

A user's mistake (a bad config value, a missing file or model folder, a
tokenizer mismatch) should read as one line, `error: <message>`, with exit
status 2, not as a 10-30 frame traceback ending in the same message. A bug
(TypeError, AttributeError, KeyError in our code, an XLA failure) keeps its
full traceback: that is what a bug report needs. The traceback of an expected
error is still available with `--verbosity=1` (absl) or `GOLD_JAX_TRACEBACK=1`.

Usage, absl CLIs:      `cli_errors.run_absl(main)` in place of `app.run(main)`
        argparse CLIs: `cli_errors.run(main, argv)` (and `add_verbosity_flag(ap)`)

Raise `UserError` for a mistake that no built-in exception names well. Import
cost is the standard library only, so a bad flag fails in about a second.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, NoReturn

EXIT_USER_ERROR = 2   # as argparse and most Unix tools use for usage errors
ENV_TRACEBACK = "GOLD_JAX_TRACEBACK"


class UserError(ValueError):
    """A mistake in the user's input (config, paths, data, models): reported as one line.

    A ValueError subclass so that callers and tests catching ValueError keep working.
    """


# The project raises these for what the user gave it (config._check, path checks, data
# format checks, tokenizer checks). Anything else is treated as a bug.
EXPECTED: tuple[type[BaseException], ...] = (
    UserError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
    PermissionError, FileExistsError,
)
# A ValueError raised from inside these libraries is a bug of ours (a shape or dtype
# mistake in traced code), not a user's mistake.
_BUG_MODULE_PREFIXES = ("jax", "jaxlib", "flax", "optax", "orbax")


def is_expected(exc: BaseException) -> bool:
    """True for the project's own 'you gave me something wrong' errors."""
    if not isinstance(exc, EXPECTED):
        return False
    if isinstance(exc, UserError):
        return True
    mod = type(exc).__module__ or ""
    return not mod.startswith(_BUG_MODULE_PREFIXES)


def want_traceback(verbosity: int | None = None) -> bool:
    """Whether an expected error should still show its traceback (env var or verbosity >= 1)."""
    if os.environ.get(ENV_TRACEBACK, "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    if verbosity is None:
        verbosity = _absl_verbosity()
    return verbosity is not None and verbosity >= 1


def _absl_verbosity() -> int | None:
    absl_flags = sys.modules.get("absl.flags")
    if absl_flags is None:
        return None
    try:
        fl = absl_flags.FLAGS
        return int(fl["verbosity"].value) if fl.is_parsed() and "verbosity" in fl else None
    except Exception:   # flags not defined or not parsed: no verbosity asked for
        return None


def message(exc: BaseException) -> str:
    """The message line(s) of an exception, without the class name unless it is empty."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.strerror}: {exc.filename!r}"   # as open() raises it, without '[Errno 2]'
    else:
        text = str(exc)
        if isinstance(exc, KeyError) and len(exc.args) == 1:
            text = str(exc.args[0])
    return text.strip() or type(exc).__name__


def report(exc: BaseException, stream: Any = None) -> int:
    """Print `error: <message>` on stderr; return the exit status to use."""
    stream = stream if stream is not None else sys.stderr
    stream.write(f"error: {message(exc)}\n")
    stream.flush()
    return EXIT_USER_ERROR


def run(fn: Callable[..., Any], *args: Any, verbosity: int | None = None, **kwargs: Any) -> Any:
    """Call fn(*args, **kwargs); an expected error exits 2 with one line, anything else propagates."""
    try:
        return fn(*args, **kwargs)
    except EXPECTED as exc:
        if not is_expected(exc) or want_traceback(verbosity):
            raise
        _flush_logs()
        sys.exit(report(exc))


def guard(main: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
    """Wrap an absl `main(argv)` so that expected errors print one line and exit 2."""
    def wrapped(argv: list[str]) -> Any:
        return run(main, argv)
    wrapped.__name__ = getattr(main, "__name__", "main")
    wrapped.__doc__ = main.__doc__
    return wrapped


def _absl_flags_parser(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad flag (unknown config key, unparsable value) as one line."""
    from absl import flags
    try:
        return flags.FLAGS(argv)
    except flags.Error as exc:
        sys.exit(report(exc))
    except (AttributeError, KeyError) as exc:
        # ml_collections' config flags raise these for an unknown key (--config.gold.nope=1)
        if want_traceback():
            raise
        inner: Any = exc
        while inner.args and isinstance(inner.args[0], BaseException):
            inner = inner.args[0]
        text = str(inner.args[0]) if inner.args else ""
        key, _, hint = text.partition("\n")
        key = key.strip("'\"")
        bad = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--") and key and key in a]
        where = f" in {bad[0]}" if bad else ""
        hint = f"; {hint.strip()}" if hint.strip() else ""
        sys.exit(report(UserError(f"unknown config key {key!r}{where}{hint}")))


def run_absl(main: Callable[[list[str]], Any], argv: list[str] | None = None) -> NoReturn:
    """`absl.app.run(main)` with one-line errors for flag and expected errors (exit 2)."""
    from absl import app
    app.run(guard(main), argv=argv, flags_parser=_absl_flags_parser)


def add_verbosity_flag(ap: argparse.ArgumentParser) -> None:
    """Add `--verbosity` (as absl's: 1 shows the traceback of expected errors) to an argparse CLI."""
    ap.add_argument("--verbosity", "-v", type=int, default=0,
                    help=f"1: show the traceback of expected errors too (or set {ENV_TRACEBACK}=1)")


def _flush_logs() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
