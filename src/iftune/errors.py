"""Errors that are the user's to fix, and the checks that raise them. The command prints a
`UserError` as one line, without traceback, and exits with status 2."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NoReturn


class UserError(ValueError):
    """Bad input: a missing file, a malformed record, an option out of range."""


def check_choice(name: str, value: object, allowed: tuple) -> None:
    """Raise `UserError` unless `value` is one of `allowed`."""
    if value not in allowed:
        raise UserError(f"{name}={value!r} is not valid; expected one of {', '.join(map(repr, allowed))}")


def check_unit(name: str, value: float) -> None:
    """Raise `UserError` unless `value` is a number in [0, 1]."""
    v = float(value)
    if not (0.0 <= v <= 1.0) or math.isnan(v):
        raise UserError(f"{name}={value!r} is out of range; expected a number in [0, 1]")


def usage_error(method: str) -> Callable[[str], NoReturn]:
    """A replacement for `ArgumentParser.error`: one line naming the flag and what it expected
    (`argument --learning_rate: invalid float value: 'abc'`) instead of the 160-line usage."""

    def error(message: str) -> NoReturn:
        raise UserError(f"{message} (`iftune {method} --help` lists the options)")

    return error
