"""Options declared as dataclass fields: each one's default, help, check and secrecy in one
place, the field that holds it. Library configurations (train.TrainConfig) and the commands'
flags (flags.py reads these fields into argparse) are declared alike.

A field is an option when its metadata has a "help" (`flag(default, help)` makes one); fields
without one are set by the program. An option's check of its value lives with it (`check=`, run
by `check_flags` before anything reads data or compiles), and a secret (`secret=True`) is never
written to a file (`public_values`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any, TypeVar

from nnx_caption.errors import UsageError

T = TypeVar("T")
Check = Callable[[Any], "str | None"]  # a flag's value -> what is wrong with it, None if fine

DTYPES = ("float32", "bfloat16", "float16")


def flag(default: Any, help: str, check: Check | None = None, secret: bool = False) -> Any:
    """A dataclass field that is a command-line flag. Lists are tuples: fields stay hashable.
    `check(value)` says what is wrong with a value that is not None; a secret flag (a token)
    is masked wherever the flags are written down."""
    return dataclasses.field(
        default=default, metadata={"help": help, "check": check, "secret": secret}
    )


def at_least(low: float) -> Check:
    return lambda value: None if value >= low else f"must be at least {low}"


def above(low: float) -> Check:
    return lambda value: None if value > low else f"must be greater than {low}"


def fraction(value: float) -> str | None:
    """A value in [0, 1): a probability of smoothing, an Adam beta."""
    return None if 0 <= value < 1 else "must be at least 0 and below 1"


def one_of(*choices: str) -> Check:
    return lambda value: None if value in choices else f"choose {', '.join(choices)}"


def regexes(patterns: tuple[str, ...]) -> str | None:
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as err:
            return f"{pattern!r} is not a regular expression: {err}"
    return None


def check_flags(args: Any) -> None:
    """A UsageError naming the first flag of the dataclass instance `args` whose value its
    check refuses."""
    for f in flags(type(args)):
        value, check = getattr(args, f.name), f.metadata.get("check")
        try:
            problem = check(value) if check is not None and value is not None else None
        except TypeError:  # a JSON config's "10" for an int, say
            problem = f"must be of type {f.type.split(' ')[0]}"
        if problem:
            shown = " ".join(map(repr, value)) if isinstance(value, tuple) else repr(value)
            raise UsageError(f"--{f.name} {shown}: {problem}")


def public_values(args: Any) -> dict[str, Any]:
    """dataclasses.asdict(args) with each secret flag's value masked (as HF's scripts mask
    their hub token: "<HUB_TOKEN>")."""
    values = dataclasses.asdict(args)
    for f in flags(type(args)):
        if f.metadata.get("secret") and values[f.name] is not None:
            values[f.name] = f"<{f.name.upper()}>"
    return values


def flags(cls: type) -> list[dataclasses.Field]:
    """The fields of the dataclass `cls` that are flags."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def from_values(cls: type[T], values: dict[str, Any]) -> T:
    """`cls` from flag values (parsed, or read from a JSON config): lists become tuples."""
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
