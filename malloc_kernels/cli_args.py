"""Argument validation shared by every command-line entry point (``malloc-eval``, ``python -m malloc_kernels.*``,
``tools/*.py``).

Contract: bad input ends the program with ONE line ``PROG: error: ...`` naming the option or file on stderr and exit
code 2, never a traceback (``--debug`` shows it). Use ``Parser`` instead of ``argparse.ArgumentParser``, the value
types below for options (each raises ``argparse.ArgumentTypeError``, which argparse reports as
``argument --name: message``), and ``run_main`` around the program body (it turns an exception raised while running
into the same one line)::

    p = Parser(prog="malloc-eval")
    p.add_argument("--budgets", type=comma_list(ratio, "token ratios in (0, 1]"), default=(0.5,))
    p.add_argument("--epochs", type=int_at_least(0))
    return run_main(p, body, argv)          # body(args) -> exit code

Lists are comma separated and may not be empty (``--methods ""`` is an error, not "everything").
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Callable, Iterable, Optional, Sequence


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line (no usage dump) and which has ``--debug``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help="show the traceback of an error")

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def run_main(parser: argparse.ArgumentParser, body: Callable, argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` and return ``body(args)``; an exception raised by ``body`` becomes one error line and exit code
    2 (``KeyboardInterrupt`` excepted; ``--debug`` re-raises it with its traceback)."""
    args = parser.parse_args(argv)
    try:
        return body(args)
    except Exception as e:                                      # noqa: BLE001 -- the contract above
        if getattr(args, "debug", False):
            raise
        print(f"{parser.prog}: error: {describe(e)}", file=sys.stderr)
        return 2


def guard(prog: str, main: Callable[[], object]) -> int:
    """``sys.exit(guard(prog, main))`` for a program whose ``main()`` parses ``sys.argv`` itself (with ``Parser``):
    an exception becomes one error line and exit code 2 (``--debug`` re-raises); a non-int result means 0."""
    try:
        rc = main()
    except Exception as e:                                      # noqa: BLE001 -- the contract above
        if "--debug" in sys.argv[1:]:
            raise
        print(f"{prog}: error: {describe(e)}", file=sys.stderr)
        return 2
    return rc if isinstance(rc, int) else 0


def describe(e: BaseException) -> str:
    """One line for an exception: its message (ValueError/TypeError/OSError carry the argument or file), prefixed
    with the exception type when that type is not the usual 'bad input' kind."""
    if isinstance(e, UnicodeDecodeError):
        return f"not a text file: {e.reason} at byte {e.start} ({e.encoding})"
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {e.strerror or e}"
    msg = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, (ValueError, TypeError, OSError, LookupError)):
        return msg
    return f"{type(e).__name__}: {msg} (run with --debug for the traceback)"


# ---- value types ------------------------------------------------------------------------------------------------
def _finite_float(s: str) -> float:
    try:
        x = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"{s!r} is not a finite number")
    return x


def _int(s: str) -> int:
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None


def ratio(s: str) -> float:
    """A finite float in (0, 1] (a token ratio / fraction)."""
    x = _finite_float(s)
    if not 0.0 < x <= 1.0:
        raise argparse.ArgumentTypeError(f"{s!r} is not in (0, 1]")
    return x


def float_at_least(lo: float) -> Callable[[str], float]:
    def conv(s: str) -> float:
        x = _finite_float(s)
        if x < lo:
            raise argparse.ArgumentTypeError(f"{s!r} is below {lo:g}")
        return x
    conv.__name__ = f"float >= {lo:g}"
    return conv


def int_at_least(lo: int, hi: Optional[int] = None) -> Callable[[str], int]:
    """An integer in ``[lo, hi]`` (``hi`` default 2**63 - 1: every value must fit an int64 seed/size)."""
    top = 2 ** 63 - 1 if hi is None else hi

    def conv(s: str) -> int:
        x = _int(s)
        if x < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {s!r}")
        if x > top:
            raise argparse.ArgumentTypeError(f"{s!r} is not in [{lo}, {top}]")
        return x
    conv.__name__ = f"int >= {lo}"
    return conv


def one_of(choices: Iterable, convert: Callable = str) -> Callable[[str], object]:
    """A value (after ``convert``) among ``choices``; the error lists them."""
    allowed = tuple(choices)

    def conv(s: str):
        x = convert(s)
        if x not in allowed:
            raise argparse.ArgumentTypeError(f"{s!r} is not one of {', '.join(str(c) for c in allowed)}")
        return x
    return conv


def comma_list(item: Callable[[str], object], what: str = "values") -> Callable[[str], tuple]:
    """A non-empty comma-separated list; each element through ``item``; duplicates are kept once (in order)."""
    def conv(s: str) -> tuple:
        parts = [p.strip() for p in s.split(",")]
        if not any(parts):
            raise argparse.ArgumentTypeError(f"empty list: give one or more {what}, comma separated")
        if not all(parts):
            raise argparse.ArgumentTypeError(f"{s!r} has an empty element: give {what}, comma separated")
        out = []
        for p in parts:
            x = item(p)
            if x not in out:
                out.append(x)
        return tuple(out)
    conv.__name__ = f"list of {what}"
    return conv

