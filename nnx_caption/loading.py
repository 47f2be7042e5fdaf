"""Loading checkpoints into NNX models, strictly: the abstract model (shapes only), the
streaming Loader that fills it from safetensors files by the weight table, initial values for
what is declared new, and from_pretrained."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from nnx_caption.config import CaptionConfig, read_config
from nnx_caption.execution import Execution
from nnx_caption.hub import NNX_FORMAT, resolve, weight_files
from nnx_caption.model import VisionEncoderDecoder
from nnx_caption.names import listing, path_str
from nnx_caption.safetensors_io import (
    FLOAT_DTYPES,
    CheckpointError,
    NonFiniteError,
    SafetensorsReader,
    TensorReader,
)
from nnx_caption.sharding import param_sharding, place
from nnx_caption.torch_pickle import TorchPickleReader
from nnx_caption.weight_table import IDENTITY, IGNORED, Transform, WeightMap

logger = logging.getLogger("nnx_caption")


def abstract_model(
    config: CaptionConfig,
    dtype=None,
    param_dtype=jnp.float32,
    model_cls: type[nnx.Module] = VisionEncoderDecoder,
) -> tuple[nnx.GraphDef, dict[str, nnx.Variable], nnx.State]:
    """The model's structure, its variables by NNX path (shapes only, nothing allocated) and the
    state holding them, to be filled and merged."""
    model = nnx.eval_shape(
        lambda: model_cls(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    )
    graphdef, state = nnx.split(model)
    flat = {path_str(path): var for path, var in nnx.to_flat_state(state)}
    return graphdef, flat, state


@dataclass
class LoadReport:
    """What a load did, by NNX path (file keys for `ignored`)."""

    loaded: list[str] = field(default_factory=list)  # from the checkpoint
    new: list[str] = field(default_factory=list)  # model_cls's initial values (new_params)
    ignored: list[str] = field(default_factory=list)  # file keys skipped by name

    def __str__(self) -> str:
        def names(items: list[str]) -> str:
            return f": {listing(items)}" if items else ""

        return (
            f"loaded {len(self.loaded)} tensors; new {len(self.new)}{names(self.new)}; "
            f"ignored {len(self.ignored)}{names(self.ignored)}"
        )


# A checkpoint key -> the VisionEncoderDecoder HF name it stands for, or None to ignore it.
Rename = Callable[[str], "str | None"]


class Loader:
    """Streams checkpoint files into a model's abstract variables, strictly. Parameters that a
    new_params pattern declares new (and state that is not weights) take their initial values
    from `init(paths) -> {path: array}` first, while nothing else is in memory, so that init's
    temporaries never add to the loaded model's peak; a file holding one still wins.

    Strict: an unexpected tensor, a shape or dtype mismatch, a weight holding NaN or Inf
    (unless allow_nonfinite) and an undeclared missing parameter are errors naming the file
    and key.
    """

    def __init__(
        self,
        config: CaptionConfig,
        variables: dict[str, nnx.Variable],
        mesh=None,
        new_params: Sequence[str] = (),
        init: Callable[[list[str]], dict[str, jax.Array]] | None = None,
        allow_nonfinite: bool = False,
    ):
        self.weights = WeightMap(config)
        self.allow_nonfinite = allow_nonfinite
        self.params = {p: v for p, v in variables.items() if issubclass(v.type, nnx.Param)}
        self.mesh = mesh
        self.source: dict[str, tuple[str, str]] = {}  # NNX path -> (file, key) it came from
        self.report = LoadReport()
        self.patterns = [re.compile(p) for p in new_params]
        for pattern in self.patterns:
            if not any(pattern.fullmatch(p) for p in self.params):
                examples = ", ".join(list(self.params)[-3:])
                raise CheckpointError(
                    f"new_params pattern {pattern.pattern!r} matches no parameter of the model "
                    f"(patterns match whole NNX paths, e.g. {examples})"
                )
        self.declared = [p for p in self.params if any(r.fullmatch(p) for r in self.patterns)]
        # Other state (buffers, RNG counters) is not weights: always model_cls's initial value.
        fill = self.declared + [p for p in variables if p not in self.params]
        if fill:
            for path, value in init(fill).items():
                variables[path].set_value(value)

    def read(self, file: str, layout: str, rename: Rename | None = None, hint: str = "") -> None:
        with open_weights(file) as reader:
            if layout == "nnx" and reader.metadata.get("format") != NNX_FORMAT["format"]:
                raise CheckpointError(f"{file}: not an nnx-caption converted checkpoint")
            saved_from = reader.metadata.get("model_class")
            for key in reader.entries:
                name = key if rename is None else rename(key)
                if name is None or (layout == "hf" and IGNORED.fullmatch(name)):
                    self.report.ignored.append(key)
                    continue
                found = (name, IDENTITY) if layout == "nnx" else self.weights.to_nnx(name)
                var = self.params.get(found[0]) if found else None
                if var is None:
                    why = (
                        f"; it was saved from {saved_from}: pass model_cls / --model_class"
                        if saved_from
                        else hint or " (wrong architecture or layer count?)"
                    )
                    raise CheckpointError(
                        f"{file}: unexpected tensor {key!r}: the model built from config.json "
                        f"has no such parameter{why}"
                    )
                self._put(file, key, reader, *found, var)

    def _put(self, file, key, reader, path: str, transform: Transform, var) -> None:
        want = transform.hf_shape(tuple(var.shape))
        if reader.shape(key) != want:
            raise CheckpointError(
                f"{file}: tensor {key!r} has shape {reader.shape(key)}, but config.json "
                f"implies {want}"
            )
        if reader.dtype_name(key) not in FLOAT_DTYPES:
            raise CheckpointError(
                f"{file}: tensor {key!r} has dtype {reader.dtype_name(key)}; weights must be "
                "floating"
            )
        try:
            stored = reader.read(key, allow_nonfinite=self.allow_nonfinite)
        except NonFiniteError as err:
            raise NonFiniteError(
                f"{err}: every output would be NaN. If that is what you want to inspect, "
                "from_pretrained(..., allow_nonfinite=True) loads it anyway"
            ) from None
        array = transform.to_nnx(stored, tuple(var.shape)).astype(var.dtype)
        if path in self.source:  # a tied head stored twice: both copies must agree
            if not np.array_equal(np.asarray(var[...]), array):
                raise CheckpointError(
                    f"{file}: {key!r} differs from {self.source[path][1]!r}, but the config "
                    "ties the LM head to the token embedding (tie_word_embeddings)"
                )
            return
        sharding = None if self.mesh is None else param_sharding(var, self.mesh)
        var.set_value(jax.device_put(array) if sharding is None else place(array, sharding))
        self.source[path] = (file, key)
        self.report.loaded.append(path)

    def finish(self, where: str) -> LoadReport:
        """Checks that every parameter came from a file or was declared new."""
        missing = [p for p in self.params if p not in self.source]
        undeclared = [p for p in missing if p not in self.declared]
        if undeclared:
            names = [self._describe(p) for p in undeclared]
            raise CheckpointError(
                f"{where}: missing {len(undeclared)} tensor(s): "
                f"{listing(names)}. If the model class "
                "adds them (an edited architecture), declare them new: new_params=(REGEX, ...) "
                "(CLI: --new_params REGEX), matching whole NNX paths; they then keep the model "
                "class's initial values"
            )
        self.report.new = missing
        return self.report

    def _describe(self, path: str) -> str:
        if not self.weights.has_hf_name(path):
            return f"{path} (no HF name)"
        return f"{path} (HF {self.weights.to_hf(path)[0]})"


def open_weights(file: str) -> TensorReader:
    """A reader of tensors one at a time, for safetensors or a PyTorch state dict (.bin)."""
    return TorchPickleReader(file) if file.endswith(".bin") else SafetensorsReader(file)


def initial_values(
    model_cls, config: CaptionConfig, dtype, param_dtype, seed: int, variables, mesh=None
) -> Callable[[list[str]], dict[str, jax.Array]]:
    """`init(paths)`: those variables' values as model_cls's constructor makes them, from
    `seed`. One jit of the constructor that returns only them: XLA drops the rest, so no
    whole random model is ever allocated."""

    def init(paths: list[str]) -> dict[str, jax.Array]:
        def make():
            model = model_cls(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed))
            flat = {path_str(p): v for p, v in nnx.to_flat_state(nnx.state(model))}
            return {p: flat[p][...] for p in paths}

        shardings = None
        if mesh is not None:
            replicated = NamedSharding(mesh, PartitionSpec())
            shardings = {
                p: param_sharding(variables[p], mesh)
                if issubclass(variables[p].type, nnx.Param)
                else replicated
                for p in paths
            }
        # LLVM's optimisations take seconds on the constructor's many random draws and buy
        # nothing for code that runs once; XLA still drops every value not returned.
        lowered = jax.jit(make, out_shardings=shardings).lower()
        return lowered.compile(compiler_options={"xla_backend_optimization_level": 0})()

    return init


def init_model(
    config: CaptionConfig,
    dtype: jnp.dtype | None = None,
    *,
    param_dtype: jnp.dtype = jnp.float32,
    mesh=None,
    model_cls: type[nnx.Module] = VisionEncoderDecoder,
    seed: int = 0,
) -> nnx.Module:
    """model_cls's freshly initialised model (no checkpoint), each variable made where `mesh`
    puts it, by the one jit that makes a checkpoint's new parameters."""
    graphdef, variables, state = abstract_model(config, dtype, param_dtype, model_cls)
    init = initial_values(model_cls, config, dtype, param_dtype, seed, variables, mesh)
    for path, value in init(list(variables)).items():
        variables[path].set_value(value)
    return nnx.merge(graphdef, state)


