"""ImageProcessor and Tokenizer without reference libraries: errors and self-consistency."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from nnx_caption.processing import ImageProcessor, Tokenizer

EOT = "<|endoftext|>"
TEXTS = ["", "A dog runs.", "  two  spaces\nnew line", "émoji 🍰 日本語", f"x{EOT}y"]


def _png_bytes(height=20, width=30):
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(["a dog runs on the grass", "a cat sleeps"] * 5, trainer)
    path = tmp_path_factory.mktemp("tok")
    backend.model.save(str(path))  # vocab.json + merges.txt: GPT-2 defaults apply
    return path


# -- errors ------------------------------------------------------------------------------------


def test_missing_tokenizer_files_name_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        Tokenizer.from_pretrained(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    assert "tokenizer.json" in message and "vocab.json" in message and "merges.txt" in message


def test_missing_merges_is_reported(tokenizer_dir, tmp_path):
    (tmp_path / "vocab.json").write_bytes((tokenizer_dir / "vocab.json").read_bytes())
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        Tokenizer.from_pretrained(tmp_path)


def test_corrupt_tokenizer_json_is_a_value_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(ValueError, match=str(tmp_path)):
        Tokenizer.from_pretrained(tmp_path)


def test_missing_preprocessor_config_names_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        ImageProcessor.from_pretrained(tmp_path)
    assert str(tmp_path) in str(info.value) and "preprocessor_config.json" in str(info.value)


@pytest.mark.parametrize(
    "config, match",
    [
        ({"size": {"shortest_edge": 224}}, "shortest_edge"),
        ({"do_center_crop": True}, "crop_size"),
        ({"image_mean": [0.5, 0.5]}, "image_mean"),
    ],
)
def test_unsupported_preprocessor_config(tmp_path, config, match):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        ImageProcessor.from_pretrained(tmp_path)


def test_malformed_preprocessor_config(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="preprocessor_config.json"):
        ImageProcessor.from_pretrained(tmp_path)


def test_corrupt_image_bytes_give_a_clear_error():
    with pytest.raises(ValueError, match="cannot read image"):
        ImageProcessor()(b"definitely not an image")


def test_truncated_image_gives_a_clear_error(tmp_path):
    truncated = _png_bytes(64, 64)[:200]  # header intact, pixel data cut off
    with pytest.raises(ValueError, match="cannot decode"):
        ImageProcessor()(Image.open(io.BytesIO(truncated)))
    path = tmp_path / "broken.png"
    path.write_bytes(truncated)
    with pytest.raises(ValueError, match="cannot decode"):
        ImageProcessor()(str(path))


def test_missing_image_path_gives_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="nope.png"):
        ImageProcessor()(tmp_path / "nope.png")


@pytest.mark.parametrize(
    "array, match",
    [
        (np.zeros((4, 4, 3), np.float32), "uint8"),
        (np.zeros((4, 4, 2), np.uint8), "shape"),
        (np.zeros((2, 4, 4, 3), np.uint8), "shape"),
        (np.zeros((0, 4, 3), np.uint8), "non-empty"),
    ],
)
def test_bad_arrays_are_value_errors(array, match):
    with pytest.raises(ValueError, match=match):
        ImageProcessor()(array)


def test_unbatchable_sizes_without_resize():
    images = [np.zeros((4, 4, 3), np.uint8), np.zeros((5, 4, 3), np.uint8)]
    with pytest.raises(ValueError, match="do_resize"):
        ImageProcessor(do_resize=False)(images)


def test_padding_to_max_length_needs_truncation_for_long_texts(tokenizer_dir):
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    with pytest.raises(ValueError, match="truncation"):
        tok(["a dog runs on the grass again and again"], padding="max_length", max_length=2)


# -- self-consistency ----------------------------------------------------------------------------


def test_package_imports_neither_torch_nor_transformers():
    code = (
        "import sys, nnx_caption.processing; "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_image_output_layout_and_values():
    proc = ImageProcessor(size={"height": 8, "width": 12})
    white = Image.new("RGB", (40, 30), (255, 255, 255))
    clear = Image.new("RGBA", (5, 5), (0, 0, 0, 0))  # fully transparent: composited onto white
    out = proc([white, clear, np.zeros((3, 3), np.uint8)])
    assert out.shape == (3, 8, 12, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out[0], 1.0)
    np.testing.assert_array_equal(out[1], 1.0)
    np.testing.assert_array_equal(out[2], -1.0)


def test_batch_equals_single_images():
    proc = ImageProcessor(size=16)
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (h, w, 3), np.uint8) for h, w in [(5, 9), (40, 20), (16, 16)]]
    np.testing.assert_array_equal(proc(images), np.concatenate([proc(im) for im in images]))


def test_inputs_of_every_kind_agree(tmp_path):
    data = _png_bytes()
    (tmp_path / "a.png").write_bytes(data)
    pil = Image.open(io.BytesIO(data))
    proc = ImageProcessor()
    expected = proc(np.asarray(pil.convert("RGB")))
    for image in (pil, data, str(tmp_path / "a.png"), tmp_path / "a.png"):
        np.testing.assert_array_equal(proc(image), expected)


def test_image_processor_round_trip(tmp_path):
    proc = ImageProcessor(size=(32, 48), resample=3, image_mean=[0.1, 0.2, 0.3], image_std=0.25)
    proc.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "ViTImageProcessor"
    assert ImageProcessor.from_pretrained(tmp_path).to_dict() == proc.to_dict()


def test_tokenizer_is_lossless_and_defaults_to_gpt2_specials(tokenizer_dir):
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    assert tok.bos_token_id == tok.eos_token_id == tok.backend.token_to_id(EOT)
    assert tok.pad_token_id is None
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(f"x{EOT}y"), skip_special_tokens=True) == "xy"


def test_tokenizer_padding_and_batch_decode(tokenizer_dir):
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    batch = tok(TEXTS, padding="longest")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.dtype == mask.dtype == np.int32
    assert mask.sum(axis=1).tolist() == [len(tok.encode(t)) for t in TEXTS]
    assert np.all(ids[mask == 0] == tok.eos_token_id)  # no pad token: padded with eos
    decoded = tok.batch_decode([row[m == 1] for row, m in zip(ids, mask, strict=True)])
    assert decoded == TEXTS
    unpadded = tok(TEXTS)
    assert unpadded["input_ids"] == [tok.encode(t) for t in TEXTS]
    cut = tok(TEXTS, max_length=3, truncation=True, padding="max_length")["input_ids"]
    assert cut.shape == (len(TEXTS), 3)


def test_tokenizer_round_trip(tokenizer_dir, tmp_path):
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    tok.save_pretrained(tmp_path)
    again = Tokenizer.from_pretrained(tmp_path)
    assert again.vocab_size == tok.vocab_size
    assert [again.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "GPT2Tokenizer" and config["eos_token"] == EOT


def test_a_sentencepiece_tokenizer_without_the_package_says_how_to_get_it(tmp_path, monkeypatch):
    """XLM-R's sentencepiece.bpe.model needs the optional sentencepiece package to be read
    (the accelerator image lacks it): its absence is a clear error, not an ImportError."""
    import sys

    (tmp_path / "sentencepiece.bpe.model").write_bytes(b"\x0a\x00")
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "XLMRobertaTokenizer"}')
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # as if not installed
    with pytest.raises(ValueError, match=r"nnx-caption\[sentencepiece\]") as err:
        Tokenizer.from_pretrained(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_a_tokenizer_class_without_a_builder_or_tokenizer_json_is_named(tmp_path):
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "BertJapaneseTokenizer"}')
    with pytest.raises(ValueError, match="BertJapaneseTokenizer"):
        Tokenizer.from_pretrained(tmp_path)
