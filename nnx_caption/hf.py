"""Hugging Face <-> NNX weights: one table, strict streaming load, save, hub download.

TABLE maps every Hugging Face tensor name of a VisionEncoderDecoderModel (ViT + GPT-2) to the
NNX parameter path that holds it, with the transform between their layouts. `{i}` stands for a
layer index. The same table drives loading (HF -> NNX) and saving (NNX -> HF).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from nnx_caption import processes
from nnx_caption.config import (
    CaptionConfig,
    ConfigError,
    GPT2Config,
    ViTConfig,
    pick_fields,
    read_config,
    read_json,
    write_config,
)
from nnx_caption.edits import class_spec
from nnx_caption.files import copy_file
from nnx_caption.layers import Execution
from nnx_caption.model import VisionEncoderDecoder
from nnx_caption.safetensors_io import (
    FLOAT_DTYPES,
    CheckpointError,
    NonFiniteError,
    SafetensorsReader,
    write_safetensors,
)
from nnx_caption.sharding import param_sharding, place, to_host

logger = logging.getLogger("nnx_caption")


@dataclass(frozen=True)
class Transform:
    """How a tensor's HF layout relates to its NNX one, in both directions."""

    hf_shape: Callable[[tuple[int, ...]], tuple[int, ...]]  # NNX shape -> HF shape
    to_nnx: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]  # (HF array, NNX shape)
    to_hf: Callable[[np.ndarray], np.ndarray]


def _split(shape: tuple[int, ...], n_in: int) -> tuple[int, int]:
    return math.prod(shape[:n_in]), math.prod(shape[n_in:])


def conv1d(n_in: int) -> Transform:
    """GPT-2 Conv1D weights are stored (in, out), as our kernels: only the head dims reshape."""
    return Transform(
        lambda s: _split(s, n_in),
        lambda x, s: x.reshape(s),
        lambda x: x.reshape(_split(x.shape, n_in)),
    )


def linear(n_in: int) -> Transform:
    """nn.Linear weights are stored (out, in): transpose."""
    return Transform(
        lambda s: _split(s, n_in)[::-1],
        lambda x, s: x.T.reshape(s),
        lambda x: x.reshape(_split(x.shape, n_in)).T,
    )


def leading_ones(k: int) -> Transform:
    """HF keeps broadcast dims, e.g. cls_token (1, 1, E) for our (E,); k = 0 is the identity."""
    return Transform(
        lambda s: (1,) * k + s, lambda x, s: x.reshape(s), lambda x: x.reshape((1,) * k + x.shape)
    )


IDENTITY = leading_ones(0)
FLAT = Transform(lambda s: (math.prod(s),), lambda x, s: x.reshape(s), lambda x: x.reshape(-1))
CONV2D = Transform(
    lambda s: (s[3], s[2], s[0], s[1]),
    lambda x, s: x.transpose(2, 3, 1, 0),
    lambda x: x.transpose(3, 2, 0, 1),
)  # OIHW <-> HWIO

