"""Frozen model configs, read from and written to Hugging Face `config.json`.

Field names are Hugging Face's own (ViTConfig, GPT2Config, VisionEncoderDecoderConfig), so a
reader who knows one knows the other, and `from_hf` / `to_hf` are field-for-field copies.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from nnx_caption import files
from nnx_caption.execution import Execution
from nnx_caption.layers import ACTIVATIONS


class ConfigError(ValueError):
    """A config.json that is missing, unreadable or describes a model we cannot build."""


@dataclass(frozen=True)
class ViTConfig:
    model_type: ClassVar[str] = "vit"
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    layer_norm_eps: float = 1e-12
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    qkv_bias: bool = True
    pooler_output_size: int | None = None  # the unused pooler's width; None: hidden_size

    def __post_init__(self) -> None:  # as transformers fills it in
        if self.pooler_output_size is None:
            object.__setattr__(self, "pooler_output_size", self.hidden_size)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid_size(self) -> int:
        """Patches per side of the image size the position embeddings were trained for."""
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class DeiTConfig(ViTConfig):
    """DeiT: transformers' DeiTConfig has ViT's fields; its embeddings add a distillation
    token (deit.py)."""

    model_type: ClassVar[str] = "deit"


# config.json's encoder.model_type -> the config class it is read into (model.ENCODERS maps
# that class to its module, weight_table.ENCODER_TABLES to its weight table).
ENCODER_CONFIGS = {c.model_type: c for c in (ViTConfig, DeiTConfig)}


@dataclass(frozen=True)
class GPT2Config:
    model_type: ClassVar[str] = "gpt2"
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02  # std of new weights (transformers' _init_weights)
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_size(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    # Every decoder config's names for what code outside its model file reads.
    width_and_heads_fields: ClassVar[tuple[str, str]] = ("n_embd", "n_head")
    activation_field: ClassVar[str] = "activation_function"
    width = property(lambda self: self.n_embd)
    num_layers = property(lambda self: self.n_layer)
    num_heads = property(lambda self: self.n_head)
    max_positions = property(lambda self: self.n_positions)
    init_std = property(lambda self: self.initializer_range)


@dataclass(frozen=True)
class TrOCRConfig:
    """transformers' TrOCRConfig: a post-LN decoder with learned (offset 2) or sinusoidal
    positions (trocr.py)."""

    model_type: ClassVar[str] = "trocr"
    vocab_size: int = 50265
    d_model: int = 1024
    decoder_layers: int = 12
    decoder_attention_heads: int = 16
    decoder_ffn_dim: int = 4096
    activation_function: str = "gelu"
    max_position_embeddings: int = 512
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    init_std: float = 0.02
    scale_embedding: bool = False
    use_learned_position_embeddings: bool = True
    layernorm_embedding: bool = True
    cross_attention_hidden_size: int | None = None  # the encoder's width, read without a proj
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 1  # sinusoidal positions skip it
    bos_token_id: int | None = 0
    eos_token_id: int | None = 2

    @property
    def head_dim(self) -> int:
        return self.d_model // self.decoder_attention_heads

    width_and_heads_fields: ClassVar[tuple[str, str]] = ("d_model", "decoder_attention_heads")
    activation_field: ClassVar[str] = "activation_function"
    width = property(lambda self: self.d_model)
    num_layers = property(lambda self: self.decoder_layers)
    num_heads = property(lambda self: self.decoder_attention_heads)
    max_positions = property(lambda self: self.max_position_embeddings)
    inner_size = property(lambda self: self.decoder_ffn_dim)


@dataclass(frozen=True)
class BertConfig:
    """transformers' BertConfig, as BertLMHeadModel uses it as a decoder (is_decoder,
    add_cross_attention): post-LN blocks, absolute positions, token types (bert.py)."""

    model_type: ClassVar[str] = "bert"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    position_embedding_type: str = "absolute"
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    width_and_heads_fields: ClassVar[tuple[str, str]] = ("hidden_size", "num_attention_heads")
    activation_field: ClassVar[str] = "hidden_act"
    width = property(lambda self: self.hidden_size)
    num_layers = property(lambda self: self.num_hidden_layers)
    num_heads = property(lambda self: self.num_attention_heads)
    max_positions = property(lambda self: self.max_position_embeddings)
    init_std = property(lambda self: self.initializer_range)
    inner_size = property(lambda self: self.intermediate_size)


# config.json's decoder.model_type -> its config class (model.DECODERS: its module).
DECODER_CONFIGS = {c.model_type: c for c in (GPT2Config, TrOCRConfig, BertConfig)}


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding defaults (generation_config.json), with transformers' defaults."""

    max_length: int = 20
    max_new_tokens: int | None = None
    min_length: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    no_repeat_ngram_size: int = 0
    num_return_sequences: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0


