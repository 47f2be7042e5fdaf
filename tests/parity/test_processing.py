"""ImageProcessor and Tokenizer against transformers' ViT image processor (PIL backend) and
GPT2TokenizerFast, on tokenizers trained here and images made here."""

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoImageProcessor, AutoTokenizer, GPT2TokenizerFast
from transformers.image_utils import load_image
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

from nnx_caption.processing import ImageProcessor, Tokenizer

ATOL = 1e-5

# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------

SIZES = [(17, 31), (224, 224), (480, 640), (1, 1)]  # (height, width)

CONFIGS = [
    {},  # ViTImageProcessor defaults
    {
        "size": {"height": 32, "width": 48},
        "resample": 3,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
    },
    {"size": {"height": 64, "width": 64}, "resample": 0},
    {"size": {"height": 40, "width": 24}, "resample": 1},
    {"size": {"height": 30, "width": 30}, "resample": 4, "rescale_factor": 1 / 127.5},
    {"size": {"height": 30, "width": 50}, "resample": 5, "do_normalize": False},
    {"size": {"height": 16, "width": 16}, "do_rescale": False, "image_mean": 100, "image_std": 60},
]


def _pixels(height, width, channels, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), np.uint8)


def make_image(mode, height, width, seed=0):
    """A random image in `mode`, and the image transformers should get for it."""
    rng = np.random.default_rng(seed)
    rgba = Image.fromarray(_pixels(height, width, 4, seed), "RGBA")
    if mode == "I;16":
        data = rng.integers(0, 65536, (height, width), np.uint16)
        # Our documented rule: 16-bit keeps its top 8 bits (PIL's convert would clip at 255).
        return Image.fromarray(data), Image.fromarray((data >> 8).astype(np.uint8))
    if mode == "I":
        data = rng.integers(-1000, 70000, (height, width)).astype(np.int32)
        return Image.fromarray(data), Image.fromarray(
            (np.clip(data, 0, 65535) >> 8).astype(np.uint8)
        )
    if mode == "F":
        data = rng.uniform(-0.2, 1.2, (height, width)).astype(np.float32)
        gray = np.round(np.clip(data, 0, 1) * 255).astype(np.uint8)
        return Image.fromarray(data), Image.fromarray(gray)
    if mode == "P+transparency":
        image = rgba.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        image.info["transparency"] = 3
        return image, image
    image = rgba if mode == "RGBA" else rgba.convert(mode)
    return image, image


def reference(config, images, **kwargs):
    out = ViTImageProcessorPil(**config)(images, return_tensors="np", **kwargs)["pixel_values"]
    return np.asarray(out).transpose(0, 2, 3, 1)  # NCHW -> NHWC


def assert_close(ours, ref):
    assert ours.dtype == np.float32
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=0, atol=ATOL)


def test_image_processor_class_is_the_pil_backend():
    assert ViTImageProcessorPil().backend == "pil"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(map(str, c)) or "default")
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_rgb_images_match(config, size):
    image = Image.fromarray(_pixels(*size, 3), "RGB")
    assert_close(ImageProcessor(**config)(image), reference(config, image))


