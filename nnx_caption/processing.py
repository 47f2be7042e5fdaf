"""Image preprocessing, numerically equal to Hugging Face's: `ImageProcessor` reproduces
transformers' PIL-backend `ViTImageProcessor` and `DeiTImageProcessor` (but returns NHWC),
reading and writing the same files, without importing transformers or torch. `Tokenizer`
(tokenization.py) is importable from here too.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from nnx_caption.files import read_json, write_json
from nnx_caption.tokenization import Tokenizer

__all__ = ["ImageProcessor", "Tokenizer", "load_rgb"]

PREPROCESSOR_CONFIG = "preprocessor_config.json"

ImageInput = Image.Image | np.ndarray | str | os.PathLike | bytes


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
        if do_center_crop and crop_size is None:
            raise ValueError("do_center_crop is set without a crop_size")
        self.crop = _parse_size(crop_size) if do_center_crop else None  # (height, width)
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
        write_json(directory, PREPROCESSOR_CONFIG, self.to_dict())

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