@dataclass(frozen=True)
class CaptionConfig:
    encoder: ViTConfig = field(default_factory=ViTConfig)
    decoder: GPT2Config = field(default_factory=GPT2Config)
    decoder_start_token_id: int = 50256
    pad_token_id: int = 50256
    eos_token_id: int = 50256
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    # How the blocks run (scan over layers, remat): part of what the model is built from, so
    # nothing mutates a built model; never written to config.json. See layers.Execution.
    execution: Execution = field(default_factory=Execution)

    @property
    def needs_enc_to_dec_proj(self) -> bool:
        # transformers projects encoder states when the widths differ, unless the decoder's
        # cross-attention reads the encoder's width itself (cross_attention_hidden_size).
        reads_encoder_width = getattr(self.decoder, "cross_attention_hidden_size", None)
        return self.encoder.hidden_size != self.decoder.width and reads_encoder_width is None

    @classmethod
    def from_hf(cls, hf: dict[str, Any], generation: dict[str, Any] | None = None) -> CaptionConfig:
        """Builds the config from a VisionEncoderDecoder config.json (+ generation_config)."""
        if hf.get("model_type") != "vision-encoder-decoder":
            raise ConfigError(
                f"model_type is {hf.get('model_type')!r}, expected 'vision-encoder-decoder'"
            )
        for part, known in (("encoder", ENCODER_CONFIGS), ("decoder", DECODER_CONFIGS)):
            sub = hf.get(part)
            if not isinstance(sub, dict):
                raise ConfigError(f"'{part}' is missing: a VisionEncoderDecoder config nests it")
            if sub.get("model_type") not in known:
                raise ConfigError(
                    f"{part}.model_type is {sub.get('model_type')!r}; nnx-caption builds "
                    + " or ".join(map(repr, known))
                )
        enc, dec = hf["encoder"], hf["decoder"]
        if dec.get("add_cross_attention") is False and dec["model_type"] in ("gpt2", "bert"):
            raise ConfigError("decoder.add_cross_attention is false: the decoder must cross-attend")
        if dec.get("cross_attention_hidden_size") not in (None, enc.get("hidden_size")):
            raise ConfigError("decoder.cross_attention_hidden_size must equal encoder.hidden_size")
        encoder = pick_fields(ENCODER_CONFIGS[enc["model_type"]], enc, "encoder")
        decoder = pick_fields(DECODER_CONFIGS[dec["model_type"]], dec, "decoder")
        eos = first_given(hf.get("eos_token_id"), decoder.eos_token_id)
        start = first_given(hf.get("decoder_start_token_id"), decoder.bos_token_id)
        pad = first_given(hf.get("pad_token_id"), dec.get("pad_token_id"), eos)
        if start is None or eos is None:
            raise ConfigError("decoder_start_token_id and eos_token_id must be set in config.json")
        # Older checkpoints keep generation defaults in config.json; generation_config.json wins.
        gen_src = {**{k: v for k, v in hf.items() if k in _GEN_FIELDS}, **(generation or {})}
        config = cls(
            encoder=encoder,
            decoder=decoder,
            decoder_start_token_id=start,
            pad_token_id=pad,
            eos_token_id=eos,
            generation=pick_fields(GenerationConfig, gen_src, "generation_config"),
        )
        config.validate()
        return config

    def to_hf(self) -> dict[str, Any]:
        """The config.json dict that transformers' VisionEncoderDecoderModel loads."""
        enc = dataclasses.asdict(self.encoder) | {"model_type": self.encoder.model_type}
        dec = dataclasses.asdict(self.decoder) | {
            "model_type": self.decoder.model_type,
            "add_cross_attention": True,
            "is_decoder": True,
            "pad_token_id": self.pad_token_id,
        }
        return {
            "model_type": "vision-encoder-decoder",
            "architectures": ["VisionEncoderDecoderModel"],
            "is_encoder_decoder": True,
            "encoder": enc,
            "decoder": dec,
            "decoder_start_token_id": self.decoder_start_token_id,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_id,
            "tie_word_embeddings": self.decoder.tie_word_embeddings,
        }

    def generation_to_hf(self) -> dict[str, Any]:
        """The generation_config.json dict, token ids included."""
        return dataclasses.asdict(self.generation) | {
            "decoder_start_token_id": self.decoder_start_token_id,
            "bos_token_id": self.decoder.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }

    def validate(self) -> None:
        e, d = self.encoder, self.decoder
        checks = [
            (
                e.hidden_size % e.num_attention_heads == 0,
                "encoder.hidden_size % num_attention_heads",
            ),
            (d.width % d.num_heads == 0, "decoder.{} % {}".format(*d.width_and_heads_fields)),
            (e.image_size % e.patch_size == 0, "encoder.image_size % patch_size"),
        ]
        for ok, what in checks:
            if not ok:
                raise ConfigError(f"{what} must be 0")
        acts = (
            ("encoder.hidden_act", e.hidden_act),
            (f"decoder.{d.activation_field}", getattr(d, d.activation_field)),
        )
        if getattr(d, "position_embedding_type", "absolute") != "absolute":
            raise ConfigError(
                f"decoder.position_embedding_type is {d.position_embedding_type!r}: only "
                "'absolute' is built"
            )
        for name, act in acts:
            if act not in ACTIVATIONS:
                raise ConfigError(f"{name} {act!r} is not one of {sorted(ACTIVATIONS)}")
        for name in ("decoder_start_token_id", "pad_token_id", "eos_token_id"):
            if not 0 <= getattr(self, name) < d.vocab_size:
                raise ConfigError(f"{name}={getattr(self, name)} is outside the vocabulary")