_VIT = "encoder.encoder.layer.{i}."
_GPT = "decoder.transformer.h.{i}."
# (HF name, NNX path, transform). Biases of multi-head projections are FLAT.
TABLE: list[tuple[str, str, Transform]] = [
    ("encoder.embeddings.cls_token", "encoder.embeddings.cls", leading_ones(2)),
    ("encoder.embeddings.position_embeddings", "encoder.embeddings.positions", leading_ones(1)),
    (
        "encoder.embeddings.patch_embeddings.projection.weight",
        "encoder.embeddings.patch.kernel",
        CONV2D,
    ),
    (
        "encoder.embeddings.patch_embeddings.projection.bias",
        "encoder.embeddings.patch.bias",
        IDENTITY,
    ),
    (_VIT + "layernorm_before.weight", "encoder.blocks.{i}.ln_1.scale", IDENTITY),
    (_VIT + "layernorm_before.bias", "encoder.blocks.{i}.ln_1.bias", IDENTITY),
    (_VIT + "attention.attention.query.weight", "encoder.blocks.{i}.attn.q.kernel", linear(1)),
    (_VIT + "attention.attention.query.bias", "encoder.blocks.{i}.attn.q.bias", FLAT),
    (_VIT + "attention.attention.key.weight", "encoder.blocks.{i}.attn.k.kernel", linear(1)),
    (_VIT + "attention.attention.key.bias", "encoder.blocks.{i}.attn.k.bias", FLAT),
    (_VIT + "attention.attention.value.weight", "encoder.blocks.{i}.attn.v.kernel", linear(1)),
    (_VIT + "attention.attention.value.bias", "encoder.blocks.{i}.attn.v.bias", FLAT),
    (_VIT + "attention.output.dense.weight", "encoder.blocks.{i}.attn.o.kernel", linear(2)),
    (_VIT + "attention.output.dense.bias", "encoder.blocks.{i}.attn.o.bias", IDENTITY),
    (_VIT + "layernorm_after.weight", "encoder.blocks.{i}.ln_2.scale", IDENTITY),
    (_VIT + "layernorm_after.bias", "encoder.blocks.{i}.ln_2.bias", IDENTITY),
    (_VIT + "intermediate.dense.weight", "encoder.blocks.{i}.mlp.fc.kernel", linear(1)),
    (_VIT + "intermediate.dense.bias", "encoder.blocks.{i}.mlp.fc.bias", IDENTITY),
    (_VIT + "output.dense.weight", "encoder.blocks.{i}.mlp.proj.kernel", linear(1)),
    (_VIT + "output.dense.bias", "encoder.blocks.{i}.mlp.proj.bias", IDENTITY),
    ("encoder.layernorm.weight", "encoder.ln_f.scale", IDENTITY),
    ("encoder.layernorm.bias", "encoder.ln_f.bias", IDENTITY),
    ("enc_to_dec_proj.weight", "enc_to_dec_proj.kernel", linear(1)),
    ("enc_to_dec_proj.bias", "enc_to_dec_proj.bias", IDENTITY),
    ("decoder.transformer.wte.weight", "decoder.wte", IDENTITY),
    ("decoder.transformer.wpe.weight", "decoder.wpe", IDENTITY),
    (_GPT + "ln_1.weight", "decoder.blocks.{i}.ln_1.scale", IDENTITY),
    (_GPT + "ln_1.bias", "decoder.blocks.{i}.ln_1.bias", IDENTITY),
    (_GPT + "attn.c_attn.weight", "decoder.blocks.{i}.attn.qkv.kernel", conv1d(1)),
    (_GPT + "attn.c_attn.bias", "decoder.blocks.{i}.attn.qkv.bias", FLAT),
    (_GPT + "attn.c_proj.weight", "decoder.blocks.{i}.attn.o.kernel", conv1d(2)),
    (_GPT + "attn.c_proj.bias", "decoder.blocks.{i}.attn.o.bias", IDENTITY),
    (_GPT + "ln_cross_attn.weight", "decoder.blocks.{i}.ln_cross.scale", IDENTITY),
    (_GPT + "ln_cross_attn.bias", "decoder.blocks.{i}.ln_cross.bias", IDENTITY),
    (_GPT + "crossattention.q_attn.weight", "decoder.blocks.{i}.cross.q.kernel", conv1d(1)),
    (_GPT + "crossattention.q_attn.bias", "decoder.blocks.{i}.cross.q.bias", FLAT),
    (_GPT + "crossattention.c_attn.weight", "decoder.blocks.{i}.cross.kv.kernel", conv1d(1)),
    (_GPT + "crossattention.c_attn.bias", "decoder.blocks.{i}.cross.kv.bias", FLAT),
    (_GPT + "crossattention.c_proj.weight", "decoder.blocks.{i}.cross.o.kernel", conv1d(2)),
    (_GPT + "crossattention.c_proj.bias", "decoder.blocks.{i}.cross.o.bias", IDENTITY),
    (_GPT + "ln_2.weight", "decoder.blocks.{i}.ln_2.scale", IDENTITY),
    (_GPT + "ln_2.bias", "decoder.blocks.{i}.ln_2.bias", IDENTITY),
    (_GPT + "mlp.c_fc.weight", "decoder.blocks.{i}.mlp.fc.kernel", conv1d(1)),
    (_GPT + "mlp.c_fc.bias", "decoder.blocks.{i}.mlp.fc.bias", IDENTITY),
    (_GPT + "mlp.c_proj.weight", "decoder.blocks.{i}.mlp.proj.kernel", conv1d(1)),
    (_GPT + "mlp.c_proj.bias", "decoder.blocks.{i}.mlp.proj.bias", IDENTITY),
    ("decoder.transformer.ln_f.weight", "decoder.ln_f.scale", IDENTITY),
    ("decoder.transformer.ln_f.bias", "decoder.ln_f.bias", IDENTITY),
    ("decoder.lm_head.weight", "decoder.lm_head.kernel", linear(1)),  # untied heads only
]
# Tied heads: lm_head *is* wte, so a checkpoint that stores only lm_head still loads.
TIED_HEAD = ("decoder.lm_head.weight", "decoder.wte", IDENTITY)

