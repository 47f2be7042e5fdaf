"""Command-line flags from option fields (options.py), and the model flags every command shares.

Every flag is spelled as HF's scripts spell theirs, --name_with_underscores, and
--name-with-dashes is accepted for it too. `ModelArgs` holds the flags that say which model to
build and how it runs: `train` and `bench` take all of them, `predict`, `convert` and `export`
those that apply to them (PREDICT_FLAGS, SOURCE_FLAGS): one definition, one help, one check.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Collection
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from nnx_caption.edits import model_class
from nnx_caption.errors import UsageError
from nnx_caption.execution import ATTENTION_KERNELS, Execution
from nnx_caption.hub import resolve
from nnx_caption.layers import cudnn_unusable
from nnx_caption.loading import from_pretrained
from nnx_caption.lora import add_lora
from nnx_caption.model import VisionEncoderDecoder
from nnx_caption.options import at_least, check_flags, flag, flags, from_values, one_of, regexes
from nnx_caption.progress import log
from nnx_caption.sharding import make_mesh, mesh_shape

T = TypeVar("T")
DTYPES = ("float32", "bfloat16", "float16")


def spellings(name: str) -> list[str]:
    """--name, and --name-with-dashes when the name has underscores."""
    return [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])


def add_argument(parser: argparse.ArgumentParser, name: str, **kwargs: Any) -> None:
    """One hand-written flag, under both spellings."""
    parser.add_argument(*spellings(name), dest=name, **kwargs)


def add_flags(
    parser: argparse.ArgumentParser, cls: type, only: Collection[str] | None = None
) -> None:
    """Every flag field of `cls` (or those named in `only`), typed from its annotation, with
    its help and default; in --help, one group per class that declares some (cls first, then
    its bases), titled with the first sentence of that class's docstring."""
    todo = {f.name: f for f in flags(cls) if only is None or f.name in only}
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


def from_namespace(cls: type[T], ns: argparse.Namespace) -> T:
    """`cls` from parsed flags; a flag the command does not take keeps its default."""
    given = {f.name: getattr(ns, f.name) for f in flags(cls) if hasattr(ns, f.name)}
    return from_values(cls, given)


def _remat_policy(name: str) -> str | None:
    try:
        Execution(remat_policy=name)
    except ValueError as err:
        return str(err)
    return None


@dataclasses.dataclass(frozen=True)
class ModelArgs:
    """Which model to build and how it runs. Every command that loads a model takes these."""

    model_name_or_path: str | None = flag(
        None, "checkpoint folder (HF or NNX layout) or hub repo id to start from"
    )
    revision: str | None = flag(None, "hub revision (branch, tag or commit) of the checkpoint")
    cache_dir: str | None = flag(None, "huggingface_hub cache folder")
    model_class: str | None = flag(
        None,
        "the model to build, FILE.py:Class or module:Class: an edited architecture with "
        "VisionEncoderDecoder's constructor, e.g. the one an NNX checkpoint was saved from "
        "(default: VisionEncoderDecoder)",
    )
    new_params: tuple[str, ...] = flag(
        (),
        "regexes matching whole NNX paths of parameters the checkpoint lacks (an edit's new "
        r"modules, e.g. 'decoder\.blocks\.\d+\.gate'): they keep --model_class's initial "
        "values; with --lora_rank they train with the adapters",
        regexes,
    )
    lora_rank: int = flag(
        0,
        "train only LoRA adapters of this rank on the attention and MLP projections (merged "
        "into the weights at export)",
        at_least(0),
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
    attention_impl: str = flag(
        "einsum",
        "the attention kernel: einsum (ours), xla or cudnn (jax.nn.dot_product_attention's; "
        "cudnn is flash attention on NVIDIA GPUs, with --dtype bfloat16 or float16), auto "
        "(cudnn where it can run, else einsum); cases a fused kernel cannot express run on "
        "einsum, said once",
        one_of(*ATTENTION_KERNELS),
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
        if self.attention_impl == "cudnn":  # the head_dim is checked where the model runs
            why = cudnn_unusable(self.compute_dtype() or jnp.float32)
            if why:
                raise UsageError(f"--attention_impl cudnn: {why}; choose einsum, xla or auto")

    def execution(self) -> Execution:
        return Execution(
            self.scan_layers, self.gradient_checkpointing, self.remat_policy, self.attention_impl
        )

    def compute_dtype(self) -> jnp.dtype | None:
        """None for float32 (the parameters' own dtype), else the jnp dtype."""
        return None if self.dtype == "float32" else jnp.dtype(self.dtype)

    def model_cls(self) -> type:
        return model_class(self.model_class)

    def source(self) -> str:
        """--model_name_or_path as a local folder (a hub repo's files downloaded)."""
        return resolve(self.model_name_or_path, revision=self.revision, cache_dir=self.cache_dir)

    def mesh(self) -> Mesh | None:
        """The (data, fsdp, tensor) mesh over all devices; None on one device. A UsageError
        when the --mesh_* flags do not fit the devices (on one device too)."""
        sizes = (self.mesh_data, self.mesh_fsdp, self.mesh_tensor)
        try:
            mesh_shape(*sizes, jax.device_count())
        except ValueError as err:
            raise UsageError(
                f"--mesh_data {sizes[0]} --mesh_fsdp {sizes[1]} --mesh_tensor {sizes[2]}: {err}"
            ) from None
        return None if jax.device_count() == 1 else make_mesh(*sizes)

    def load(self, source: str, mesh: Mesh | None, seed: int = 0) -> VisionEncoderDecoder:
        """The checkpoint at `source` (a resolved folder), built as these flags say, with
        LoRA adapters added when --lora_rank asks for them."""
        model = from_pretrained(
            source,
            self.compute_dtype(),
            mesh=mesh,
            model_cls=self.model_cls(),
            new_params=self.new_params,
            execution=self.execution(),
            seed=seed,
        )
        return self.add_adapters(model, seed)

    def add_adapters(self, model: VisionEncoderDecoder, seed: int) -> VisionEncoderDecoder:
        """`model` with LoRA adapters of --lora_rank (none at 0)."""
        if self.lora_rank:
            added = add_lora(model, self.lora_rank, seed=seed)
            log(f"LoRA rank {self.lora_rank} on {added} projections; only the adapters train")
        return model


# What `predict` and `convert` / `export` take of ModelArgs (their checkpoint is an argument).
SOURCE_FLAGS = ("revision", "cache_dir", "model_class")
PREDICT_FLAGS = (*SOURCE_FLAGS, "dtype", "scan_layers", "attention_impl")


@dataclasses.dataclass(frozen=True)
class CaptionsPerImage:
    """How a training batch groups captions. `train` and `bench` take this flag."""

    captions_per_image: int = flag(
        1,
        "k > 1: training batches of images with k captions each, each image encoded once per "
        "step (train: an epoch then covers every image once); 1: every caption with its own "
        "image, as HF",
        at_least(1),
    )

    def check_batch(self, per_device: int, name: str) -> None:
        """A UsageError unless k divides the per-device batch (the flag `name`)."""
        k = self.captions_per_image
        if per_device % k:
            raise UsageError(
                f"--captions_per_image {k} must divide --{name} {per_device}: each device "
                "holds whole images with their captions"
            )