_GEN_FIELDS = {f.name for f in dataclasses.fields(GenerationConfig)}


def first_given(*values: Any) -> Any:
    """The first of `values` that is not None (0 counts), else None."""
    return next((v for v in values if v is not None), None)


def pick_fields(cls: type, src: dict[str, Any], where: str) -> Any:
    """Copies the fields `cls` knows from an HF dict, checking their types."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in src and src[f.name] is not None:
            value = src[f.name]
            default = f.default
            if isinstance(default, bool) and not isinstance(value, (bool, str)):
                raise ConfigError(f"{where}.{f.name} must be a boolean, got {value!r}")
            if isinstance(default, int) and not isinstance(default, bool):
                if not isinstance(value, int) or isinstance(value, bool):
                    raise ConfigError(f"{where}.{f.name} must be an integer, got {value!r}")
            if isinstance(default, float) and not isinstance(value, (int, float)):
                raise ConfigError(f"{where}.{f.name} must be a number, got {value!r}")
            kwargs[f.name] = value
    return cls(**kwargs)


def read_config(directory: str | os.PathLike) -> CaptionConfig:
    """Reads config.json (and generation_config.json when present) from a checkpoint folder."""
    path = os.path.join(directory, "config.json")
    hf = read_json(path)
    gen_path = os.path.join(directory, "generation_config.json")
    generation = read_json(gen_path) if os.path.exists(gen_path) else None
    try:
        return CaptionConfig.from_hf(hf, generation)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def read_json(path: str) -> dict[str, Any]:
    """A config file's JSON object; a ConfigError when it is missing or not one."""
    data = files.read_json(path, ConfigError)
    if data is None:
        raise ConfigError(f"{path} is missing: a checkpoint folder needs its config.json")
    return data


def write_config(config: CaptionConfig, directory: str | os.PathLike) -> None:
    for name, data in (
        ("config.json", config.to_hf()),
        ("generation_config.json", config.generation_to_hf()),
    ):
        with files.replacing(os.path.join(directory, name), encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")


# Presets --------------------------------------------------------------------------------------


def tiny() -> CaptionConfig:
    """A few-layer model for tests and the CPU demo."""
    return CaptionConfig(
        encoder=ViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
        ),
        decoder=GPT2Config(
            vocab_size=512,
            n_positions=64,
            n_embd=48,
            n_layer=2,
            n_head=4,
            bos_token_id=0,
            eos_token_id=0,
        ),
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=0,
    )


def vit_gpt2_base() -> CaptionConfig:
    """ViT-B/16 at 224 + GPT-2 small: the shape of nlpconnect/vit-gpt2-image-captioning."""
    return CaptionConfig()


PRESETS = {"tiny": tiny, "vit_gpt2_base": vit_gpt2_base}