MODES = ["RGB", "L", "LA", "P", "PA", "P+transparency", "RGBA", "CMYK", "1", "I;16", "I", "F"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_image_modes_match(mode, size):
    ours_in, ref_in = make_image(mode, *size, seed=1)
    config = CONFIGS[1]
    assert_close(ImageProcessor(**config)(ours_in), reference(config, ref_in, do_convert_rgb=True))


def test_sixteen_bit_rule_differs_from_pil_clipping():
    """The documented choice: a mid-grey 16-bit image stays mid-grey (PIL would make it white)."""
    image = Image.fromarray(np.full((4, 4), 32768, np.uint16))
    out = ImageProcessor(do_resize=False, do_rescale=False, do_normalize=False)(image)
    assert np.all(out == 128)


@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_numpy_inputs_match(channels, size):
    array = _pixels(*size, channels, seed=2)
    ref = reference({}, array, do_convert_rgb=True, input_data_format="channels_last")
    assert_close(ImageProcessor()(array), ref)


def test_numpy_alpha_blend_matches_for_every_value_and_alpha():
    # transformers blends 4-channel arrays in float64, not with PIL: check all 256 x 256 pairs.
    value, alpha = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    array = np.stack([value, 255 - value, value, alpha], axis=-1).astype(np.uint8)
    config = {"do_resize": False, "do_normalize": False}
    ref = reference(config, array, do_convert_rgb=True, input_data_format="channels_last")
    assert_close(ImageProcessor(**config)(array), ref)


def test_numpy_grayscale_2d_matches_pil_l():
    # transformers refuses 2-D arrays, so compare with the same pixels as a mode-L image.
    gray = _pixels(17, 31, 1, seed=3)[..., 0]
    ref = reference({}, Image.fromarray(gray, "L"), do_convert_rgb=True)
    assert_close(ImageProcessor()(gray), ref)


def test_batch_of_mixed_inputs_matches():
    images = [
        Image.fromarray(_pixels(17, 31, 3, seed=4)),
        _pixels(480, 640, 3, seed=5),
        make_image("RGBA", 224, 224, seed=6)[0],
    ]
    config = CONFIGS[1]
    ref = np.concatenate(
        [
            reference(config, im, do_convert_rgb=True, input_data_format="channels_last")
            for im in images
        ]
    )
    assert_close(ImageProcessor(**config)(images), ref)


def test_encoded_image_bytes_match():
    buffer = io.BytesIO()
    Image.fromarray(_pixels(33, 20, 3, seed=7)).save(buffer, format="PNG")
    ref = reference({}, Image.open(io.BytesIO(buffer.getvalue())))
    assert_close(ImageProcessor()(buffer.getvalue()), ref)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_to_files_as_load_image_does(orientation, tmp_path):
    """A phone photo: stored sideways (40 x 24), with an EXIF tag saying how to turn it. Files
    (paths, bytes) are turned upright as transformers' load_image turns them; a PIL image
    passed in is used as given, as ViTImageProcessorPil uses it."""
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    path = tmp_path / "photo.jpg"
    Image.fromarray(_pixels(24, 40, 3, seed=orientation)).save(path, quality=95, exif=exif)
    config = {"size": {"height": 30, "width": 20}}
    upright = reference(config, load_image(str(path)))
    assert_close(ImageProcessor(**config)(str(path)), upright)
    assert_close(ImageProcessor(**config)(path.read_bytes()), upright)
    with Image.open(path) as stored:
        assert_close(ImageProcessor(**config)(stored), reference(config, stored))
        if orientation >= 5:  # a quarter turn: upright is 24 wide, 40 tall
            assert load_image(str(path)).size == (24, 40) and stored.size == (40, 24)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(map(str, c)) or "default")
def test_image_processor_round_trips_through_transformers(config, tmp_path):
    ours = ImageProcessor(**config)
    ours.save_pretrained(tmp_path)
    image = Image.fromarray(_pixels(17, 31, 3, seed=8))
    for loaded in (
        ViTImageProcessorPil.from_pretrained(tmp_path),
        AutoImageProcessor.from_pretrained(tmp_path, backend="pil"),
    ):
        assert loaded.backend == "pil"
        ref = np.asarray(loaded(image, return_tensors="np")["pixel_values"]).transpose(0, 2, 3, 1)
        assert_close(ours(image), ref)
    assert_close(ImageProcessor.from_pretrained(tmp_path)(image), ours(image))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(map(str, c)) or "default")
def test_reads_transformers_saved_config(config, tmp_path):
    ViTImageProcessorPil(**config).save_pretrained(tmp_path)
    image = Image.fromarray(_pixels(50, 20, 3, seed=9))
    assert_close(ImageProcessor.from_pretrained(tmp_path)(image), reference(config, image))


# DeiT's processor: bicubic resize, then a center crop (zero-padded where the image is smaller).
DEIT_CONFIGS = [
    {},  # DeiTImageProcessor's defaults: 256 -> crop 224
    {"size": {"height": 40, "width": 33}, "crop_size": {"height": 32, "width": 31}},
    {"size": {"height": 20, "width": 25}, "crop_size": {"height": 24, "width": 30}},  # pads
    {"size": {"height": 384, "width": 384}, "do_center_crop": False, "resample": 3},  # trocr
    {"do_resize": False, "crop_size": {"height": 9, "width": 40}},
]


@pytest.mark.parametrize("config", DEIT_CONFIGS, ids=lambda c: ",".join(map(str, c)) or "default")
def test_deit_processor_matches_transformers(config, tmp_path):
    from transformers.models.deit.image_processing_pil_deit import DeiTImageProcessorPil

    DeiTImageProcessorPil(**config).save_pretrained(tmp_path)
    ours = ImageProcessor.from_pretrained(tmp_path)
    for size in ((17, 31), (300, 260)):
        image = Image.fromarray(_pixels(*size, 3, seed=10))
        ref = DeiTImageProcessorPil(**config)(image, return_tensors="np")["pixel_values"]
        assert_close(ours(image), np.asarray(ref).transpose(0, 2, 3, 1))
    ours.save_pretrained(tmp_path / "again")  # and back: transformers reads what we write
    loaded = AutoImageProcessor.from_pretrained(tmp_path / "again", backend="pil")
    assert type(loaded).__name__ == "DeiTImageProcessorPil"
    image = Image.fromarray(_pixels(50, 70, 3, seed=11))
    ref = np.asarray(loaded(image, return_tensors="np")["pixel_values"]).transpose(0, 2, 3, 1)
    assert_close(ours(image), ref)


