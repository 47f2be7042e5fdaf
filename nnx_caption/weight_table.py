"""The weight tables: every Hugging Face tensor name of a VisionEncoderDecoderModel, one table
per family (ViT, DeiT; GPT-2, TrOCR, BERT), against the NNX parameter path that holds it, with the
transform between their layouts.
`{i}` stands for a layer index. The same table drives loading (HF -> NNX) and saving (NNX ->
HF); a parameter the table does not name is an error on load unless it is declared new
(`new_params`), and has no HF name on save (the NNX layout holds any model).

To declare a new parameter in HF's layout, add its row to TABLE; to keep it out of HF's
layout, declare it with `new_params` and save with layout="nnx".
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from nnx_caption.config import CaptionConfig


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
Row = tuple[str, str, Transform]  # (HF name, NNX path, transform)

# One table per family. Biases of multi-head projections are FLAT.
VIT: list[Row] = [
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
]
# DeiT: ViT's tensors and the distillation token.
DEIT: list[Row] = [
    *VIT,
    ("encoder.embeddings.distillation_token", "encoder.embeddings.distillation", leading_ones(2)),
]
# Encoder states -> decoder width, when they differ.
BRIDGE: list[Row] = [
    ("enc_to_dec_proj.weight", "enc_to_dec_proj.kernel", linear(1)),
    ("enc_to_dec_proj.bias", "enc_to_dec_proj.bias", IDENTITY),
]
GPT2: list[Row] = [
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
_TR = "decoder.model.decoder.layers.{i}."
_TR_ATTENTION = [  # (HF module, NNX module): self- and cross-attention alike
    (f"{hf}.{p}_proj.", f"{nnx_}.{q}.")
    for hf, nnx_ in (("self_attn", "attn"), ("encoder_attn", "cross"))
    for p, q in (("q", "q"), ("k", "k"), ("v", "v"), ("out", "o"))
]
TROCR: list[Row] = [
    ("decoder.model.decoder.embed_tokens.weight", "decoder.wte", IDENTITY),
    ("decoder.model.decoder.embed_positions.weight", "decoder.wpe", IDENTITY),  # learned only
    ("decoder.model.decoder.layernorm_embedding.weight", "decoder.ln_embedding.scale", IDENTITY),
    ("decoder.model.decoder.layernorm_embedding.bias", "decoder.ln_embedding.bias", IDENTITY),
    *[
        row
        for hf, nnx_ in _TR_ATTENTION
        for row in (
            (
                _TR + hf + "weight",
                "decoder.blocks.{i}." + nnx_ + "kernel",
                linear(2) if nnx_.endswith(".o.") else linear(1),
            ),
            (
                _TR + hf + "bias",
                "decoder.blocks.{i}." + nnx_ + "bias",
                IDENTITY if nnx_.endswith(".o.") else FLAT,
            ),
        )
    ],  # fmt: skip
    *[
        (_TR + f"{hf}.{w}", f"decoder.blocks.{{i}}.{nnx_}.{n}", IDENTITY)
        for hf, nnx_ in (
            ("self_attn_layer_norm", "ln_1"),
            ("encoder_attn_layer_norm", "ln_cross"),
            ("final_layer_norm", "ln_2"),
        )
        for w, n in (("weight", "scale"), ("bias", "bias"))
    ],
    (_TR + "fc1.weight", "decoder.blocks.{i}.mlp.fc.kernel", linear(1)),
    (_TR + "fc1.bias", "decoder.blocks.{i}.mlp.fc.bias", IDENTITY),
    (_TR + "fc2.weight", "decoder.blocks.{i}.mlp.proj.kernel", linear(1)),
    (_TR + "fc2.bias", "decoder.blocks.{i}.mlp.proj.bias", IDENTITY),
    ("decoder.output_projection.weight", "decoder.lm_head.kernel", linear(1)),  # untied only
]
_BE = "decoder.bert.encoder.layer.{i}."
BERT: list[Row] = [
    ("decoder.bert.embeddings.word_embeddings.weight", "decoder.wte", IDENTITY),
    ("decoder.bert.embeddings.position_embeddings.weight", "decoder.wpe", IDENTITY),
    ("decoder.bert.embeddings.token_type_embeddings.weight", "decoder.token_type", IDENTITY),
    ("decoder.bert.embeddings.LayerNorm.weight", "decoder.ln_embedding.scale", IDENTITY),
    ("decoder.bert.embeddings.LayerNorm.bias", "decoder.ln_embedding.bias", IDENTITY),
    *[
        row
        for hf, nnx_, ln in (("attention", "attn", "ln_1"), ("crossattention", "cross", "ln_cross"))
        for row in (
            *[
                (_BE + f"{hf}.self.{p}.{w}", f"decoder.blocks.{{i}}.{nnx_}.{q}.{n}", t)
                for p, q in (("query", "q"), ("key", "k"), ("value", "v"))
                for w, n, t in (("weight", "kernel", linear(1)), ("bias", "bias", FLAT))
            ],
            (_BE + f"{hf}.output.dense.weight", f"decoder.blocks.{{i}}.{nnx_}.o.kernel", linear(2)),
            (_BE + f"{hf}.output.dense.bias", f"decoder.blocks.{{i}}.{nnx_}.o.bias", IDENTITY),
            (_BE + f"{hf}.output.LayerNorm.weight", f"decoder.blocks.{{i}}.{ln}.scale", IDENTITY),
            (_BE + f"{hf}.output.LayerNorm.bias", f"decoder.blocks.{{i}}.{ln}.bias", IDENTITY),
        )
    ],
    (_BE + "intermediate.dense.weight", "decoder.blocks.{i}.mlp.fc.kernel", linear(1)),
    (_BE + "intermediate.dense.bias", "decoder.blocks.{i}.mlp.fc.bias", IDENTITY),
    (_BE + "output.dense.weight", "decoder.blocks.{i}.mlp.proj.kernel", linear(1)),
    (_BE + "output.dense.bias", "decoder.blocks.{i}.mlp.proj.bias", IDENTITY),
    (_BE + "output.LayerNorm.weight", "decoder.blocks.{i}.ln_2.scale", IDENTITY),
    (_BE + "output.LayerNorm.bias", "decoder.blocks.{i}.ln_2.bias", IDENTITY),
    ("decoder.cls.predictions.transform.dense.weight", "decoder.head_dense.kernel", linear(1)),
    ("decoder.cls.predictions.transform.dense.bias", "decoder.head_dense.bias", IDENTITY),
    ("decoder.cls.predictions.transform.LayerNorm.weight", "decoder.head_ln.scale", IDENTITY),
    ("decoder.cls.predictions.transform.LayerNorm.bias", "decoder.head_ln.bias", IDENTITY),
    ("decoder.cls.predictions.bias", "decoder.head_bias", IDENTITY),
    # Older exports (manga-ocr's pytorch_model.bin) also store the bias under the projection.
    ("decoder.cls.predictions.decoder.bias", "decoder.head_bias", IDENTITY),
    ("decoder.cls.predictions.decoder.weight", "decoder.lm_head.kernel", linear(1)),  # untied
]
ENCODER_TABLES = {"vit": VIT, "deit": DEIT}
DECODER_TABLES = {
    "gpt2": GPT2,
    "trocr": TROCR,
    "bert": BERT,
}  # each ends with its untied head's row
TABLE = VIT + BRIDGE + GPT2  # ViT + GPT-2, the first family pairing


def tied_head(decoder_rows: list[Row]) -> Row:
    """A tied head *is* the token embedding: its HF name maps onto wte, so a checkpoint that
    stores only the head still loads."""
    return (decoder_rows[-1][0], "decoder.wte", IDENTITY)


# Legacy buffers (old GPT-2 and BERT exports) and the encoder's unused pooler.
IGNORED = re.compile(
    r"decoder\.transformer\.h\.\d+\.(attn|crossattention)\.(bias|masked_bias)"
    r"|decoder\.bert\.embeddings\.position_ids"  # a buffer older BERT exports store
    r"|encoder\.pooler\..*"
)


def _compile(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


class WeightMap:
    """The table, compiled for one config (tied or untied head), in both directions."""

    def __init__(self, config: CaptionConfig):
        decoder = DECODER_TABLES[config.decoder.model_type]
        rows = ENCODER_TABLES[config.encoder.model_type] + BRIDGE + decoder[:-1]
        rows.append(tied_head(decoder) if config.decoder.tie_word_embeddings else decoder[-1])
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


# Composing: a single model's checkpoint keys as the captioner names them.


ENCODER_HEADS = ("pooler.", "classifier.", "cls_classifier.", "distillation_classifier.")


def encoder_name(key: str, model_type: str = "vit") -> str | None:
    """A ViTModel / DeiTModel key, or one of their image classifiers (prefixed `vit.` /
    `deit.`), -> its VisionEncoderDecoder name; poolers and classifier heads are not part of
    the captioner."""
    key = key.removeprefix(model_type + ".")
    return None if key.startswith(ENCODER_HEADS) else "encoder." + key


def decoder_name(key: str, model_type: str = "gpt2") -> str | None:
    """A decoder checkpoint's key -> its VisionEncoderDecoder name: GPT2LMHeadModel /
    GPT2Model (the original gpt2 repo has no prefix), TrOCRForCausalLM, BertLMHeadModel /
    BertForMaskedLM / BertModel (whose pooler is not part of the captioner)."""
    if model_type == "trocr":
        return "decoder." + key
    if model_type == "bert":
        if key.startswith("cls."):
            return "decoder." + key
        key = key.removeprefix("bert.")
        return None if key.startswith("pooler.") else "decoder.bert." + key
    if key == "lm_head.weight":
        return "decoder.lm_head.weight"
    return "decoder.transformer." + key.removeprefix("transformer.")
