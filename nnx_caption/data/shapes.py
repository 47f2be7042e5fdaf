"""The synthetic "shapes" dataset of the demo (coloured circles, squares and triangles with
their captions, written as imagefolders) and `train_caption_tokenizer`, a small BPE for its
captions."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from nnx_caption.processing import Tokenizer

# Colours far apart in RGB, jittered a little per image; shapes recognisable at 32x32.
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 210),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.16, "large": 0.32}  # radius as a fraction of the image side
PAIR_RADIUS = 0.17  # two shapes, one in each half, are all of one size
SHAPES_VERSION = 1  # bump when the rendering changes, so that old folders are regenerated
SHAPES_MARKER = "shapes.json"
SUPERSAMPLE = 4  # draw larger, then average down: smooth edges
SPLITS = ("train", "validation", "test")

Spec = tuple  # ("one", size, colour, shape) | ("two", (colour, shape), (colour, shape))


def shapes_specs() -> list[Spec]:
    """Every distinct image content; each has exactly one caption."""
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    one = [("one", size, c, s) for size in SIZES for c, s in pairs]
    return one + [("two", left, right) for left in pairs for right in pairs]


def shapes_caption(spec: Spec) -> str:
    if spec[0] == "one":
        _, size, colour, shape = spec
        return f"a {size} {colour} {shape}"
    (c1, s1), (c2, s2) = spec[1], spec[2]
    return f"a {c1} {s1} on the left and a {c2} {s2} on the right"


def _random_spec(rng: np.random.Generator) -> Spec:
    def pick(options: Sequence[str]) -> str:
        return options[int(rng.integers(len(options)))]

    colours, sizes = list(COLOURS), list(SIZES)
    if rng.random() < 0.4:  # one shape: 30 captions; two shapes: 225, each seen less often
        return ("one", pick(sizes), pick(colours), pick(SHAPES))
    return ("two", (pick(colours), pick(SHAPES)), (pick(colours), pick(SHAPES)))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill):
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        h = 0.85 * r  # about a circle's area
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=fill)


def _render(spec: Spec, size: int, rng: np.random.Generator) -> Image.Image:
    """A new rendering of `spec`: background shade, colours, sizes and positions jittered."""
    big = size * SUPERSAMPLE
    background = (int(rng.integers(0, 60)),) * 3
    image = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(image)

    def colour(name: str) -> tuple[int, ...]:
        jitter = rng.integers(-15, 16, 3)
        return tuple(int(v) for v in np.clip(np.add(COLOURS[name], jitter), 0, 255))

    if spec[0] == "one":
        _, size_name, c, shape = spec
        r = SIZES[size_name] * big * rng.uniform(0.9, 1.1)
        cx, cy = rng.uniform(r + SUPERSAMPLE, big - r - SUPERSAMPLE, 2)
        _draw_shape(draw, shape, cx, cy, r, colour(c))
    else:
        for (c, shape), (low, high) in zip(spec[1:], [(0, big / 2), (big / 2, big)], strict=True):
            r = PAIR_RADIUS * big * rng.uniform(0.9, 1.1)
            cx = rng.uniform(low + r + SUPERSAMPLE, high - r - SUPERSAMPLE)
            cy = rng.uniform(r + SUPERSAMPLE, big - r - SUPERSAMPLE)
            _draw_shape(draw, shape, cx, cy, r, colour(c))
    return image.resize((size, size), Image.Resampling.BOX)


def make_shapes(
    out_dir: str,
    n_train: int = 2000,
    n_validation: int = 200,
    n_test: int = 200,
    seed: int = 0,
    image_size: int = 32,
) -> dict[str, str]:
    """Writes the shapes dataset as imagefolders out_dir/{train,validation,test} (PNG files and
    metadata.jsonl with "file_name" and "text"); returns split name -> folder.

    Deterministic: the same arguments give the same bytes, and a folder already complete for
    them is kept as it is. Otherwise those three subfolders are replaced. Every caption of
    validation and test also occurs in train (train starts with one of each, when it can).
    """
    if n_train < 1:
        raise ValueError("make_shapes needs n_train >= 1: validation and test draw from train")
    params = {
        "version": SHAPES_VERSION,
        "n_train": n_train,
        "n_validation": n_validation,
        "n_test": n_test,
        "seed": seed,
        "image_size": image_size,
    }
    folders = {name: os.path.join(out_dir, name) for name in SPLITS}
    marker = os.path.join(out_dir, SHAPES_MARKER)
    try:
        with open(marker, encoding="utf-8") as f:
            if json.load(f) == params:
                return folders
    except (OSError, ValueError):
        pass
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(marker):
        os.remove(marker)  # incomplete from here until it is written again

    in_train: set[Spec] = set()
    for index, (name, n) in enumerate(zip(SPLITS, (n_train, n_validation, n_test), strict=True)):
        rng = np.random.default_rng([seed, index])
        if name == "train":
            every = shapes_specs()
            specs = [every[i] for i in rng.permutation(len(every))][:n]
            specs += [_random_spec(rng) for _ in range(n - len(specs))]
            in_train = set(specs)
        else:
            specs = []
            while len(specs) < n:
                spec = _random_spec(rng)
                if spec in in_train:
                    specs.append(spec)
        _write_split(folders[name], specs, image_size, rng)

    with open(marker, "w", encoding="utf-8") as f:
        json.dump(params, f, indent=2)
    return folders


def _write_split(folder: str, specs: list[Spec], image_size: int, rng: np.random.Generator):
    # Built beside the target and swapped in, so a crash never leaves a half-written split.
    partial = folder + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    width = max(5, len(str(len(specs))))
    with open(os.path.join(partial, "metadata.jsonl"), "w", encoding="utf-8") as meta:
        for i, spec in enumerate(specs):
            name = f"{i:0{width}d}.png"
            _render(spec, image_size, rng).save(os.path.join(partial, name), format="PNG")
            meta.write(json.dumps({"file_name": name, "text": shapes_caption(spec)}) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)


def train_caption_tokenizer(captions: Sequence[str], out_dir: str, vocab_size: int = 128) -> None:
    """A small GPT-2-style byte-level BPE trained on the lower-cased captions (as they are
    encoded), "<|endoftext|>" its bos / eos / unk / pad token; loadable with
    `Tokenizer.from_pretrained` and transformers' `AutoTokenizer`."""
    eot = "<|endoftext|>"
    # Not GPT-2's full 256-byte alphabet, which alone would outgrow the vocabulary: only the
    # characters of the captions. Others are dropped, with no unk token, as transformers'
    # GPT2Tokenizer (which rebuilds the model without one) drops them: both encode alike.
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eot], show_progress=False)
    # Trained on the text as encode_targets writes it: the space before EOS becomes a token too.
    backend.train_from_iterator([c.lower() + " " for c in captions], trainer)
    Tokenizer(backend, bos_token=eot, eos_token=eot, unk_token=eot, pad_token=eot).save_pretrained(
        out_dir
    )