def test_reads_legacy_feature_extractor_config(tmp_path):
    legacy = {
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "ViTFeatureExtractor",
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "resample": 2,
        "size": 96,
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(legacy))
    image = Image.fromarray(_pixels(40, 70, 3, seed=10))
    ref = ViTImageProcessorPil.from_pretrained(tmp_path)(image, return_tensors="np")["pixel_values"]
    ours = ImageProcessor.from_pretrained(tmp_path)(image)
    assert ours.shape == (1, 96, 96, 3)
    assert_close(ours, np.asarray(ref).transpose(0, 2, 3, 1))


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

EOT = "<|endoftext|>"

CORPUS = [
    "A man riding a horse on a beach.",
    "Two dogs are playing in the snow!",
    "a cat sitting on a couch with a remote control",
    "Café, crème brûlée and naïve façades: über-cool.",
    "日本語のテキストと絵文字 🍰🐈‍⬛",
    "numbers 1234 and   spaces\nand new lines\tand tabs",
    "He said: \"it's fine, isn't it?\" (yes)",
]

TEXTS = [
    "",
    " ",
    "A man riding a horse.",
    " leading space",
    "trailing space ",
    "multiple    spaces   inside",
    "new\nline\n\nand\r\nwindows",
    "\ttabs\tand spaces ",
    "Café crème brûlée über naïve",
    "emoji 🍰🐈‍⬛👍🏽 and 日本語 and ζ Ω ∑ 中文",
    "punctuation!?.,;:'\"()[]{}<>@#$%^&*-_=+/\\|~`",
    "don't can't it's we're I'm they've . , ! ?",
    f"a{EOT}b",
    f"{EOT} starts and ends {EOT}",
    f"{EOT}{EOT}",
    "unseen: qwxz ƒ Ʃ ﬁ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "<|endoftext",
]


def _train_backend():
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS * 10, trainer)
    return backend


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    """Tokenizer directories in the layouts GPT-2 checkpoints come in."""
    root = tmp_path_factory.mktemp("tokenizers")
    backend = _train_backend()
    specials = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    dirs = {}

    hf = GPT2TokenizerFast(tokenizer_object=backend, **specials)
    hf.save_pretrained(root / "full")
    dirs["full"] = root / "full"

    # vocab.json + merges.txt only, as old GPT-2 checkpoints (+ a config naming the tokens).
    vm = root / "vocab_merges"
    vm.mkdir()
    backend.model.save(str(vm))
    (vm / "tokenizer_config.json").write_text(json.dumps(specials))
    dirs["vocab_merges"] = vm

    # vocab.json + merges.txt and nothing else: GPT-2's default special tokens apply.
    bare = root / "bare"
    shutil.copytree(vm, bare)
    (bare / "tokenizer_config.json").unlink()
    dirs["bare"] = bare

    # A pad token, an extra special token and a plain added token.
    extra = GPT2TokenizerFast(tokenizer_object=backend, **specials)
    extra.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": ["<img>"]})
    extra.add_tokens(["horse riding"])
    extra.save_pretrained(root / "extra")
    dirs["extra"] = root / "extra"

    # Legacy (transformers 4) layout: special_tokens_map.json and AddedToken dicts.
    legacy = root / "legacy"
    shutil.copytree(vm, legacy)
    (legacy / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": 1024, "tokenizer_class": "GPT2Tokenizer"})
    )
    eot = {
        "content": EOT,
        "lstrip": False,
        "rstrip": False,
        "normalized": True,
        "single_word": False,
    }
    special_map = {"bos_token": eot, "eos_token": eot, "unk_token": eot, "pad_token": "<pad>"}
    (legacy / "special_tokens_map.json").write_text(json.dumps(special_map))
    dirs["legacy"] = legacy

    # add_bos_token / add_eos_token in the config: transformers honours them with vocab.json +
    # merges.txt, and ignores them next to a tokenizer.json (whose post-processor decides).
    for name, source in (("bos_eos_vm", vm), ("bos_eos_full", root / "full")):
        shutil.copytree(source, root / name)
        config = json.loads((root / name / "tokenizer_config.json").read_text())
        config.update(add_bos_token=True, add_eos_token=True)
        (root / name / "tokenizer_config.json").write_text(json.dumps(config))
        dirs[name] = root / name
    return dirs


LAYOUTS = ["full", "vocab_merges", "bare", "extra", "legacy", "bos_eos_vm", "bos_eos_full"]


