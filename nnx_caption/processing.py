"""Image preprocessing and GPT-2 tokenization, numerically equal to Hugging Face's.

`ImageProcessor` reproduces transformers' PIL-backend `ViTImageProcessor` (but returns NHWC) and
`Tokenizer` reproduces `GPT2TokenizerFast`, both reading and writing the same files, without
importing transformers or torch.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend

from nnx_caption.files import read_json, replacing

PREPROCESSOR_CONFIG = "preprocessor_config.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"

ImageInput = Image.Image | np.ndarray | str | os.PathLike | bytes


def _write_json(directory: str | os.PathLike, name: str, data: dict[str, Any]) -> None:
    os.makedirs(directory, exist_ok=True)
    with replacing(os.path.join(directory, name), encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def _file_to_rgb(image: str | os.PathLike | bytes | bytearray) -> np.ndarray:
    """An image file's (H, W, 3) uint8 pixels; the file is closed on return."""
    if isinstance(image, (bytes, bytearray)):
        source, what = io.BytesIO(image), f"{len(image)} bytes"
    else:
        source, what = os.fspath(image), repr(os.fspath(image))
    try:
        opened = Image.open(source)
    except (OSError, ValueError) as e:  # UnidentifiedImageError is an OSError
        raise ValueError(f"cannot read image from {what}: {e}") from e
    with opened:
        return _pil_to_rgb(opened, upright=True)


def _array_to_pil(a: np.ndarray) -> Image.Image:
    if a.dtype != np.uint8:
        raise ValueError(f"numpy images must be uint8, got dtype {a.dtype}")
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)) or 0 in a.shape:
        raise ValueError(
            f"numpy images must be non-empty (H, W) or (H, W, 1|3|4), got shape {a.shape}"
        )
    # For 4 channels transformers blends onto white in float64 rather than with PIL; the two agree
    # exactly for every (value, alpha) pair, so arrays share the PIL path.
    return Image.fromarray(a)


def _pil_to_rgb(image: Image.Image, upright: bool = False) -> np.ndarray:
    """(H, W, 3) uint8. `upright`: turned as its EXIF orientation says (phone photos are stored
    sideways with a tag saying so), which transformers' load_image does to every file."""
    try:
        image.load()  # files decode lazily: make a corrupt or truncated one fail here, clearly
        if upright:
            ImageOps.exif_transpose(image, in_place=True)
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"cannot decode {image.format or ''} image {image.size}: {e}") from e
    # PIL's convert() clips wide modes at 255, which turns most of a 16-bit photo white. So:
    # 16-bit modes keep their top 8 bits (value >> 8); mode "I" (32-bit) is treated as 16-bit data,
    # as 16-bit files are often opened as "I" (older Pillow, some TIFFs); mode "F" is taken to be in
    # [0, 1], the convention transformers uses for float arrays.
    if image.mode.startswith("I;16") or image.mode == "I":
        gray = np.asarray(image).astype(np.int64)
        image = Image.fromarray((np.clip(gray, 0, 65535) >> 8).astype(np.uint8))
    elif image.mode == "F":
        image = Image.fromarray(np.round(np.clip(np.asarray(image), 0, 1) * 255).astype(np.uint8))
    # As transformers' convert_to_rgb: composite transparency onto white, else PIL's convert.
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    return np.asarray(image.convert("RGB"))


def load_rgb(image: ImageInput) -> np.ndarray:
    """Any supported input -> (H, W, 3) uint8; files (paths, bytes) upright, PIL images and
    arrays as given, as in transformers."""
    if isinstance(image, np.ndarray):
        rgb = _pil_to_rgb(_array_to_pil(image))
    elif isinstance(image, Image.Image):
        rgb = _pil_to_rgb(image)
    elif isinstance(image, (str, os.PathLike, bytes, bytearray)):
        rgb = _file_to_rgb(image)
    else:
        raise TypeError(f"expected a PIL image, numpy array, path or bytes, got {type(image)}")
    if 0 in rgb.shape:
        raise ValueError(f"image is empty: shape {rgb.shape}")
    return rgb


def _parse_size(size: int | Sequence[int] | dict[str, int]) -> tuple[int, int]:
    """(height, width) from the forms preprocessor_config.json uses."""
    if isinstance(size, int):  # legacy ViTFeatureExtractor: square
        return size, size
    if isinstance(size, dict):
        if set(size) == {"height", "width"}:
            return int(size["height"]), int(size["width"])
        raise ValueError(
            f"unsupported image size {size}: only {{'height', 'width'}} or an int is supported "
            "(aspect-preserving sizes such as 'shortest_edge' are not what ViT uses)"
        )
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return int(size[0]), int(size[1])
    raise ValueError(f"unsupported image size {size!r}")


