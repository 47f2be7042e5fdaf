"""Where checkpoints are: a local folder or a hub repo id (huggingface_hub), the weight files a
folder holds by layout, and the tokenizer / processor files that travel with the weights."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence

import huggingface_hub
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

from nnx_caption.files import copy_file
from nnx_caption.safetensors_io import CheckpointError

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