def _pair(tokenizer_dirs, layout):
    path = tokenizer_dirs[layout]
    return Tokenizer.from_pretrained(path), GPT2TokenizerFast.from_pretrained(path)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tokenizer_properties_match(tokenizer_dirs, layout):
    ours, ref = _pair(tokenizer_dirs, layout)
    assert ours.vocab_size == len(ref)
    assert ours.bos_token_id == ref.bos_token_id
    assert ours.eos_token_id == ref.eos_token_id
    assert ours.pad_token_id == ref.pad_token_id


@pytest.mark.parametrize("layout", LAYOUTS)
def test_encode_and_decode_match(tokenizer_dirs, layout):
    ours, ref = _pair(tokenizer_dirs, layout)
    texts = [*TEXTS, "<pad> <img> horse riding <img>"]
    for text in texts:
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(
                ids, skip_special_tokens=skip
            ), (text, skip)


def test_bos_eos_config_is_applied_only_without_tokenizer_json(tokenizer_dirs):
    with_json = Tokenizer.from_pretrained(tokenizer_dirs["bos_eos_full"])
    without = Tokenizer.from_pretrained(tokenizer_dirs["bos_eos_vm"])
    eot = with_json.eos_token_id
    assert without.encode("a") == [eot, *with_json.encode("a"), eot]


def test_special_token_inside_text_is_one_id(tokenizer_dirs):
    ours = Tokenizer.from_pretrained(tokenizer_dirs["full"])
    assert ours.encode(f"a{EOT}b").count(ours.eos_token_id) == 1
    assert ours.decode(ours.encode(f"a{EOT}b"), skip_special_tokens=True) == "ab"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_batch_decode_matches_on_arrays(tokenizer_dirs, layout):
    ours, ref = _pair(tokenizer_dirs, layout)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, ours.vocab_size, (5, 12)).astype(np.int32)
    ids[:, -3:] = ours.eos_token_id
    for skip in (False, True):
        expected = ref.batch_decode(ids.tolist(), skip_special_tokens=skip)
        assert ours.batch_decode(ids, skip_special_tokens=skip) == expected
        assert ours.batch_decode(ids.tolist(), skip_special_tokens=skip) == expected
        assert [ours.decode(row, skip_special_tokens=skip) for row in ids] == expected


def test_decode_accepts_jax_arrays(tokenizer_dirs):
    jnp = pytest.importorskip("jax.numpy")
    ours, ref = _pair(tokenizer_dirs, "full")
    ids = ref.encode(TEXTS[9])
    assert ours.decode(jnp.asarray(ids)) == ref.decode(ids)
    assert ours.batch_decode(jnp.asarray([ids, ids])) == [ref.decode(ids)] * 2


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"padding": "longest"},
        {"padding": True},
        {"padding": "max_length", "max_length": 40, "truncation": True},
        {"padding": "max_length", "max_length": 6, "truncation": True},
        {"truncation": True, "max_length": 5},
    ],
)
@pytest.mark.parametrize("layout", ["extra", "bos_eos_vm"])
def test_call_matches(tokenizer_dirs, layout, kwargs):
    ours, ref = _pair(tokenizer_dirs, layout)
    if ref.pad_token is None:
        ref.pad_token = ref.eos_token  # ours pads with eos when there is no pad token
    texts = TEXTS[:8]
    got = ours(texts, **kwargs)
    padded = bool(kwargs.get("padding"))
    expected = ref(texts, return_tensors="np" if padded else None, **kwargs)
    for key in ("input_ids", "attention_mask"):
        if padded:
            assert got[key].dtype == np.int32
            np.testing.assert_array_equal(got[key], expected[key])
        else:
            assert got[key] == expected[key]
    # A single text gives one row (transformers keeps a batch axis when returning arrays).
    single = ours(texts[2], **kwargs)
    expected = ref(texts[2], return_tensors="np" if padded else None, **kwargs)
    for key in ("input_ids", "attention_mask"):
        want = expected[key][0] if padded else expected[key]
        assert np.asarray(single[key]).tolist() == np.asarray(want).tolist()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tokenizer_round_trips_through_transformers(tokenizer_dirs, layout, tmp_path):
    ours = Tokenizer.from_pretrained(tokenizer_dirs[layout])
    ours.save_pretrained(tmp_path)
    for ref in (
        GPT2TokenizerFast.from_pretrained(tmp_path),
        AutoTokenizer.from_pretrained(tmp_path),
    ):
        assert len(ref) == ours.vocab_size
        assert (ref.bos_token_id, ref.eos_token_id) == (ours.bos_token_id, ours.eos_token_id)
        assert ref.pad_token_id == ours.pad_token_id
        for text in TEXTS:
            ids = ours.encode(text)
            assert ref.encode(text) == ids, text
            assert ref.decode(ids, skip_special_tokens=True) == ours.decode(ids, True)
    again = Tokenizer.from_pretrained(tmp_path)
    assert [again.encode(t) for t in TEXTS] == [ours.encode(t) for t in TEXTS]
