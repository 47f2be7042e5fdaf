"""`nnx-caption predict` on real files made with PIL: inputs, skipping, outputs, batching."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

import nnx_caption as nc
from nnx_caption.cli import main
from nnx_caption.generate import _search
from nnx_caption.predict import predict


def _noise(h: int, w: int, channels: int, seed: int) -> np.ndarray:
    shape = (h, w, channels) if channels > 1 else (h, w)
    return np.random.RandomState(seed).randint(0, 256, shape, np.uint8)


def _make_good(folder) -> list[str]:
    """Readable images of different sizes and modes (names sort in this order)."""
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    Image.fromarray(_noise(30, 40, 3, 0)).save(folder / "a_rgb.png")
    Image.fromarray(_noise(50, 17, 1, 1), "L").save(folder / "b_gray.png")
    Image.fromarray(_noise(64, 64, 4, 2), "RGBA").save(folder / "c_rgba.png")
    Image.fromarray(_noise(25, 25, 3, 3)).convert("P", palette=Image.Palette.ADAPTIVE).save(
        folder / "d_palette.gif"
    )
    Image.fromarray(_noise(48, 36, 3, 4)).save(folder / "sub" / "e_photo.jpg", quality=90)
    return [str(folder / n) for n in ("a_rgb.png", "b_gray.png", "c_rgba.png", "d_palette.gif")] + [
        str(folder / "sub" / "e_photo.jpg")
    ]


def _make_bad(folder) -> dict[str, str]:
    """Unreadable images -> a word their skip reason contains."""
    (folder / "empty.png").write_bytes(b"")
    buffer = io.BytesIO()
    Image.fromarray(_noise(64, 64, 3, 5)).save(buffer, format="JPEG", quality=95)
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (folder / "text.png").write_text("not an image\n")
    Image.new("L", (120, 120)).save(folder / "bomb.png")  # a bomb once MAX_IMAGE_PIXELS is low
    (folder / "notes.txt").write_text("not an image extension: never looked at\n")
    return {
        "empty.png": "0 bytes",
        "truncated.jpg": "truncated",
        "text.png": "cannot identify",
        "bomb.png": "DecompressionBomb",
    }


def _direct_captions(model_dir, paths: list[str]) -> list[tuple[str, float]]:
    """Each image captioned alone through the public API: the reference for batched runs."""
    model = nc.from_pretrained(model_dir)
    proc = nc.ImageProcessor.from_pretrained(model_dir)
    tok = nc.Tokenizer.from_pretrained(model_dir)
    out = []
    for path in paths:
        with Image.open(path) as image:
            result = nc.generate(model, proc([image]))
        text = tok.batch_decode(result.sequences, skip_special_tokens=True)[0]
        out.append((text.strip(), float(result.scores[0])))
    return out


def _read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])


def test_folder_skips_bad_images_and_matches_direct_captions(
    tiny_dir, tmp_path, monkeypatch, capsys
):
    folder = tmp_path / "images"
    good = _make_good(folder)
    bad = _make_bad(folder)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # 120x120 > 2x: an error, not a warning
    out = tmp_path / "out"

    summary = predict(str(tiny_dir), [str(folder)], str(out), batch_size=3)  # 3 doesn't divide 5

    assert summary["captioned"] == len(good) and summary["skipped"] == len(bad)
    records = _read_jsonl(out / "predictions.jsonl")
    assert [r["image"] for r in records] == good  # sorted, recursive, input order kept
    expected = _direct_captions(tiny_dir, good)
    assert [r["caption"] for r in records] == [caption for caption, _ in expected]
    np.testing.assert_allclose([r["score"] for r in records], [s for _, s in expected], rtol=1e-5)
    assert len({r["caption"] for r in records}) > 1  # the captions do depend on the image

    skipped = {
        r["image"].rsplit("/", 1)[-1]: r["reason"] for r in _read_jsonl(out / "skipped.jsonl")
    }
    assert skipped.keys() == bad.keys()
    stderr = capsys.readouterr().err
    for name, why in bad.items():
        assert why in skipped[name], (name, skipped[name])
        assert any(name in line and why in line for line in stderr.splitlines()), name

    page = (out / "gallery.html").read_text(encoding="utf-8")
    parser = _Images()
    parser.feed(page)
    assert len(parser.srcs) == len(good)
    for src in parser.srcs:
        assert src.startswith("data:image/jpeg;base64,")
        thumb = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert max(thumb.size) <= 224
    for record in records:
        assert html.escape(record["caption"]) in page
    assert html.escape(str(tiny_dir)) in page and "batch_size=3" in page


def test_partial_last_batch_compiles_once(tiny_dir, tmp_path):
    good = _make_good(tmp_path / "images")
    _search.clear_cache()
    summary = predict(str(tiny_dir), good, str(tmp_path / "out"), batch_size=2, progress=False)
    assert summary["captioned"] == 5
    assert _search._cache_size() == 1  # batches of 2, 2 and a padded 1 share one compile


def test_csv_jsonl_json_and_glob_inputs(tiny_dir, tmp_path, monkeypatch):
    data = tmp_path / "data"
    good = _make_good(data / "imgs")
    names = [p[len(str(data)) + 1 :] for p in good]  # relative to the tables' folder
    with open(data / "train.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        writer.writerows([n, "a caption, with a comma"] for n in names[:3])
    (data / "val.jsonl").write_text("".join(json.dumps({"file": n}) + "\n" for n in names[3:]))
    (data / "test.json").write_text(json.dumps([{"file": n} for n in names[:2]]))
    monkeypatch.chdir(tmp_path)  # relative table paths: images resolve from the table's folder
    out = tmp_path / "out"

    code = main(["predict", str(tiny_dir), "data/train.csv", "--output-dir", str(out)])
    assert code == 0
    assert [r["image"] for r in _read_jsonl(out / "predictions.jsonl")] == [
        f"data/{n}" for n in names[:3]
    ]

    summary = predict(
        str(tiny_dir), ["data/val.jsonl", "data/test.json"], str(out), image_column="file"
    )
    records = _read_jsonl(out / "predictions.jsonl")
    assert [r["image"] for r in records] == [f"data/{n}" for n in names[3:] + names[:2]]
    assert summary["captioned"] == 4 and summary["skipped"] == 0

    predict(str(tiny_dir), ["data/imgs/*.png"], str(out), batch_size=4, limit=2)
    assert [r["image"] for r in _read_jsonl(out / "predictions.jsonl")] == [
        "data/imgs/a_rgb.png",
        "data/imgs/b_gray.png",
    ]
    # The same images give the same captions whichever way they were listed.
    by_path = {r["image"]: r["caption"] for r in records}
    assert by_path["data/imgs/a_rgb.png"] == _read_jsonl(out / "predictions.jsonl")[0]["caption"]


@pytest.mark.parametrize(
    "setup, argument, named",
    [
        ("missing_column", "data.csv", "no column 'image'"),
        ("missing_key", "data.jsonl", "no column 'image'"),
        ("none", "no_such_dir/*.png", "no_such_dir/*.png"),
        ("none", "missing.png", "missing.png"),
        ("empty_folder", "empty", "empty"),
        ("all_bad", "bad", "none of the 1 images"),
    ],
)
def test_errors_exit_2_naming_the_problem(
    tiny_dir, tmp_path, monkeypatch, capsys, setup, argument, named
):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    if setup == "missing_column":
        (tmp_path / "data.csv").write_text("path,caption\nok.png,hi\n")
    elif setup == "missing_key":
        (tmp_path / "data.jsonl").write_text('{"path": "ok.png"}\n')
    elif setup == "empty_folder":
        (tmp_path / "empty").mkdir()
    elif setup == "all_bad":
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "x.png").write_bytes(b"")

    code = main(["predict", str(tiny_dir), argument, "--output-dir", "out"])

    err = capsys.readouterr().err
    assert code == 2
    assert "nnx-caption predict: error:" in err and named in err
    if setup in ("missing_column", "missing_key"):
        assert argument in err
    if setup == "all_bad":  # the reasons are still written down
        assert "0 bytes" in (tmp_path / "out" / "skipped.jsonl").read_text()


def test_bad_generation_setting_exits_2_before_decoding(tiny_dir, tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    args = [str(tmp_path / "ok.png"), "--output-dir", str(tmp_path / "out"), "--max-length", "999"]
    assert main(["predict", str(tiny_dir), *args]) == 2
    assert "max_length" in capsys.readouterr().err