def log_report(what: str, report: LoadReport) -> None:
    """What a load did. A warning when parameters were newly initialised, as transformers warns
    ("Some weights ... were newly initialized"): shown by default, also to an API user who set up
    no logging (Python's last-resort handler prints warnings to stderr)."""
    if report.new:
        logger.warning(
            "%s: %s. The new parameters hold initial values, not trained ones: train them "
            "before relying on the model's output",
            what,
            report,
        )
    else:
        logger.info("%s: %s", what, report)


def from_pretrained(
    path_or_repo_id: str | os.PathLike,
    dtype: jnp.dtype | None = None,
    *,
    param_dtype: jnp.dtype = jnp.float32,
    mesh=None,
    model_cls: type[nnx.Module] = VisionEncoderDecoder,
    new_params: Sequence[str] = (),
    execution: Execution | None = None,
    seed: int = 0,
    allow_nonfinite: bool = False,
    revision: str | None = None,
    cache_dir: str | None = None,
    token: str | None = None,
) -> VisionEncoderDecoder:
    """Loads a checkpoint in HF or converted NNX layout (local folder or hub repo id).

    `dtype` is the compute dtype (e.g. jnp.bfloat16), None meaning param_dtype; parameters are
    streamed from disk straight into (sharded, when `mesh` is given) device arrays.
    `model_cls(config, dtype=, param_dtype=, rngs=)` builds the model: VisionEncoderDecoder, a
    subclass or a replacement. A parameter the checkpoint lacks is an error unless its NNX path
    fully matches a `new_params` regex: then it keeps model_cls's initial value (from `seed`).
    `execution` (scan over layers, remat) is how the built model runs its blocks. A weight
    holding NaN or Inf is an error naming it, unless `allow_nonfinite`.
    """
    directory = resolve(path_or_repo_id, revision=revision, cache_dir=cache_dir, token=token)
    config = read_config(directory)
    if execution is not None:
        config = dataclasses.replace(config, execution=execution)
    layout, files = weight_files(directory)
    graphdef, variables, state = abstract_model(config, dtype, param_dtype, model_cls)
    init = initial_values(model_cls, config, dtype, param_dtype, seed, variables, mesh)
    loader = Loader(config, variables, mesh, new_params, init, allow_nonfinite)
    for file in files:
        loader.read(file, layout)
    log_report(directory, loader.finish(", ".join(files)))
    return nnx.merge(graphdef, state)