def _per_channel(value: float | Sequence[float], name: str) -> tuple[float, float, float]:
    values = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != 3:
        raise ValueError(f"{name} must have 3 values (RGB), got {value!r}")
    return tuple(values)


_CONFIG_KEYS = (
    "image_processor_type",
    "do_resize",
    "size",
    "resample",
    "do_center_crop",
    "crop_size",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
    "do_convert_rgb",
)


class ImageProcessor:
    """ViT / DeiT preprocessing: RGB, resize, center crop (DeiT's, when configured), rescale,
    normalize. Returns float32 NHWC.

    Defaults are `ViTImageProcessor`'s. Images are always converted to RGB because the model takes
    3 channels; `do_convert_rgb` is only carried through `to_dict` for round trips.
    """

    def __init__(
        self,
        *,
        image_processor_type: str = "ViTImageProcessor",
        do_resize: bool = True,
        size: int | Sequence[int] | dict[str, int] = 224,
        resample: int = 2,  # PIL.Image.Resampling.BILINEAR
        do_center_crop: bool = False,
        crop_size: int | Sequence[int] | dict[str, int] | None = None,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: float | Sequence[float] = 0.5,
        image_std: float | Sequence[float] = 0.5,
        do_convert_rgb: bool | None = None,
    ) -> None:
        self.image_processor_type = str(image_processor_type).removesuffix("Pil")
        self.do_resize = bool(do_resize)
        self.height, self.width = _parse_size(size)
        self.resample = int(resample)
        self.do_center_crop = bool(do_center_crop)
        if self.do_center_crop and crop_size is None:
            raise ValueError("do_center_crop is set without a crop_size")
        self.crop = _parse_size(crop_size) if self.do_center_crop else None  # (height, width)
        self.do_rescale = bool(do_rescale)
        self.rescale_factor = float(rescale_factor)
        self.do_normalize = bool(do_normalize)
        self.image_mean = _per_channel(image_mean, "image_mean")
        self.image_std = _per_channel(image_std, "image_std")
        self.do_convert_rgb = do_convert_rgb

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> ImageProcessor:
        path = os.fspath(path)
        config = read_json(os.path.join(path, PREPROCESSOR_CONFIG))
        if config is None:
            raise FileNotFoundError(f"no {PREPROCESSOR_CONFIG} in directory {path!r}")
        try:
            return cls(**{k: config[k] for k in _CONFIG_KEYS if config.get(k) is not None})
        except ValueError as err:
            raise ValueError(f"{path}/{PREPROCESSOR_CONFIG}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        crop = {"do_center_crop": self.crop is not None}  # DeiT's processor crops by default
        if self.crop is not None:
            crop["crop_size"] = {"height": self.crop[0], "width": self.crop[1]}
        return {
            "image_processor_type": self.image_processor_type,
            "do_resize": self.do_resize,
            "size": {"height": self.height, "width": self.width},
            "resample": self.resample,
            **crop,
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "do_convert_rgb": self.do_convert_rgb,
        }

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        _write_json(directory, PREPROCESSOR_CONFIG, self.to_dict())

    def resize(self, rgb: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (height, width, 3) uint8; unchanged when do_resize is off."""
        if not self.do_resize:
            return rgb
        # transformers' PIL backend resizes the uint8 image with PIL itself.
        resized = Image.fromarray(rgb).resize((self.width, self.height), resample=self.resample)
        return np.asarray(resized)

    def center_crop(self, rgb: np.ndarray) -> np.ndarray:
        """(H, W, 3) -> the crop size's centre, zero-padded where the image is smaller, with
        transformers' `center_crop` arithmetic; unchanged when do_center_crop is off."""
        if self.crop is None:
            return rgb
        (h, w), (ch, cw) = rgb.shape[:2], self.crop
        top, left = (h - ch) // 2, (w - cw) // 2
        if top >= 0 and left >= 0:
            return rgb[top : top + ch, left : left + cw]
        nh, nw = max(ch, h), max(cw, w)
        padded = np.zeros((nh, nw, rgb.shape[2]), rgb.dtype)
        pad_top, pad_left = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
        padded[pad_top : pad_top + h, pad_left : pad_left + w] = rgb
        top, left = top + pad_top, left + pad_left
        return padded[max(0, top) : min(nh, top + ch), max(0, left) : min(nw, left + cw)]

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """(..., H, W, 3) uint8 or float pixels -> float32, rescaled and normalized."""
        x = pixels
        if self.do_rescale:
            # transformers multiplies in float64 and only then casts to float32.
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        x = x.astype(np.float32, copy=False)
        if self.do_normalize:
            mean = np.asarray(self.image_mean, np.float32)
            std = np.asarray(self.image_std, np.float32)
            x = (x - mean) / std  # in float32, as transformers does
        return x

    def preprocess_one(self, image: ImageInput) -> np.ndarray:
        """One image -> (H, W, 3) float32."""
        return self.normalize(self.center_crop(self.resize(load_rgb(image))))

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> np.ndarray:
        """A PIL image, uint8 array ((H, W) or (H, W, C)), path, bytes, or list -> (B, H, W, 3)."""
        batch = list(images) if isinstance(images, (list, tuple)) else [images]
        if not batch:
            raise ValueError("no images given")
        out = [self.preprocess_one(image) for image in batch]
        if len({x.shape for x in out}) > 1:
            raise ValueError("images differ in size and do_resize is False: cannot stack a batch")
        return np.stack(out)


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------

_GPT2_SPECIAL = "<|endoftext|>"  # GPT2Tokenizer's default bos/eos/unk token
_NAMED_SPECIALS = {
    "bos_token": _GPT2_SPECIAL,
    "eos_token": _GPT2_SPECIAL,
    "unk_token": _GPT2_SPECIAL,
    "pad_token": None,
}
_ADDED_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")


def _token_content(value: Any) -> str | None:
    """A special token from a config: a string, an AddedToken dict, or None."""
    return value.get("content") if isinstance(value, dict) else value


def _as_added_token(value: Any, special: bool) -> AddedToken:
    if isinstance(value, dict):
        flags = {k: value[k] for k in _ADDED_TOKEN_FLAGS if k in value}
        flags.setdefault("special", special)
        return AddedToken(value["content"], **flags)
    return AddedToken(value, special=special, normalized=not special)


def _id_list(ids: Any) -> list[int]:
    ids = np.asarray(ids).tolist()  # numpy, jax arrays and lists alike
    return [ids] if isinstance(ids, int) else ids


def _load_backend(path: str, add_prefix_space: bool) -> _Backend:
    tokenizer_file = os.path.join(path, TOKENIZER_FILE)
    vocab, merges = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
    has_bpe_files = os.path.isfile(vocab) and os.path.isfile(merges)
    if not os.path.isfile(tokenizer_file) and not has_bpe_files:
        raise FileNotFoundError(
            f"no tokenizer in directory {path!r}: looked for {TOKENIZER_FILE}, "
            "or vocab.json + merges.txt"
        )
    try:
        if os.path.isfile(tokenizer_file):
            return _Backend.from_file(tokenizer_file)
        # Built as GPT2TokenizerFast builds it from these two files.
        bpe = models.BPE.from_file(
            vocab, merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False
        )
    except Exception as e:  # tokenizers raises plain Exceptions on malformed files
        raise ValueError(f"cannot load the tokenizer in {path!r}: {e}") from e
    backend = _Backend(bpe)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    backend.decoder = decoders.ByteLevel()
    return backend


class Tokenizer:
    """GPT-2 byte-level BPE tokenizer with `GPT2TokenizerFast`'s behaviour and files."""

    def __init__(
        self,
        backend: _Backend,
        *,
        bos_token: str | None = _GPT2_SPECIAL,
        eos_token: str | None = _GPT2_SPECIAL,
        unk_token: str | None = _GPT2_SPECIAL,
        pad_token: str | None = None,
        clean_up_tokenization_spaces: bool = False,
        model_max_length: int | None = None,
    ) -> None:
        self.backend = backend
        self.bos_token, self.eos_token = bos_token, eos_token
        self.unk_token, self.pad_token = unk_token, pad_token
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.model_max_length = model_max_length

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Tokenizer:
        path = os.fspath(path)
        config = read_json(os.path.join(path, TOKENIZER_CONFIG)) or {}
        if "added_tokens_decoder" not in config:
            # Legacy special_tokens_map.json overrides the config, as in transformers.
            config.update(read_json(os.path.join(path, SPECIAL_TOKENS_MAP)) or {})

        backend = _load_backend(path, bool(config.get("add_prefix_space", False)))

        # Tokens the config adds, then the named and extra special tokens, skipping those the
        # backend already has (as transformers does).
        specials = {k: _token_content(config.get(k, d)) for k, d in _NAMED_SPECIALS.items()}
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        extra = list(extra.values()) if isinstance(extra, dict) else list(extra)
        added = sorted(config.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0]))
        to_add = [_as_added_token(t, special=False) for _, t in added]
        named = [config.get(k, d) for k, d in _NAMED_SPECIALS.items()]
        to_add += [_as_added_token(t, special=True) for t in [*named, *extra] if t]
        for token in to_add:
            if token.content not in {
                t.content for t in backend.get_added_tokens_decoder().values()
            }:
                backend.add_tokens([token])

        # From vocab.json + merges.txt, transformers honours add_bos/eos_token in the config; with a
        # tokenizer.json it ignores them and the file's post-processor decides.
        if not os.path.isfile(os.path.join(path, TOKENIZER_FILE)):
            bos = specials["bos_token"] if config.get("add_bos_token") else None
            eos = specials["eos_token"] if config.get("add_eos_token") else None
            if bos or eos:

                def template(seq: str, type_id: int) -> str:
                    return " ".join(f"{t}:{type_id}" for t in (bos, seq, eos) if t)

                backend.post_processor = processors.TemplateProcessing(
                    single=template("$A", 0),
                    pair=template("$A", 0) + " " + template("$B", 1),
                    special_tokens=[(t, backend.token_to_id(t)) for t in {bos, eos} if t],
                )

        # transformers 5 skips this cleanup for BPE models, as it corrupts their output.
        clean_up = bool(config.get("clean_up_tokenization_spaces", False)) and (
            not isinstance(backend.model, models.BPE)
            or config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")
        )
        return cls(
            backend,
            **specials,
            clean_up_tokenization_spaces=clean_up,
            model_max_length=config.get("model_max_length"),
        )

    # -- ids -----------------------------------------------------------------------------------

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the embedding table's minimum size)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    # -- encoding --------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text).ids

    def __call__(
        self,
        texts: str | Sequence[str],
        max_length: int | None = None,
        padding: bool | str = False,
        truncation: bool = False,
    ) -> dict[str, Any]:
        """Encode a text or batch. Padded results are int32 arrays, else lists.

        Padding is on the right with `pad_token_id`, or `eos_token_id` when there is no pad
        token (GPT-2 has none); `attention_mask` marks the real tokens.
        """
        single = isinstance(texts, str)
        batch = [texts] if single else list(texts)
        if truncation and max_length is None:
            max_length = self.model_max_length
            if max_length is None:
                raise ValueError("truncation=True needs max_length")
        encodings = self.backend.encode_batch(batch, add_special_tokens=False)
        ids = []
        for enc in encodings:
            if truncation:  # keep room for tokens the post-processor adds, as transformers does
                enc.truncate(max_length - self.backend.num_special_tokens_to_add(False))
            ids.append(self.backend.post_process(enc).ids)

        if padding is True:
            padding = "longest"
        if padding in (False, None, "do_not_pad"):
            out: dict[str, Any] = {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]}
        else:
            if padding == "longest":
                length = max((len(x) for x in ids), default=0)
            elif padding == "max_length":
                if max_length is None:
                    raise ValueError('padding="max_length" needs max_length')
                length = max_length
            else:
                raise ValueError(
                    f'padding must be False, True, "longest" or "max_length": {padding!r}'
                )
            if any(len(x) > length for x in ids):
                raise ValueError(f"a text is longer than max_length={length}; pass truncation=True")
            pad_id = self.pad_token_id if self.pad_token_id is not None else self.eos_token_id
            input_ids = np.full((len(ids), length), pad_id or 0, np.int32)
            mask = np.zeros((len(ids), length), np.int32)
            for row, x in enumerate(ids):
                input_ids[row, : len(x)] = x
                mask[row, : len(x)] = 1
            out = {"input_ids": input_ids, "attention_mask": mask}
        return {k: v[0] for k, v in out.items()} if single else out

    # -- decoding --------------------------------------------------------------------------------

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        text = self.backend.decode(_id_list(ids), skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces:  # transformers' clean_up_tokenization
            for before, after in [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'")]:
                text = text.replace(before, after)
            for suffix in ("n't", "'m", "'s", "'ve", "'re"):
                text = text.replace(" " + suffix, suffix)
        return text

    def batch_decode(self, ids: Any, skip_special_tokens: bool = False) -> list[str]:
        rows = ids.tolist() if hasattr(ids, "tolist") else ids
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in rows]

    # -- saving ----------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.json + tokenizer_config.json, as GPT2TokenizerFast loads them."""
        os.makedirs(directory, exist_ok=True)
        with replacing(os.path.join(directory, TOKENIZER_FILE), encoding="utf-8") as f:
            f.write(self.backend.to_str(pretty=True))
        config = {
            "tokenizer_class": "GPT2Tokenizer",
            "add_prefix_space": bool(
                getattr(self.backend.pre_tokenizer, "add_prefix_space", False)
            ),
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "unk_token": self.unk_token,
            "pad_token": self.pad_token,
            "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
        }
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        _write_json(directory, TOKENIZER_CONFIG, config)
