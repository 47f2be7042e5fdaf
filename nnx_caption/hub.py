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
# PyTorch state dicts, read without running pickle's code (torch_pickle), when a folder has no
# safetensors: many hub repos ship only these.
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SHARDS = "pytorch_model-*-of-*.bin"
NNX_WEIGHTS = "nnx_model.safetensors"  # converted layout: keys are NNX paths
NNX_FORMAT = {"format": "nnx-caption"}
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",  # BERT's WordPiece
    "sentencepiece.bpe.model",  # XLM-R's (trocr-small's)
    "added_tokens.json",
)
AUX_FILES = (*TOKENIZER_FILES, "preprocessor_config.json")  # travel with the weights
SAFETENSORS_NAMES = (HF_WEIGHTS, HF_INDEX, NNX_WEIGHTS)


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
        directory = huggingface_hub.snapshot_download(
            path, revision=revision, cache_dir=cache_dir, token=token, allow_patterns=patterns
        )
        if not any(os.path.exists(os.path.join(directory, n)) for n in SAFETENSORS_NAMES):
            # No safetensors in the repo: its PyTorch state dict, as transformers falls back.
            directory = huggingface_hub.snapshot_download(
                path,
                revision=revision,
                cache_dir=cache_dir,
                token=token,
                allow_patterns=[*patterns, BIN_WEIGHTS, BIN_INDEX, BIN_SHARDS],
            )
        return directory
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
    """('nnx' | 'hf', files) for a checkpoint folder: safetensors first, then PyTorch's
    pytorch_model.bin (single or sharded), as transformers looks for them."""
    if os.path.exists(os.path.join(directory, NNX_WEIGHTS)):
        return "nnx", [os.path.join(directory, NNX_WEIGHTS)]
    for index, single in ((HF_INDEX, HF_WEIGHTS), (BIN_INDEX, BIN_WEIGHTS)):
        if os.path.exists(os.path.join(directory, index)):
            return "hf", _indexed_files(os.path.join(directory, index))
        if os.path.exists(os.path.join(directory, single)):
            return "hf", [os.path.join(directory, single)]
    others = [p for pat in PICKLE_PATTERNS for p in glob.glob(os.path.join(directory, pat))]
    if others:
        raise CheckpointError(
            f"{others[0]}: not a weights file that transformers writes. nnx-caption reads "
            f"{HF_WEIGHTS} (or {HF_INDEX} and its shards) and PyTorch state dicts named "
            f"{BIN_WEIGHTS} (or {BIN_INDEX}); other pickles are never unpickled"
        )
    raise CheckpointError(
        f"{directory}: no {HF_WEIGHTS}, {HF_INDEX}, {NNX_WEIGHTS} or {BIN_WEIGHTS} found"
    )


def _indexed_files(index: str) -> list[str]:
    """The shard files an index.json names, each of which must exist."""
    try:
        with open(index, encoding="utf-8") as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{index}: not a valid weights index ({err!r})") from None
    files = [os.path.join(os.path.dirname(index), n) for n in names]
    for f in files:
        if not os.path.exists(f):
            raise CheckpointError(f"{index} lists {os.path.basename(f)}, which is missing")
    return files


def checkpoint_files(directory: str) -> list[str]:
    """The weight files a folder holds, of any layout: HF (single, or shards and their index),
    NNX, PyTorch pickles."""
    if not os.path.isdir(directory):
        return []
    patterns = (HF_WEIGHTS, HF_INDEX, HF_SHARDS, NNX_WEIGHTS, BIN_INDEX, *PICKLE_PATTERNS)
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
