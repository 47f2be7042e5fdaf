"""Edited architectures by name: the `--model_class` spec, `FILE.py:Class` or `module:Class`.

A model class is what `from_pretrained(..., model_cls=)` builds: VisionEncoderDecoder, a subclass
or a replacement with its constructor signature `(config, *, dtype, param_dtype, rngs)`. NNX
checkpoints record the spec of the class they were saved from (a file by its absolute path), so
that a load without it, from any folder, can say which class to pass (it is never imported from
a checkpoint: that would run its code).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

from nnx_caption.model import VisionEncoderDecoder

_SPECS: dict[type, str] = {}  # classes loaded from a file -> the spec they were loaded by


class ModelClassError(ValueError):
    """A --model_class spec that does not name an importable class."""


def load_class(spec: str) -> type:
    """`path/to/file.py:Class` or `package.module:Class` -> the class."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise ModelClassError(f"--model_class {spec!r}: expected FILE.py:Class or module:Class")
    if where.endswith(".py"):
        if not os.path.isfile(where):
            raise ModelClassError(f"--model_class {spec!r}: no such file {where}")
        module_name = "nnx_caption_user." + os.path.splitext(os.path.basename(where))[0]
        loader_spec = importlib.util.spec_from_file_location(module_name, where)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module  # dataclasses and pickling look classes up here
        loader_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as err:
            raise ModelClassError(f"--model_class {spec!r}: cannot import {where}: {err}") from None
    cls = getattr(module, name, None)
    if not isinstance(cls, type):
        raise ModelClassError(f"--model_class {spec!r}: {where} defines no class {name!r}")
    # A file's class is recorded by its absolute path: an NNX checkpoint saved from one folder
    # names a --model_class that works from any other.
    _SPECS.setdefault(cls, f"{os.path.abspath(where)}:{name}" if where.endswith(".py") else spec)
    return cls


def model_class(spec: str | type | None) -> type:
    """--model_class FILE.py:Class or module:Class (a class is taken as it is); None is
    VisionEncoderDecoder."""
    if isinstance(spec, type):
        return spec
    if spec is None:
        return VisionEncoderDecoder
    return load_class(spec)


def class_spec(cls: type) -> str:
    """The spec that load_class takes back for `cls` (a script's classes name its file)."""
    if cls in _SPECS:
        return _SPECS[cls]
    module = sys.modules.get(cls.__module__)
    if cls.__module__ == "__main__" and getattr(module, "__file__", None):
        return f"{os.path.abspath(module.__file__)}:{cls.__qualname__}"
    return f"{cls.__module__}:{cls.__qualname__}"
