"""`nnx-caption predict` on real files made with PIL: inputs, skipping, outputs, batching."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import pathlib
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

import nnx_caption as nc
from nnx_caption.cli import main
from nnx_caption.edits import load_class
from nnx_caption.generate import _search
from nnx_caption.hub import copy_aux_files
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


class _Cards(HTMLParser):
    """gallery.html's cards (class, image, references, beams without their scores, words)
    and its attention maps and summary line."""

    def __init__(self):
        super().__init__()
        self.cards, self.maps, self.summary = [], None, ""
        self.lists, self.open, self.inside = [], None, []  # (ul / ol), the item filled, tags

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.inside.append(tag)
        if tag == "figure":
            card = dict(id=attrs["id"].removeprefix("card"), cls=attrs["class"].split())
            self.cards.append(dict(card, refs=[], beams=[], words=[]))
        elif tag == "img" and self.cards:
            self.cards[-1]["src"] = attrs["src"]
        elif tag in ("ul", "ol"):
            self.lists.append("refs" if tag == "ul" else "beams")
        elif tag == "li" and self.lists:
            self.open = self.cards[-1][self.lists[-1]]
            self.open.append("")
        elif tag == "span" and "word" in attrs.get("class", ""):
            self.open = self.cards[-1]["words"]
            self.open.append("")

    def handle_endtag(self, tag):
        self.inside.pop()
        if tag in ("ul", "ol"):
            self.lists.pop()
        if tag in ("li", "span"):
            self.open = None

    def handle_data(self, data):
        if self.inside[-1:] == ["script"] and self.maps is None and data.startswith("{"):
            self.maps = json.loads(data)
        elif self.inside[-1:] == ["b"] and not self.cards:
            self.summary += data
        elif self.open is not None and self.inside[-1] != "small":  # a beam's score is <small>
            self.open[-1] += data


def test_gallery_shows_references_matches_beams_and_attention(tiny_dir, tmp_path):
    """A csv with reference captions (two rows of one image: two references): every image is
    a card with its references and whether its caption matches one, wrong ones first, the
    summary's exact match; every beam with its score; each word's attention map, the one
    generate returns."""
    good = _make_good(tmp_path / "imgs")
    model = nc.from_pretrained(tiny_dir)
    proc, tok = nc.ImageProcessor.from_pretrained(tiny_dir), nc.Tokenizer.from_pretrained(tiny_dir)
    direct = nc.generate(
        model, proc(good), num_beams=2, num_return_sequences=2, output_cross_attentions=True
    )
    texts = [t.strip() for t in tok.batch_decode(direct.sequences, skip_special_tokens=True)]
    captions = texts[::2]
    # Image 0 has its own caption among two references; the others only wrong ones.
    rows = [(good[0], "not it"), (good[0], captions[0].upper())]
    rows += [(path, f"wrong {i}") for i, path in enumerate(good[1:])]
    with open(tmp_path / "refs.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "text"), *rows])
    out = tmp_path / "out"
    code = main(
        ["predict", str(tiny_dir), str(tmp_path / "refs.csv"), "--output_dir", str(out)]
        + ["--caption_column", "text", "--num_beams", "2", "--attention-maps"]
    )
    assert code == 0

    records = _read_jsonl(out / "predictions.jsonl")
    assert [r["image"] for r in records] == good  # one record per image, in table order
    assert [r["match"] for r in records] == [True] + [False] * (len(good) - 1)
    assert records[0]["references"] == ["not it", captions[0].upper()]
    for i, r in enumerate(records):
        assert [c["caption"] for c in r["candidates"]] == texts[2 * i : 2 * i + 2]
        np.testing.assert_allclose(
            [c["score"] for c in r["candidates"]], direct.scores[2 * i : 2 * i + 2], rtol=1e-5
        )

    page = _Cards()
    page.feed((out / "gallery.html").read_text(encoding="utf-8"))
    assert len(page.cards) == len(good)
    assert "wrong" in page.cards[0]["cls"] and "right" in page.cards[-1]["cls"]  # wrong first
    assert f"exact match {100 / len(good):.1f}%" in page.summary
    by_refs = {tuple(c["refs"]): c for c in page.cards}
    for i, r in enumerate(records):
        card = by_refs[tuple(r["references"])]
        assert ("right" if r["match"] else "wrong") in card["cls"]
        assert [b.strip() for b in card["beams"]] == texts[2 * i : 2 * i + 2]
        assert "".join(card["words"]).strip() == r["caption"]
        # The card's maps: generate's weights of its best beam, CLS left out, averaged over
        # heads and layers, scaled to their maximum, in bytes.
        rows_, cols, views, data = page.maps[card["id"]]
        maps = np.frombuffer(base64.b64decode(data), np.uint8).reshape(-1, views, rows_ * cols)
        n = len(card["words"])
        weights = direct.cross_attentions[2 * i, :n, ..., 1:].mean(axis=(1, 2))  # (n, patches)
        want = weights / weights.max(axis=-1, keepdims=True)
        np.testing.assert_allclose(maps[:, 0] / 255, want, atol=1 / 255)
        assert views == 1 + model.config.decoder.n_layer


GATED = "examples/gated_cross_attention.py:GatedCaptioner"


def test_attention_maps_of_an_edited_model_that_overrides_its_blocks(
    tiny_dir, tmp_path, monkeypatch
):
    """`predict --attention_maps --model_class` on the project's gated cross-attention example
    (its block overrides __call__): the gallery has each word's maps, and with its gates closed
    the edit is neutral, so captions, beams and maps are the stock model's."""
    monkeypatch.chdir(pathlib.Path(__file__).parents[2])  # the spec is relative to the repo
    gated = nc.from_pretrained(
        tiny_dir, model_cls=load_class(GATED), new_params=(r"decoder\.blocks\.\d+\.gated\..*",)
    )
    saved = tmp_path / "gated"
    nc.save_pretrained(gated, saved, layout="nnx")
    copy_aux_files(str(tiny_dir), str(saved))
    good = _make_good(tmp_path / "imgs")
    flags = ["--num_beams", "2", "--attention_maps", "--batch_size", "2"]
    pages = []
    for name, model, more in (("stock", tiny_dir, []), ("gated", saved, ["--model_class", GATED])):
        out = tmp_path / name
        assert main(["predict", str(model), *good, "--output_dir", str(out), *flags, *more]) == 0
        page = _Cards()
        page.feed((out / "gallery.html").read_text(encoding="utf-8"))
        pages.append((_read_jsonl(out / "predictions.jsonl"), page))
    (stock_records, stock_page), (gated_records, gated_page) = pages
    assert gated_records == stock_records
    assert len(gated_page.cards) == len(good) and gated_page.maps
    for card in gated_page.cards:
        assert card["words"]
        assert gated_page.maps[card["id"]] == stock_page.maps[card["id"]]
