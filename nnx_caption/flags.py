"""Command-line flags from dataclass fields: each flag's name, type, default and help in one
place, the field that holds it.

A field is a flag when its metadata has a "help" (`flag(default, help)` makes one); fields
without one are set by the program. A flag's check of its value lives with it (`check=`, run
by `check_flags` before anything reads data or compiles), and a secret (`secret=True`) is never
written to a file (`public_values`). Every flag is spelled as HF's scripts spell theirs,
--name_with_underscores, and --name-with-dashes is accepted for it too. `ModelArgs` holds the
flags that say which model to build and how, shared by `train` and `bench`.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
Check = Callable[[Any], "str | None"]  # a flag's value -> what is wrong with it, None if fine

DTYPES = ("float32", "bfloat16", "float16")


class UsageError(Exception):
    """A bad input or option: the CLI prints it and exits with status 2."""


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


def spellings(name: str) -> list[str]:
    """--name, and --name-with-dashes when the name has underscores."""
    return [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])


def add_argument(parser: argparse.ArgumentParser, name: str, **kwargs: Any) -> None:
    """One hand-written flag, under both spellings."""
    parser.add_argument(*spellings(name), dest=name, **kwargs)


def flags(cls: type) -> list[dataclasses.Field]:
    """The fields of the dataclass `cls` that are flags."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """Every flag field of `cls`, typed from its annotation, with its help and default; in
    --help, one group per class that declares some (cls first, then its bases), titled with
    the first sentence of that class's docstring."""
    todo = {f.name: f for f in flags(cls)}
    for owner in cls.__mro__:
        mine = [todo.pop(name) for name in vars(owner).get("__annotations__", {}) if name in todo]
        if not mine:
            continue
        group = parser.add_argument_group(owner.__doc__.split(". ")[0].strip().rstrip("."))
        for f in mine:
            help_ = f"{f.metadata['help']} (default: {f.default})"
            if f.type == "bool":
                add_argument(group, f.name, action="store_true", help=help_)
            elif f.type.startswith("tuple[str"):
                add_argument(group, f.name, nargs="*", default=f.default, help=help_)
            else:
                kind = {"int": int, "float": float}.get(f.type.split(" ")[0], str)
                add_argument(group, f.name, type=kind, default=f.default, help=help_)


def from_values(cls: type[T], values: dict[str, Any]) -> T:
    """`cls` from flag values (parsed, or read from a JSON config): lists become tuples."""
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def from_namespace(cls: type[T], ns: argparse.Namespace) -> T:
    return from_values(cls, {f.name: getattr(ns, f.name) for f in flags(cls)})


def _remat_policy(name: str) -> str | None:
    from nnx_caption.layers import Execution

    try:
        Execution(remat_policy=name)
    except ValueError as err:
        return str(err)
    return None


@dataclasses.dataclass(frozen=True)
class ModelArgs:
    """Which model to build and how it runs. `train` and `bench` share these flags."""

    model_name_or_path: str | None = flag(
        None, "checkpoint folder (HF or NNX layout) or hub repo id to start from"
    )
    model_class: str | None = flag(
        None,
        "the model to build, FILE.py:Class or module:Class: an edited architecture with "
        "VisionEncoderDecoder's constructor (default: VisionEncoderDecoder)",
    )
    new_params: tuple[str, ...] = flag(
        (),
        "regexes matching whole NNX paths of parameters the checkpoint lacks (an edit's new "
        r"modules, e.g. 'decoder\.blocks\.\d+\.gate'): they keep --model_class's initial "
        "values; with --lora_rank they train with the adapters",
        regexes,
    )
    dtype: str = flag(
        "float32",
        "compute dtype: float32, bfloat16 or float16 (weights stay float32)",
        one_of(*DTYPES),
    )
    scan_layers: bool = flag(
        False, "run each stack of blocks as one lax.scan: compile time stays flat in depth"
    )
    gradient_checkpointing: bool = flag(
        False,
        "remat: recompute each block's activations in the backward pass instead of storing "
        "them (less memory, more compute)",
    )
    remat_policy: str | None = flag(
        None,
        "with --gradient_checkpointing, what is kept anyway: a jax.checkpoint_policies name, "
        "e.g. dots_with_no_batch_dims_saveable (default: nothing)",
        _remat_policy,
    )
    mesh_data: int = flag(
        -1,
        "data-parallel mesh axis size (-1: what the other axes leave)",
        lambda n: None if n == -1 or n >= 1 else "must be -1 or at least 1",
    )
    mesh_fsdp: int = flag(1, "FSDP mesh axis size", at_least(1))
    mesh_tensor: int = flag(1, "tensor-parallel mesh axis size", at_least(1))

    def check(self) -> None:
        """A UsageError naming the flag that cannot work."""
        check_flags(self)

    def execution(self):
        from nnx_caption.layers import Execution

        return Execution(self.scan_layers, self.gradient_checkpointing, self.remat_policy)

    def compute_dtype(self):
        """None for float32 (the parameters' own dtype), else the jnp dtype."""
        import jax.numpy as jnp

        return None if self.dtype == "float32" else jnp.dtype(self.dtype)

    def mesh(self):
        """The (data, fsdp, tensor) mesh over all devices; None on one device. A UsageError
        when the --mesh_* flags do not fit the devices (on one device too)."""
        import jax

        from nnx_caption.sharding import make_mesh, mesh_shape

        sizes = (self.mesh_data, self.mesh_fsdp, self.mesh_tensor)
        try:
            mesh_shape(*sizes, jax.device_count())
        except ValueError as err:
            raise UsageError(
                f"--mesh_data {sizes[0]} --mesh_fsdp {sizes[1]} --mesh_tensor {sizes[2]}: {err}"
            ) from None
        return None if jax.device_count() == 1 else make_mesh(*sizes)

    def load(self, source: str, mesh, seed: int = 0):
        """The checkpoint at `source` (a resolved folder), built as these flags say."""
        from nnx_caption.edits import model_class
        from nnx_caption.hf import from_pretrained

        return from_pretrained(
            source,
            self.compute_dtype(),
            mesh=mesh,
            model_cls=model_class(self.model_class),
            new_params=self.new_params,
            execution=self.execution(),
            seed=seed,
        )