# Legacy buffers (causal-mask constants of old GPT-2 exports) and the unused ViT pooler.
IGNORED = re.compile(
    r"decoder\.transformer\.h\.\d+\.(attn|crossattention)\.(bias|masked_bias)"
    r"|encoder\.pooler\..*"
)

HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
HF_SHARDS = "model-*-of-*.safetensors"
NNX_WEIGHTS = "nnx_model.safetensors"  # converted layout: keys are NNX paths
NNX_FORMAT = {"format": "nnx-caption"}
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
AUX_FILES = (*TOKENIZER_FILES, "preprocessor_config.json")  # travel with the weights


def _compile(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


class WeightMap:
    """The table, compiled for one config (tied or untied head), in both directions."""

    def __init__(self, config: CaptionConfig):
        rows = [r for r in TABLE if r[0] != TIED_HEAD[0]]
        rows.append(TIED_HEAD if config.decoder.tie_word_embeddings else TABLE[-1])
        self.rows = [(_compile(hf), _compile(nnx_), hf, nnx_, t) for hf, nnx_, t in rows]

    def to_nnx(self, hf_name: str) -> tuple[str, Transform] | None:
        for hf_re, _, _, nnx_tpl, transform in self.rows:
            if m := hf_re.match(hf_name):
                return nnx_tpl.replace("{i}", m.groupdict().get("i") or ""), transform
        return None

    def has_hf_name(self, nnx_path: str) -> bool:
        return any(nnx_re.match(nnx_path) for _, nnx_re, _, _, _ in self.rows)

    def to_hf(self, nnx_path: str) -> tuple[str, Transform]:
        for _, nnx_re, hf_tpl, _, transform in self.rows:
            if m := nnx_re.match(nnx_path):
                return hf_tpl.replace("{i}", m.groupdict().get("i") or ""), transform
        raise KeyError(f"no Hugging Face name for NNX parameter {nnx_path!r}")


# Loading -------------------------------------------------------------------------------------


def resolve(
    path_or_repo_id: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | None = None,
    token: str | None = None,
) -> str:
    """A local checkpoint folder, downloading the needed files of a hub repo id when given one."""
    path = os.fspath(path_or_repo_id)
    if os.path.isdir(path):
        return path
    if os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise CheckpointError(
            f"{path}: not a checkpoint folder (expected a directory with "
            "config.json and *.safetensors, or a hub repo id like org/name)"
        )
    import huggingface_hub  # deferred: only hub ids need it
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["config.json", "generation_config.json", "*.safetensors", HF_INDEX, *AUX_FILES]
    try:
        return huggingface_hub.snapshot_download(
            path, revision=revision, cache_dir=cache_dir, token=token, allow_patterns=patterns
        )
    except LocalEntryNotFoundError as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        why = (
            "HF_HUB_OFFLINE is set and it is not in the cache"
            if offline
            else "the hub cannot be reached and it is not in the cache"
        )
        raise CheckpointError(
            f"{path}: cannot load hub repo: {why}. Download it once where the hub is reachable "
            f"(`hf download {path}`, same cache_dir / HF_HOME), or pass a local folder "
            f"holding config.json and *.safetensors. ({type(err).__name__})"
        ) from None
    except (HfHubHTTPError, ValueError, OSError) as err:
        raise CheckpointError(f"{path}: cannot download from the hub: {err}") from None


def weight_files(directory: str) -> tuple[str, list[str]]:
    """('nnx' | 'hf', files) for a checkpoint folder, refusing pickled PyTorch weights."""
    if os.path.exists(os.path.join(directory, NNX_WEIGHTS)):
        return "nnx", [os.path.join(directory, NNX_WEIGHTS)]
    index = os.path.join(directory, HF_INDEX)
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{index}: not a valid safetensors index ({err!r})") from None
        files = [os.path.join(directory, n) for n in names]
        for f in files:
            if not os.path.exists(f):
                raise CheckpointError(f"{index} lists {os.path.basename(f)}, which is missing")
        return "hf", files
    if os.path.exists(os.path.join(directory, HF_WEIGHTS)):
        return "hf", [os.path.join(directory, HF_WEIGHTS)]
    pickles = [p for pat in PICKLE_PATTERNS for p in glob.glob(os.path.join(directory, pat))]
    if pickles:
        raise CheckpointError(
            f"{pickles[0]}: PyTorch pickle checkpoints are never unpickled (loading one can run "
            "arbitrary code). Convert it to safetensors once, where you trust it: "
            "`VisionEncoderDecoderModel.from_pretrained(src).save_pretrained(dst)` in "
            "transformers writes model.safetensors."
        )
    raise CheckpointError(f"{directory}: no {HF_WEIGHTS}, {HF_INDEX} or {NNX_WEIGHTS} found")


def checkpoint_files(directory: str) -> list[str]:
    """The weight files a folder holds, of any layout: HF (single, or shards and their index),
    NNX, PyTorch pickles."""
    if not os.path.isdir(directory):
        return []
    patterns = (HF_WEIGHTS, HF_INDEX, HF_SHARDS, NNX_WEIGHTS, *PICKLE_PATTERNS)
    return sorted({p for pat in patterns for p in glob.glob(os.path.join(directory, pat))})


def path_str(path: tuple) -> str:
    """An NNX state path as the dotted name that new_params, --trainable and --freeze match."""
    return ".".join(map(str, path))


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


def listing(names: Sequence[str], most: int = 8) -> str:
    """The first `most` names, comma-separated, with ' ...' when there are more."""
    return ", ".join(names[:most]) + (" ..." if len(names) > most else "")


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
        with SafetensorsReader(file) as reader:
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


def _log_report(what: str, report: LoadReport) -> None:
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
    _log_report(directory, loader.finish(", ".join(files)))
    return nnx.merge(graphdef, state)


# Composing a captioner from a pretrained ViT and a pretrained GPT-2 ---------------------------

# What transformers' from_encoder_decoder_pretrained adds: cross-attention in every block, and
# the width projection when the widths differ.
COMPOSED_NEW = (r"decoder\.blocks\.\d+\.(ln_cross|cross)\..*", r"enc_to_dec_proj\..*")


def _encoder_name(key: str) -> str | None:
    """A ViTModel / ViTForImageClassification key -> its VisionEncoderDecoder name; the pooler
    and the classifier are not part of the captioner."""
    key = key.removeprefix("vit.")
    return None if key.startswith(("pooler.", "classifier.")) else "encoder." + key


def _decoder_name(key: str) -> str:
    """A GPT2LMHeadModel / GPT2Model key (the original gpt2 repo has no prefix) -> its name."""
    if key == "lm_head.weight":
        return "decoder.lm_head.weight"
    return "decoder.transformer." + key.removeprefix("transformer.")


def _part_config(directory: str, model_type: str, role: str) -> dict:
    hf = read_json(os.path.join(directory, "config.json"))
    if hf.get("model_type") != model_type:
        raise ConfigError(
            f"{directory}/config.json: model_type is {hf.get('model_type')!r}; the {role} must "
            f"be a {model_type!r} checkpoint"
        )
    return hf


def from_encoder_decoder_pretrained(
    encoder: str | os.PathLike,
    decoder: str | os.PathLike,
    *,
    seed: int = 0,
    dtype: jnp.dtype | None = None,
    param_dtype: jnp.dtype = jnp.float32,
    allow_nonfinite: bool = False,
    revision: str | None = None,
    cache_dir: str | None = None,
    token: str | None = None,
) -> VisionEncoderDecoder:
    """A captioner from a pretrained ViT (ViTModel or ViTForImageClassification layout) and a
    pretrained GPT-2 (GPT2LMHeadModel or GPT2Model layout), local folders or hub ids, as
    transformers' VisionEncoderDecoderModel.from_encoder_decoder_pretrained composes it: every
    block's cross-attention (and enc_to_dec_proj when the widths differ) is new, initialised
    from `seed` as transformers initialises it; the loaded parts are the sources' tensors.
    Token ids as HF's captioning example sets them: decoder_start = the decoder's bos,
    pad = eos = its eos."""
    hub = dict(revision=revision, cache_dir=cache_dir, token=token)
    enc_dir, dec_dir = resolve(encoder, **hub), resolve(decoder, **hub)
    enc = _part_config(enc_dir, "vit", "encoder")
    dec = _part_config(dec_dir, "gpt2", "decoder")
    decoder_cfg = pick_fields(GPT2Config, dec, "decoder")
    if decoder_cfg.bos_token_id is None or decoder_cfg.eos_token_id is None:
        raise ConfigError(f"{dec_dir}/config.json: bos_token_id and eos_token_id must be set")
    config = CaptionConfig(
        encoder=pick_fields(ViTConfig, enc, "encoder"),
        decoder=decoder_cfg,
        decoder_start_token_id=decoder_cfg.bos_token_id,
        pad_token_id=decoder_cfg.eos_token_id,
        eos_token_id=decoder_cfg.eos_token_id,
    )
    config.validate()
    graphdef, variables, state = abstract_model(config, dtype, param_dtype)
    new = COMPOSED_NEW if config.needs_enc_to_dec_proj else COMPOSED_NEW[:1]
    init = initial_values(VisionEncoderDecoder, config, dtype, param_dtype, seed, variables)
    loader = Loader(config, variables, new_params=new, init=init, allow_nonfinite=allow_nonfinite)
    for directory, rename, role in (
        (enc_dir, _encoder_name, "ViT"),
        (dec_dir, _decoder_name, "GPT-2"),
    ):
        layout, files = weight_files(directory)
        if layout != "hf":
            raise CheckpointError(f"{files[0]}: the {role} must be a Hugging Face checkpoint")
        for file in files:
            loader.read(file, "hf", rename, hint=f" (not a {role} checkpoint?)")
    where = f"{enc_dir} + {dec_dir}"
    _log_report(where, loader.finish(where))
    return nnx.merge(graphdef, state)


# Saving --------------------------------------------------------------------------------------


def unnamed_params(model: nnx.Module) -> list[str]:
    """NNX paths of the model's parameters that the weight table gives no Hugging Face name."""
    weights = WeightMap(model.config)
    names = [path_str(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    return [n for n in names if not weights.has_hf_name(n)]


def copy_aux_files(src: str, dst: str, names: Sequence[str] = AUX_FILES) -> list[str]:
    """Copies the tokenizer and image-processor files that `src` has into `dst` (a file onto
    itself is left alone); returns the names copied."""
    copied = []
    for name in names:
        path, target = os.path.join(src, name), os.path.join(dst, name)
        if os.path.exists(path) and os.path.abspath(path) != os.path.abspath(target):
            copy_file(path, target)
            copied.append(name)
    return copied


def save_pretrained(
    model: VisionEncoderDecoder,
    out_dir: str | os.PathLike,
    *,
    layout: str = "hf",
    overwrite: bool = False,
) -> None:
    """Writes config.json, generation_config.json and the weights, each file atomically (a
    crash mid-save leaves the old one).

    layout "hf": model.safetensors that transformers' VisionEncoderDecoderModel loads (a tied
    head is stored once, as transformers does); a model with parameters that have no HF name
    (an edited architecture, unmerged LoRA adapters) is refused before anything is written.
    layout "nnx": nnx_model.safetensors keyed by NNX path, for any model;
    from_pretrained(out_dir, model_cls=type(model)) restores it exactly.
    A folder holding other weights (the other layout, HF shards, PyTorch pickles) is refused
    unless `overwrite`: then they are deleted once the new weights are written, since
    from_pretrained would otherwise pick them.
    In a multi-process run every process calls it: each tensor sharded across processes is
    all-gathered in turn (so each process holds about one tensor more, never the model) and
    process 0 writes; every process returns once the files are final.
    """
    if layout not in ("hf", "nnx"):
        raise ValueError(f"layout must be 'hf' or 'nnx', got {layout!r}")
    out_dir = os.fspath(out_dir)
    target = os.path.join(out_dir, NNX_WEIGHTS if layout == "nnx" else HF_WEIGHTS)
    others = [f for f in checkpoint_files(out_dir) if os.path.abspath(f) != os.path.abspath(target)]
    if others and not overwrite:
        raise CheckpointError(
            f"{out_dir} holds other weights ({listing([os.path.basename(f) for f in others])}): "
            f"saving the {layout} layout there would replace them. Pass overwrite=True "
            "(CLI: --overwrite) to do so, or save to another folder"
        )
    config = model.config
    weights = WeightMap(config)
    unnamed = unnamed_params(model) if layout == "hf" else []
    specs = []
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, value = path_str(path), var[...]
        if layout == "nnx":
            specs.append((name, value.shape, value.dtype, lambda v=value: to_host(v)))
            continue
        if name in unnamed:
            continue
        hf_name, t = weights.to_hf(name)
        specs.append(
            (
                hf_name,
                t.hf_shape(value.shape),
                value.dtype,
                lambda v=value, t=t: t.to_hf(to_host(v)),
            )
        )
    if unnamed:
        raise CheckpointError(
            f"{out_dir}: {len(unnamed)} parameter(s) have no Hugging Face name, so transformers "
            f"could not load them: {listing(unnamed)}. "
            'Save with layout="nnx" (from_pretrained(dir, model_cls=...) restores it)'
            + (
                ", or merge the LoRA adapters first (lora.merge_lora)"
                if any("lora" in n for n in unnamed)
                else ""
            )
        )
    if layout == "hf":
        # transformers builds the ViT with a pooler that VisionEncoderDecoder never uses; zeros
        # keep its load report free of "MISSING, newly initialized" and the export deterministic.
        e = config.encoder.hidden_size
        specs += [
            (f"encoder.pooler.dense.{n}", s, np.float32, lambda s=s: np.zeros(s, np.float32))
            for n, s in (("weight", (e, e)), ("bias", (e,)))
        ]
    specs.sort(key=lambda s: s[0])
    if not processes.is_main():  # it takes part in gathering each tensor, in the same order
        for *_, produce in specs:
            produce()
        processes.barrier("save_pretrained")  # returns once process 0's files are final
        return
    os.makedirs(out_dir, exist_ok=True)
    meta = (
        {**NNX_FORMAT, "model_class": class_spec(type(model))}
        if layout == "nnx"
        else {"format": "pt"}  # transformers checks "pt"
    )
    write_safetensors(target, specs, meta)
    for other in others:  # only after the new weights are complete
        os.remove(other)
    write_config(config, out_dir)
    processes.barrier("save_pretrained")


__all__ = [
    "CheckpointError",
    "ConfigError",
    "LoadReport",
    "TABLE",
    "checkpoint_files",
    "from_encoder_decoder_pretrained",
    "from_pretrained",
    "init_model",
    "save_pretrained",
    "resolve",
]
