"""nnx-caption: image captioning (ViT encoder + GPT-2 decoder) in pure Flax NNX."""

from nnx_caption.compose import from_encoder_decoder_pretrained
from nnx_caption.config import (
    BertConfig,
    CaptionConfig,
    ConfigError,
    DeiTConfig,
    GenerationConfig,
    GPT2Config,
    TrOCRConfig,
    ViTConfig,
)
from nnx_caption.generate import GenerateOutput, generate
from nnx_caption.loading import LoadReport, from_pretrained
from nnx_caption.metrics import CaptionScores, caption_metrics
from nnx_caption.model import VisionEncoderDecoder
from nnx_caption.processing import ImageProcessor, Tokenizer
from nnx_caption.safetensors_io import CheckpointError
from nnx_caption.saving import save_pretrained

__all__ = [
    "CaptionConfig",
    "CaptionScores",
    "GenerateOutput",
    "CheckpointError",
    "ConfigError",
    "GPT2Config",
    "GenerationConfig",
    "ImageProcessor",
    "Tokenizer",
    "ViTConfig",
    "DeiTConfig",
    "TrOCRConfig",
    "BertConfig",
    "VisionEncoderDecoder",
    "LoadReport",
    "caption_metrics",
    "from_encoder_decoder_pretrained",
    "from_pretrained",
    "generate",
    "save_pretrained",
]
