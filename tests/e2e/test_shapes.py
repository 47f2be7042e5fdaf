"""The synthetic shapes dataset and its tokenizer; targets encoded as transformers encodes them."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from nnx_caption import data
from nnx_caption.processing import Tokenizer

SPLITS = ("train", "validation", "test")


def _captions(folder: str) -> list[str]:
    with open(os.path.join(folder, "metadata.jsonl"), encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, str]:
    return data.make_shapes(str(tmp_path_factory.mktemp("shapes")))  # the demo's defaults


@pytest.fixture(scope="module")
def tokenizer_dir(shapes, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tokenizer"))
    data.train_caption_tokenizer(_captions(shapes["train"]), path)
    return path


def test_make_shapes_is_deterministic_and_skips_a_complete_folder(tmp_path):
    sizes = dict(n_train=60, n_validation=10, n_test=10)
    first = data.make_shapes(str(tmp_path / "a"), **sizes)
    data.make_shapes(str(tmp_path / "b"), **sizes)
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    assert first == {name: str(tmp_path / "a" / name) for name in SPLITS}

    marker = tmp_path / "a" / data.SHAPES_MARKER
    stamp = os.stat(marker).st_mtime_ns
    data.make_shapes(str(tmp_path / "a"), **sizes)
    assert os.stat(marker).st_mtime_ns == stamp  # complete for these arguments: kept as is

    data.make_shapes(str(tmp_path / "a"), **sizes, seed=1)  # other arguments: replaced
    assert len(os.listdir(tmp_path / "a" / "train")) == 61
    assert _digests(tmp_path / "a") != _digests(tmp_path / "b")


def test_shapes_splits_load_and_every_held_out_caption_is_in_train(shapes):
    splits = {
        name: data.load_split(folder, caption_column="text") for name, folder in shapes.items()
    }
    assert {name: len(s.examples) for name, s in splits.items()} == {
        "train": 2000,
        "validation": 200,
        "test": 200,
    }
    assert all(s.skipped == [] for s in splits.values())
    grammar = {data.shapes_caption(spec) for spec in data.shapes_specs()}
    train = {e.caption for e in splits["train"].examples}
    assert len(grammar) == 255 and train == grammar  # each caption at least once
    for name in ("validation", "test"):
        assert {e.caption for e in splits[name].examples} <= train
    # held-out images are new renderings, not copies of training images
    seen = {Path(e.image).read_bytes() for e in splits["train"].examples}
    assert not any(Path(e.image).read_bytes() in seen for e in splits["test"].examples)


def test_caption_tokenizer_round_trips_and_loads_in_transformers(shapes, tokenizer_dir):
    from transformers import AutoTokenizer

    tok = Tokenizer.from_pretrained(tokenizer_dir)
    reference = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert tok.vocab_size <= 128
    assert tok.eos_token == tok.pad_token == reference.eos_token == "<|endoftext|>"
    for caption in sorted(set(_captions(shapes["train"]))):
        text = caption.lower() + " " + tok.eos_token
        ids = tok.encode(text)
        assert tok.decode(ids) == text and ids[-1] == tok.eos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == caption.lower() + " "
        assert reference(text)["input_ids"] == ids


def _hf_targets(path, captions, max_length, start, pad):
    """run_image_captioning_flax.py's tokenization_fn, with transformers' own pieces."""
    import torch
    from transformers import GPT2TokenizerFast
    from transformers.models.vision_encoder_decoder.modeling_vision_encoder_decoder import (
        shift_tokens_right,
    )

    tokenizer = GPT2TokenizerFast.from_pretrained(path)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad)
    targets = [caption.lower() + " " + tokenizer.eos_token for caption in captions]
    labels = tokenizer(
        text_target=targets,
        max_length=max_length,
        padding="max_length",
        truncation=True,
        return_tensors="np",
    )
    shifted = shift_tokens_right(torch.from_numpy(labels["input_ids"]), pad, start).numpy()
    return {
        "labels": labels["input_ids"],
        "decoder_input_ids": shifted,
        "decoder_attention_mask": labels["attention_mask"],
    }


@pytest.mark.parametrize("which", ["shapes", "tiny"])
def test_encode_targets_equals_transformers(which, shapes, tokenizer_dir, tiny_dir):
    captions = ["A Large RED circle", "a green square on the left and a blue circle on the right"]
    captions += ["  spaced  out ", "Émoji 🍰 and 日本語", "a dog " * 40, "x"]
    path = tokenizer_dir if which == "shapes" else str(tiny_dir)
    tok = Tokenizer.from_pretrained(path)
    start = tok.eos_token_id if which == "shapes" else 7  # a start token unlike the pad
    for length in (6, 16):
        ours = data.encode_targets(tok, captions, length, start, tok.eos_token_id)
        theirs = _hf_targets(path, captions, length, start, tok.eos_token_id)
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert ours[key].dtype == np.int32
            np.testing.assert_array_equal(ours[key], theirs[key], err_msg=f"{key} at {length}")
