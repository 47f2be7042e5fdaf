"""Hugging Face <-> NNX weights: one table, strict streaming load, save, hub download.

TABLE maps every Hugging Face tensor name of a VisionEncoderDecoderModel (ViT + GPT-2) to the
NNX parameter path that holds it, with the transform between their layouts. `{i}` stands for a
layer index. The same table drives loading (HF -> NNX) and saving (NNX -> HF).
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nnx_caption.config import CaptionConfig, ConfigError, read_config, write_config
from nnx_caption.model import VisionEncoderDecoder
from nnx_caption.safetensors_io import (
    FLOAT_DTYPES,
    CheckpointError,
    SafetensorsReader,
    write_safetensors,
)
from nnx_caption.sharding import param_sharding, place


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
    (_VIT + "layernorm_before.weight", "encoder.blocks.{i}.ln1.scale", IDENTITY),
    (_VIT + "layernorm_before.bias", "encoder.blocks.{i}.ln1.bias", IDENTITY),
    (_VIT + "attention.attention.query.weight", "encoder.blocks.{i}.attn.q.kernel", linear(1)),
    (_VIT + "attention.attention.query.bias", "encoder.blocks.{i}.attn.q.bias", FLAT),
    (_VIT + "attention.attention.key.weight", "encoder.blocks.{i}.attn.k.kernel", linear(1)),
    (_VIT + "attention.attention.key.bias", "encoder.blocks.{i}.attn.k.bias", FLAT),
    (_VIT + "attention.attention.value.weight", "encoder.blocks.{i}.attn.v.kernel", linear(1)),
    (_VIT + "attention.attention.value.bias", "encoder.blocks.{i}.attn.v.bias", FLAT),
    (_VIT + "attention.output.dense.weight", "encoder.blocks.{i}.attn.o.kernel", linear(2)),
    (_VIT + "attention.output.dense.bias", "encoder.blocks.{i}.attn.o.bias", IDENTITY),
    (_VIT + "layernorm_after.weight", "encoder.blocks.{i}.ln2.scale", IDENTITY),
    (_VIT + "layernorm_after.bias", "encoder.blocks.{i}.ln2.bias", IDENTITY),
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
NNX_WEIGHTS = "nnx_model.safetensors"  # converted layout: keys are NNX paths
NNX_FORMAT = {"format": "nnx-caption"}
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
AUX_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "preprocessor_config.json",
)


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


def abstract_model(
    config: CaptionConfig, dtype=None, param_dtype=jnp.float32
) -> tuple[nnx.GraphDef, dict[str, nnx.Variable], nnx.State]:
    """The model's structure, its parameters by NNX path (shapes only, nothing allocated)
    and the state holding them, to be filled and merged."""
    model = nnx.eval_shape(
        lambda: VisionEncoderDecoder(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    )
    graphdef, state = nnx.split(model)
    flat = {".".join(map(str, path)): var for path, var in nnx.to_flat_state(state)}
    return graphdef, flat, state


def load_weights(
    files: list[str], layout: str, config: CaptionConfig, params: dict[str, nnx.Variable], mesh=None
) -> None:
    """Streams every tensor of `files` into `params` (NNX path -> abstract Variable), in place.

    Strict: an unexpected tensor, a shape or dtype mismatch and a missing parameter are errors
    naming the file and key.
    """
    weights = WeightMap(config)
    source: dict[str, tuple[str, str]] = {}  # NNX path -> (file, key) it was loaded from
    for file in files:
        with SafetensorsReader(file) as reader:
            if layout == "nnx" and reader.metadata.get("format") != NNX_FORMAT["format"]:
                raise CheckpointError(f"{file}: not an nnx-caption converted checkpoint")
            for key in reader.entries:
                if layout == "hf" and IGNORED.fullmatch(key):
                    continue
                found = (key, IDENTITY) if layout == "nnx" else weights.to_nnx(key)
                var = params.get(found[0]) if found else None
                if var is None:
                    raise CheckpointError(
                        f"{file}: unexpected tensor {key!r}: the model built from config.json "
                        "has no such parameter (wrong architecture or layer count?)"
                    )
                path, transform = found
                want = transform.hf_shape(tuple(var.shape))
                if reader.shape(key) != want:
                    raise CheckpointError(
                        f"{file}: tensor {key!r} has shape {reader.shape(key)}, but config.json "
                        f"implies {want}"
                    )
                if reader.dtype_name(key) not in FLOAT_DTYPES:
                    raise CheckpointError(
                        f"{file}: tensor {key!r} has dtype "
                        f"{reader.dtype_name(key)}; weights must be floating"
                    )
                array = transform.to_nnx(reader.read(key), tuple(var.shape)).astype(var.dtype)
                if path in source:  # a tied head stored twice: both copies must agree
                    if not np.array_equal(np.asarray(var[...]), array):
                        raise CheckpointError(
                            f"{file}: {key!r} differs from {source[path][1]!r}, but the config "
                            "ties the LM head to the token embedding (tie_word_embeddings)"
                        )
                    continue
                if mesh is None:
                    var.set_value(jax.device_put(array))
                else:
                    var.set_value(place(array, param_sharding(var, mesh)))
                source[path] = (file, key)
    missing = [p for p in params if p not in source]
    if missing:
        names = [p if layout == "nnx" else weights.to_hf(p)[0] for p in missing]
        raise CheckpointError(
            f"{', '.join(files)}: missing {len(missing)} tensor(s): "
            f"{', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"
        )


def from_pretrained(
    path_or_repo_id: str | os.PathLike,
    dtype: jnp.dtype | None = None,
    *,
    param_dtype: jnp.dtype = jnp.float32,
    mesh=None,
    revision: str | None = None,
    cache_dir: str | None = None,
    token: str | None = None,
) -> VisionEncoderDecoder:
    """Loads a checkpoint in HF or converted NNX layout (local folder or hub repo id).

    `dtype` is the compute dtype (e.g. jnp.bfloat16), None meaning param_dtype; parameters are
    streamed from disk straight into (sharded, when `mesh` is given) device arrays.
    """
    directory = resolve(path_or_repo_id, revision=revision, cache_dir=cache_dir, token=token)
    config = read_config(directory)
    layout, files = weight_files(directory)
    graphdef, params, state = abstract_model(config, dtype, param_dtype)
    load_weights(files, layout, config, params, mesh)
    return nnx.merge(graphdef, state)


# Saving --------------------------------------------------------------------------------------


def save_pretrained(
    model: VisionEncoderDecoder, out_dir: str | os.PathLike, *, layout: str = "hf"
) -> None:
    """Writes config.json, generation_config.json and the weights.

    layout "hf": model.safetensors that transformers' VisionEncoderDecoderModel loads (a tied
    head is stored once, as transformers does); layout "nnx": nnx_model.safetensors keyed by
    NNX path, loaded without any transform.
    """
    if layout not in ("hf", "nnx"):
        raise ValueError(f"layout must be 'hf' or 'nnx', got {layout!r}")
    os.makedirs(out_dir, exist_ok=True)
    config = model.config
    weights = WeightMap(config)
    specs = []
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = ".".join(map(str, path))
        value = var[...]
        if layout == "nnx":
            specs.append((name, value.shape, value.dtype, lambda v=value: np.asarray(v)))
            continue
        hf_name, t = weights.to_hf(name)
        specs.append(
            (
                hf_name,
                t.hf_shape(value.shape),
                value.dtype,
                lambda v=value, t=t: t.to_hf(np.asarray(v)),
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
    file = NNX_WEIGHTS if layout == "nnx" else HF_WEIGHTS
    meta = NNX_FORMAT if layout == "nnx" else {"format": "pt"}  # transformers checks "pt"
    write_safetensors(os.path.join(out_dir, file), sorted(specs, key=lambda s: s[0]), meta)
    # A folder must not hold both layouts: from_pretrained would pick the NNX file.
    stale = os.path.join(out_dir, HF_WEIGHTS if layout == "nnx" else NNX_WEIGHTS)
    if os.path.exists(stale):
        os.remove(stale)
    write_config(config, out_dir)


__all__ = [
    "CheckpointError",
    "ConfigError",
    "TABLE",
    "from_pretrained",
    "save_pretrained",
    "resolve",
]
