"""Hugging Face checkpoints in NNX: the names other code imports, each from the module of its job
(the weight table, hub and files, loading, composing, saving)."""

from nnx_caption.compose import from_encoder_decoder_pretrained
from nnx_caption.config import ConfigError
from nnx_caption.hub import (
    AUX_FILES,
    HF_INDEX,
    HF_WEIGHTS,
    NNX_WEIGHTS,
    TOKENIZER_FILES,
    checkpoint_files,
    copy_aux_files,
    resolve,
    weight_files,
)
from nnx_caption.loading import Loader, LoadReport, abstract_model, from_pretrained, init_model
from nnx_caption.names import listing, path_str
from nnx_caption.safetensors_io import CheckpointError
from nnx_caption.saving import save_pretrained, unnamed_params
from nnx_caption.weight_table import TABLE, WeightMap

__all__ = [
    "AUX_FILES",
    "CheckpointError",
    "ConfigError",
    "HF_INDEX",
    "HF_WEIGHTS",
    "LoadReport",
    "Loader",
    "NNX_WEIGHTS",
    "TABLE",
    "TOKENIZER_FILES",
    "WeightMap",
    "abstract_model",
    "checkpoint_files",
    "copy_aux_files",
    "from_encoder_decoder_pretrained",
    "from_pretrained",
    "init_model",
    "listing",
    "path_str",
    "resolve",
    "save_pretrained",
    "unnamed_params",
    "weight_files",
]
