"""nnx_caption.data on real files: tables, bad rows and images, targets, batch order. No torch."""

from __future__ import annotations

import csv
import itertools
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nnx_caption import data
from nnx_caption.data import CaptionDataset, DataError, Example, ImageStore, load_split
from nnx_caption.processing import ImageProcessor, Tokenizer

START = PAD = EOS = 335  # weights/tiny: GPT-2 style, <|endoftext|> is all three


@pytest.fixture(scope="module")
def tokenizer(tiny_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(tiny_dir)


@pytest.fixture
def processor() -> ImageProcessor:
    return ImageProcessor(size=12, image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.25])


def _noise(shape: tuple[int, ...], seed: int, dtype=np.uint8, high: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, high, shape).astype(dtype)


def _png(path: Path, seed: int = 0, size: int = 8) -> str:
    Image.fromarray(_noise((size, size, 3), seed)).save(path)
    return path.name


def _images(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    return [_png(folder / f"{i}.png", seed=i) for i in range(n)]


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _dataset(tmp_path: Path, tokenizer, n: int = 10, length: int = 8) -> CaptionDataset:
    names = _images(tmp_path / "images", n)
    table = _write_csv(
        tmp_path / "t.csv",
        ["image", "caption"],
        [[f"images/{name}", f"caption {i}"] for i, name in enumerate(names)],
    )
    split = load_split(str(table))
    return CaptionDataset(split, ImageProcessor(size=8), tokenizer, length, START, PAD, workers=0)


# -- reading tables ----------------------------------------------------------------------------


def test_csv_json_jsonl_and_imagefolder_read_alike(tmp_path):
    names = _images(tmp_path, 3)
    records = [{"image": n, "caption": f"caption {i}"} for i, n in enumerate(names)]
    _write_csv(tmp_path / "t.csv", ["image", "caption"], [list(r.values()) for r in records])
    (tmp_path / "t.json").write_text(json.dumps(records), encoding="utf-8")
    _write_jsonl(tmp_path / "t.jsonl", records)
    _write_jsonl(
        tmp_path / "metadata.jsonl",
        [{"file_name": r["image"], "text": r["caption"]} for r in records],
    )
    expected = [Example(str(tmp_path / r["image"]), r["caption"]) for r in records]
    for name in ("t.csv", "t.json", "t.jsonl"):
        split = load_split(str(tmp_path / name))
        assert split.examples == expected and split.skipped == []
    # imagefolder: the image column is file_name, whatever image_column says
    assert load_split(str(tmp_path), caption_column="text").examples == expected


def test_paths_are_relative_to_data_dir_when_given(tmp_path):
    names = _images(tmp_path / "pictures", 2)
    (tmp_path / "tables").mkdir()
    table = _write_csv(
        tmp_path / "tables" / "t.csv",
        ["image", "caption"],
        [
            [names[0], "first"],
            [str(tmp_path / "pictures" / names[1]), "absolute"],
        ],
    )
    split = load_split(str(table), data_dir=str(tmp_path / "pictures"))
    assert [e.image for e in split.examples] == [str(tmp_path / "pictures" / n) for n in names]
    # without data_dir they are relative to the table's folder, where they are not
    assert [w for w, _ in load_split(str(table)).skipped] == [f"{table}:2"]


def test_bad_rows_are_skipped_with_reasons(tmp_path):
    names = _images(tmp_path, 2)
    long_caption = "a dog " * 500
    table = _write_jsonl(
        tmp_path / "t.jsonl",
        [
            {"image": names[0], "caption": "good"},
            {"image": "missing.png", "caption": "no file"},
            {"image": names[0], "caption": ""},
            {"image": names[0], "caption": "  \t "},
            {"image": names[0], "caption": 7},
            {"image": names[0]},
            {"image": None, "caption": "no path"},
            {"image": names[1], "caption": long_caption},
        ],
    )
    split = load_split(str(table))
    assert [e.caption for e in split.examples] == ["good", long_caption]
    reasons = dict(split.skipped)
    assert list(reasons) == [f"{table}:{line}" for line in range(2, 8)]
    assert "image file not found" in reasons[f"{table}:2"]
    assert str(tmp_path / "missing.png") in reasons[f"{table}:2"]
    assert "empty caption" in reasons[f"{table}:3"] and "empty caption" in reasons[f"{table}:4"]
    assert "int" in reasons[f"{table}:5"] and "null" in reasons[f"{table}:6"]
    assert "no image path" in reasons[f"{table}:7"]


def test_max_samples_keeps_the_first_usable_rows(tmp_path):
    names = _images(tmp_path, 4)
    rows = [["missing.png", "x"]] + [[n, f"caption {i}"] for i, n in enumerate(names)]
    table = _write_csv(tmp_path / "t.csv", ["image", "caption"], rows)
    split = load_split(str(table), max_samples=2)
    assert [e.caption for e in split.examples] == ["caption 0", "caption 1"]
    assert len(split.skipped) == 1


def test_missing_file_or_metadata_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_split(str(tmp_path / "nope.csv"))
    with pytest.raises(DataError, match="metadata.jsonl"):
        load_split(str(tmp_path))


def test_missing_column_names_file_column_and_columns_present(tmp_path):
    table = _write_csv(tmp_path / "t.csv", ["image", "text"], [["a.png", "x"]])
    with pytest.raises(DataError) as info:
        load_split(str(table))
    assert str(table) in str(info.value) and "'caption'" in str(info.value)
    assert "image, text" in str(info.value)


def test_non_utf8_csv_names_file_and_line(tmp_path):
    table = tmp_path / "t.csv"
    table.write_bytes("image,caption\na.png,fine\nb.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=f"{table}:3: not valid UTF-8"):
        load_split(str(table))


def test_malformed_json_names_file_and_line(tmp_path):
    table = tmp_path / "t.jsonl"
    table.write_text('{"image": "a.png", "caption": "x"}\n\n{"image": "b.png", "caption": \n')
    with pytest.raises(DataError, match=f"{table}:3: malformed JSON line"):
        load_split(str(table))
    table = tmp_path / "t.json"
    table.write_text('[{"image": "a.png",\n "caption": }]')
    with pytest.raises(DataError, match=f"{table}:2: malformed JSON"):
        load_split(str(table))


def test_no_usable_rows_is_an_error(tmp_path):
    table = _write_csv(tmp_path / "t.csv", ["image", "caption"], [["missing.png", "x"]])
    with pytest.raises(DataError, match="no usable rows.*image file not found"):
        load_split(str(table))


# -- images ------------------------------------------------------------------------------------


def _modes(folder: Path) -> dict[str, str]:
    """A file per image mode the decoder must handle: name -> the mode PIL opens it in."""
    folder.mkdir(exist_ok=True)
    rgb = _noise((9, 14, 3), 0)
    Image.fromarray(rgb).save(folder / "rgb.png")
    Image.fromarray(rgb).convert("L").save(folder / "l.png")
    Image.fromarray(_noise((9, 14, 2), 1), "LA").save(folder / "la.png")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "p.png")
    Image.fromarray(_noise((9, 14, 4), 2), "RGBA").save(folder / "rgba.png")
    Image.fromarray(_noise((9, 14, 4), 3), "CMYK").save(folder / "cmyk.tif")
    Image.fromarray(_noise((9, 14), 4, np.uint16, 65536)).save(folder / "i16.png")
    return {
        "rgb.png": "RGB",
        "l.png": "L",
        "la.png": "LA",
        "p.png": "P",
        "rgba.png": "RGBA",
        "cmyk.tif": "CMYK",
        "i16.png": "I;16",
    }


@pytest.mark.parametrize("workers", [0, 2])
def test_image_store_equals_the_processor_for_every_mode(tmp_path, processor, workers):
    modes = _modes(tmp_path)
    paths = [str(tmp_path / name) for name in modes]
    for path, mode in zip(paths, modes.values(), strict=True):
        assert Image.open(path).mode == mode
    store = ImageStore(paths, processor, workers=workers)
    assert store.ok.all() and store.reasons == {}
    assert store._images.dtype == np.uint8  # 1 byte per value until a batch is made
    expected = processor([Image.open(p) for p in paths])
    np.testing.assert_allclose(store.pixels(np.arange(len(paths))), expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(store.pixels(np.array([3, 0, 3])), expected[[3, 0, 3]])


def test_workers_decode_as_this_process_does(tmp_path, processor):
    """grain's workers give the same pixels and failures, at the same indices, as decoding
    here: up front, and in batch streams (items out of order, repeated, split between the
    workers) with a cache filled as they go, each image decoded once, or without one."""
    paths = [str(tmp_path / n) for n in _images(tmp_path, 40)]
    for broken in (3, 20):  # the header reads, the data is cut: found only by decoding
        whole = Path(paths[broken]).read_bytes()
        Path(paths[broken]).write_bytes(whole[: len(whole) // 2])
    here = ImageStore(paths, processor, workers=0)
    there = ImageStore(paths, processor, workers=2)
    np.testing.assert_array_equal(there._images, here._images)
    assert there.reasons.keys() == here.reasons.keys() == {3, 20} and there.decoded == 40
    items = [np.array([(7 * i) % 40, (3 * i + 1) % 40, (7 * i) % 40]) for i in range(30)]
    for cache in (True, False):
        store = ImageStore(paths, processor, workers=2, cache=cache, preload=False)
        assert store.decoded == 0 and store.reasons == {}  # headers only: both read fine
        for item, (pixels, failed) in zip(items, store.stream(items), strict=True):
            np.testing.assert_array_equal(pixels, here.pixels(item))
            np.testing.assert_array_equal(failed, np.isin(item, [3, 20]))
        needed = len(np.unique(np.concatenate(items)))
        assert store.decoded == (needed if cache else sum(len(np.unique(i)) for i in items))
        assert {p for p, _ in store.late_failures} == {paths[3], paths[20]}


def test_bad_images_are_dropped_with_reasons(tmp_path, tokenizer, monkeypatch):
    good = [_png(tmp_path / f"good{i}.png", seed=i) for i in range(2)]
    (tmp_path / "zero.png").write_bytes(b"")
    _png(tmp_path / "whole.png", size=30)  # under the pixel limit set below
    data_bytes = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data_bytes[: len(data_bytes) // 2])
    _png(tmp_path / "bomb.png", size=64)  # 4096 pixels: over twice the limit set below
    (tmp_path / "text.png").write_text("not an image")
    names = [good[0], "zero.png", "truncated.png", "bomb.png", "text.png", good[1]]
    table = _write_csv(tmp_path / "t.csv", ["image", "caption"], [[n, n] for n in names])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # workers must honour it too

    split = load_split(str(table))
    assert len(split.examples) == 6  # every file exists: images are only read by the dataset
    ds = CaptionDataset(split, ImageProcessor(size=8), tokenizer, 8, START, PAD, workers=2)
    assert [e.caption for e in ds.examples] == good and len(ds) == 2
    reasons = dict(ds.skipped)
    assert list(reasons) == [str(tmp_path / n) for n in names[1:5]]
    assert "0 bytes" in reasons[str(tmp_path / "zero.png")]
    assert "truncated" in reasons[str(tmp_path / "truncated.png")]
    assert "decompression bomb" in reasons[str(tmp_path / "bomb.png")]
    assert "cannot identify image file" in reasons[str(tmp_path / "text.png")]
    np.testing.assert_array_equal(
        ds.batch(np.arange(2))["pixel_values"],
        ImageProcessor(size=8)([str(tmp_path / n) for n in good]),
    )


# -- targets -----------------------------------------------------------------------------------


def test_targets_are_lowercased_eos_terminated_truncated_and_shifted(tokenizer):
    captions = ["A Dog", "a dog " * 50]
    out = data.encode_targets(tokenizer, captions, 8, START, PAD)
    assert {k: (v.dtype, v.shape) for k, v in out.items()} == {
        k: (np.int32, (2, 8)) for k in ("labels", "decoder_input_ids", "decoder_attention_mask")
    }
    short = tokenizer.encode("a dog " + tokenizer.eos_token)
    assert short[-1] == EOS
    np.testing.assert_array_equal(out["labels"][0], short + [PAD] * (8 - len(short)))
    np.testing.assert_array_equal(
        out["decoder_attention_mask"][0], [1] * len(short) + [0] * (8 - len(short))
    )
    # a long caption is cut at max_target_length: its EOS is gone, as with HF's truncation
    assert EOS not in out["labels"][1] and out["decoder_attention_mask"][1].all()
    np.testing.assert_array_equal(out["labels"][1], tokenizer.encode(captions[1])[:8])
    np.testing.assert_array_equal(out["decoder_input_ids"][:, 0], [START, START])
    np.testing.assert_array_equal(out["decoder_input_ids"][:, 1:], out["labels"][:, :-1])


# -- batch order -------------------------------------------------------------------------------


def test_epoch_order_is_a_deterministic_permutation():
    order = data.epoch_order(50, seed=3, epoch=1)
    assert sorted(order) == list(range(50))
    np.testing.assert_array_equal(order, data.epoch_order(50, seed=3, epoch=1))
    assert not np.array_equal(order, data.epoch_order(50, seed=3, epoch=2))
    assert not np.array_equal(order, data.epoch_order(50, seed=4, epoch=1))


def _same(a: list[tuple[int, dict]], b: list[tuple[int, dict]]) -> bool:
    return [s for s, _ in a] == [s for s, _ in b] and all(
        x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
        for (_, x), (_, y) in zip(a, b, strict=True)
    )


def test_train_batches_follow_epoch_order_and_resume_exactly(tmp_path, tokenizer):
    ds = _dataset(tmp_path, tokenizer, n=10)
    assert len(ds) == 10 and ds.steps_per_epoch(3) == 3  # the tenth example is dropped
    run = list(itertools.islice(data.train_batches(ds, 3, seed=5), 10))
    assert [s for s, _ in run] == list(range(10))
    for step, batch in run:
        epoch, position = divmod(step, 3)
        indices = data.epoch_order(10, 5, epoch)[position * 3 : position * 3 + 3]
        assert _same([(step, batch)], [(step, ds.batch(indices))])
        assert batch["pixel_values"].shape == (3, 8, 8, 3)
    # an interrupted run resumed at step 4 goes on exactly as the uninterrupted one
    resumed = list(itertools.islice(data.train_batches(ds, 3, seed=5, start_step=4), 6))
    assert _same(resumed, run[4:])
    unprefetched = list(itertools.islice(data.train_batches(ds, 3, seed=5, prefetch=0), 10))
    assert _same(unprefetched, run)


def test_batches_of_images_with_several_captions(tmp_path, tokenizer):
    """captions_per_image k: each image once per epoch with k of its own captions (a random k
    of 3, or its only caption repeated), its pixels once per batch; exact on resume."""
    names = _images(tmp_path / "images", 5)
    counts = [3, 3, 1, 3, 3]  # image 2 has one caption
    rows = [[f"images/{n}", f"image {i} caption {j}"] for i, n in enumerate(names)
            for j in range(counts[i])]  # fmt: skip
    table = _write_csv(tmp_path / "t.csv", ["image", "caption"], rows)
    processor = ImageProcessor(size=8)
    ds = CaptionDataset(load_split(str(table)), processor, tokenizer, 8, START, PAD, workers=0)
    assert ds.images == 5 and ds.steps_per_epoch(4, 2) == 2  # 2 images a batch, one left over
    run = list(itertools.islice(data.train_batches(ds, 4, seed=3, captions_per_image=2), 6))
    store = ImageStore([str(tmp_path / "images" / n) for n in names], processor, workers=0)
    for epoch in range(3):
        groups = ds.image_groups(2, 3, epoch)
        assert sorted(ds.examples[g[0]].image for g in groups) == sorted(
            str(tmp_path / "images" / n) for n in names
        )
        for g in groups:  # both captions describe the group's image
            image = ds.examples[g[0]].image
            assert all(ds.examples[i].image == image for i in g)
            assert len(set(g)) == min(2, counts[names.index(Path(image).name)])
        for position in range(2):
            step, batch = run[epoch * 2 + position]
            chosen = groups[position * 2 : position * 2 + 2]
            assert batch["pixel_values"].shape == (2, 8, 8, 3)
            slots = [names.index(Path(ds.examples[g[0]].image).name) for g in chosen]
            np.testing.assert_array_equal(batch["pixel_values"], store.pixels(np.array(slots)))
            want = ds.batch(chosen.reshape(-1))
            np.testing.assert_array_equal(batch["labels"], want["labels"])
    assert not np.array_equal(ds.image_groups(2, 3, 0), ds.image_groups(2, 3, 1))
    resumed = list(
        itertools.islice(data.train_batches(ds, 4, seed=3, start_step=3, captions_per_image=2), 3)
    )
    assert _same(resumed, run[3:])
    with pytest.raises(DataError, match="groups of 3"):
        data.train_batches(ds, 4, seed=0, captions_per_image=3)


def test_each_process_gets_and_decodes_only_its_rows(tmp_path, tokenizer):
    """Two processes of a multi-host run walk the one global order: each gets its contiguous
    half of every global batch (the one-process batch's rows, split). Each decodes its block of
    the images up front (so that, exchanging what failed, all skip the rows one process
    would), then the images of its rows that another's block held, each once, into a cache of
    its own."""
    names = _images(tmp_path / "images", 16)
    table = _write_csv(
        tmp_path / "t.csv", ["image", "caption"], [[f"images/{n}", f"c {n}"] for n in names]
    )
    split = load_split(str(table))
    make = lambda process, workers: CaptionDataset(  # noqa: E731
        split, ImageProcessor(size=8), tokenizer, 8, START, PAD, workers, process=process
    )
    whole = make((0, 1), 0)
    assert whole.decoded == 16  # one process: every image up front
    one = list(itertools.islice(data.train_batches(whole, 4, seed=2), 4))  # one epoch
    seen = set()
    for index, workers in ((0, 2), (1, 0)):  # grain's workers, and none
        part = make((index, 2), workers)
        assert part.decoded == 8  # its block up front
        block = whole.batch(np.arange(8 * index, 8 * index + 8))["pixel_values"]
        block = {bytes(image) for image in block}
        mine = list(itertools.islice(data.train_batches(part, 4, seed=2, prefetch=0), 4))
        half = [(s, {k: v[2 * index : 2 * index + 2] for k, v in b.items()}) for s, b in one]
        assert _same(mine, half)
        images = {bytes(image) for _, b in half for image in b["pixel_values"]}
        assert len(images) == 8  # its half of the epoch's images
        assert part.decoded == len(block | images)  # each once: its block, then the rest
        again = list(itertools.islice(data.train_batches(part, 4, seed=2, start_step=4), 4))
        assert part.decoded <= 16 and len(again) == 4  # epoch 2 decodes only images new to it
        seen |= images
    assert len(seen) == 16  # between them, every image of the epoch
    with pytest.raises(DataError, match="does not split over 2 processes"):
        make((0, 2), 0).batch(np.arange(3))


def test_sampled_captions_cover_every_image_once_an_epoch(tmp_path, tokenizer):
    """captions_per_step "sample" (big_vision): an epoch is each image once with one of its
    captions, drawn anew each epoch; resumable; a bad choice is refused by name."""
    names = _images(tmp_path / "images", 6)
    rows = [
        [f"images/{n}", f"image {i} caption {j}"] for i, n in enumerate(names) for j in range(3)
    ]
    table = _write_csv(tmp_path / "t.csv", ["image", "caption"], rows)
    ds = CaptionDataset(load_split(str(table)), ImageProcessor(size=8), tokenizer, 8, START, PAD, 1)
    assert ds.steps_per_epoch(2) == 9 and ds.steps_per_epoch(2, captions_per_step="sample") == 3
    run = list(itertools.islice(data.train_batches(ds, 2, seed=4, captions_per_step="sample"), 9))
    chosen = []
    for epoch in range(3):
        groups = ds.image_groups(1, 4, epoch)[:, 0]
        assert sorted(ds.examples[i].image for i in groups) == sorted(
            set(e.image for e in ds.examples)
        )
        for position in range(3):
            _, batch = run[epoch * 3 + position]
            want = ds.batch(groups[position * 2 : position * 2 + 2])
            assert all(np.array_equal(batch[k], want[k]) for k in want)
        chosen.append([ds.examples[i].caption for i in groups])
    assert chosen[0] != chosen[1]  # another draw of captions each epoch
    resumed = data.train_batches(ds, 2, seed=4, start_step=5, captions_per_step="sample")
    assert _same(list(itertools.islice(resumed, 4)), run[5:])
    with pytest.raises(DataError, match="not one of all, sample"):
        data.train_batches(ds, 2, seed=4, captions_per_step="one")


SIGKILLED = """
import os, sys, time
import numpy as np
from nnx_caption.data import ImageStore
from nnx_caption.processing import ImageProcessor
class Forever:  # batches of one image, without end
    def __len__(self):
        return 2**62

    def __getitem__(self, i):
        return np.array([i % 4])

if __name__ == "__main__":
    store = ImageStore(sys.argv[1:], ImageProcessor(size=8), workers=2, cache=False)
    stream = store.stream(Forever())
    next(stream)  # the workers are up, decoding ahead into shared memory
    time.sleep(1)
    children = os.popen(f"pgrep -P {os.getpid()} -f spawn_main").read().split()
    workers = [c for c in children if open(f"/proc/{c}/stat").read().split()[2] != "Z"]
    held = set()  # the shared memory that this process and its workers have open
    for pid in [os.getpid(), *workers]:
        held |= {line.split()[-1] for line in open(f"/proc/{pid}/maps") if "/dev/shm/psm" in line}
    print(" ".join(workers), "|", " ".join(held), flush=True)
    time.sleep(600)
"""


def test_a_sigkilled_parent_leaves_no_workers_or_shared_memory(tmp_path):
    import os
    import select
    import signal
    import subprocess
    import sys
    import time

    paths = [str(tmp_path / n) for n in _images(tmp_path, 4)]
    script = tmp_path / "sigkilled.py"  # a file: spawned workers re-import the main module
    script.write_text(SIGKILLED)
    child = subprocess.Popen([sys.executable, str(script), *paths], stdout=subprocess.PIPE)
    try:  # its line within 120 s, or the test fails with the child killed
        ready, _, _ = select.select([child.stdout], [], [], 120)
        assert ready, "the child printed nothing in 120 s"
        workers, held = (part.split() for part in child.stdout.readline().decode().split("|"))
        assert len(workers) >= 2 and held and all(os.path.exists(block) for block in held)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()

    def alive(pid: str) -> bool:
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        state = (
            Path(f"/proc/{pid}/stat").read_text().split()[2]
            if Path(f"/proc/{pid}").exists()
            else "X"
        )
        return state not in "ZX"  # a zombie has exited

    def left() -> list[str]:
        return [w for w in workers if alive(w)] + [b for b in held if os.path.exists(b)]

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and left():
        time.sleep(0.2)
    assert not left(), "workers or shared memory outlived their killed parent"


KILLED_WHILE_SPAWNING = """
import sys, time
import numpy as np
from nnx_caption.data import ImageStore
from nnx_caption.processing import ImageProcessor
if __name__ == "__main__":
    store = ImageStore(sys.argv[1:], ImageProcessor(size=8), workers=2, cache=False)
    next(store.stream([np.array([i % 4]) for i in range(1000)]))  # starts the workers
    time.sleep(600)
"""


def test_a_parent_killed_while_its_workers_start_leaves_none_behind(tmp_path):
    """The parent is SIGKILLed as soon as its first worker process exists, while the workers
    are still importing: they are re-parented before they can note their parent, and must
    still end (with them grain's resource tracker, which lives while they do)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    import uuid

    paths = [str(tmp_path / n) for n in _images(tmp_path, 4)]
    script = tmp_path / "killed_while_spawning.py"
    script.write_text(KILLED_WHILE_SPAWNING)
    marker = f"NNX_CAPTION_TEST_MARK={uuid.uuid4().hex}".encode()
    env = {**os.environ, marker.decode().split("=")[0]: marker.decode().split("=")[1]}
    child = subprocess.Popen([sys.executable, str(script), *paths], env=env)

    def proc(pid: str, name: str) -> bytes:
        try:
            return Path(f"/proc/{pid}/{name}").read_bytes()
        except OSError:  # gone meanwhile
            return b""

    def marked() -> list[str]:  # the child's processes, however re-parented
        pids = [p.name for p in Path("/proc").iterdir() if p.name.isdigit()]
        return [p for p in pids if marker in proc(p, "environ").split(b"\0")]

    deadline = time.monotonic() + 120
    while not any(
        b"spawn_main" in proc(p, "cmdline")
        and proc(p, "stat").split()[3] == str(child.pid).encode()
        for p in marked()
    ):
        assert child.poll() is None and time.monotonic() < deadline, "no worker started"
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.wait()
    deadline = time.monotonic() + 30
    while marked() and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [(p, proc(p, "cmdline").replace(b"\0", b" ")[:80]) for p in marked()]
    for pid, _ in left:  # not left to run on after the test
        os.kill(int(pid), signal.SIGKILL)
    assert not left, f"outlived their killed parent: {left}"


CLEAN_EXIT = """
import gc, sys
import numpy as np
from nnx_caption.data import ImageStore
from nnx_caption.processing import ImageProcessor
if __name__ == "__main__":
    gc.disable()  # what is freed is freed by the pipeline, not by a collection that happened
    store = ImageStore(sys.argv[1:], ImageProcessor(size=8), workers=2)  # decoded up front
    lazy = ImageStore(sys.argv[1:], ImageProcessor(size=8), workers=2, preload=False)
    stream = lazy.stream([np.array([i % 4]) for i in range(50)])
    next(stream)
    stream.close()  # stopped early, as a run's last batches are
    print(sum("/dev/shm/psm" in line for line in open("/proc/self/maps")))
"""


def test_workers_leave_no_shared_memory_behind_at_exit(tmp_path):
    """Every shared-memory block the workers hand over is unlinked when its pipeline ends,
    whole or stopped early: Python's resource tracker finds none left to warn of at exit."""
    import subprocess
    import sys

    paths = [str(tmp_path / n) for n in _images(tmp_path, 4)]
    script = tmp_path / "clean_exit.py"
    script.write_text(CLEAN_EXIT)
    done = subprocess.run(
        [sys.executable, str(script), *paths], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["0"], "shared memory still mapped after the pipelines ended"
    assert "leaked" not in done.stderr, done.stderr[-2000:]


def test_train_batches_stop_their_thread_and_need_a_full_batch(tmp_path, tokenizer):
    ds = _dataset(tmp_path, tokenizer, n=4)
    before = threading.active_count()
    batches = data.train_batches(ds, 2, seed=0)
    next(batches)
    batches.close()
    assert threading.active_count() == before
    with pytest.raises(DataError, match="do not fill one batch"):
        data.train_batches(ds, 5, seed=0)


def test_eval_batches_cover_everything_once_padding_the_last(tmp_path, tokenizer):
    ds = _dataset(tmp_path, tokenizer, n=10)
    batches = list(data.eval_batches(ds, 4))
    assert [n for _, n in batches] == [4, 4, 2]
    expected = [np.arange(4), np.arange(4, 8), np.array([8, 9, 9, 9])]
    for (batch, _), indices in zip(batches, expected, strict=True):
        assert _same([(0, batch)], [(0, ds.batch(indices))])


def test_uncached_images_decode_per_batch_and_mask_late_failures(tmp_path):
    """Datasets larger than the cache limit decode each batch on demand: the same batches
    as the cached store; an image that passes the header check but is truncated is masked
    out of the loss when its batch comes, and reported."""
    from PIL import Image as PILImage

    from nnx_caption.data import CaptionDataset, Example, Split, train_caption_tokenizer
    from nnx_caption.processing import ImageProcessor, Tokenizer

    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        path = tmp_path / f"img{i}.png"
        PILImage.fromarray(rng.integers(0, 255, (20, 24, 3), np.uint8)).save(path)
        paths.append(str(path))
    good = (tmp_path / "img5.png").read_bytes()
    (tmp_path / "img5.png").write_bytes(good[: len(good) // 2])  # header fine, data cut
    captions = [f"a shape number {i}" for i in range(6)]
    train_caption_tokenizer(captions, str(tmp_path / "tok"))
    tok = Tokenizer.from_pretrained(tmp_path / "tok")
    proc = ImageProcessor(size=16)
    split = Split([Example(p, c) for p, c in zip(paths, captions, strict=True)], [])
    kw = dict(
        max_target_length=8,
        decoder_start_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
        workers=0,
    )
    cached = CaptionDataset(split, proc, tok, **kw)
    lazy = CaptionDataset(split, proc, tok, cache_limit_bytes=0, **kw)
    assert len(cached) == 5 and len(lazy) == 6  # the cache decodes up front and drops img5
    idx = np.arange(5)
    a, b = cached.batch(idx), lazy.batch(idx)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    last = lazy.batch(np.array([5, 0]))
    assert last["decoder_attention_mask"][0].sum() == 0 and last["decoder_attention_mask"][1].sum()
    assert lazy.late_failures and lazy.late_failures[0][0].endswith("img5.png")


def _coco(tmp_path: Path, images: int = 3, per_image: int = 5) -> tuple[Path, Path, list]:
    """A COCO captions file in its real layout (captions_val2017.json): its images in a
    folder of their own, five captions each, annotations interleaved as COCO's are."""
    image_dir = tmp_path / "val2017"
    image_dir.mkdir()
    entries, notes, want = [], [], []
    for i in range(images):
        name = f"{139 + i:012d}.jpg"
        Image.fromarray(_noise((48, 64, 3), i)).save(image_dir / name)
        entries.append({"license": 1, "file_name": name, "height": 48, "width": 64, "id": 139 + i})
    for k in range(per_image):
        for i in range(images):
            caption = f"image {i} caption {k}"
            notes.append({"image_id": 139 + i, "id": 1000 + len(notes), "caption": caption})
            want.append(Example(str(image_dir / f"{139 + i:012d}.jpg"), caption))
    path = tmp_path / "captions_val2017.json"
    coco = {"info": {"year": 2017}, "licenses": [], "images": entries, "annotations": notes}
    path.write_text(json.dumps(coco))
    return path, image_dir, want


def test_coco_captions_file(tmp_path, tokenizer, processor):
    path, image_dir, want = _coco(tmp_path)
    split = load_split(str(path), data_dir=str(image_dir))
    assert split.examples == want and not split.skipped
    # Evaluation captions each image once, against all five of its references.
    ds = CaptionDataset(split, processor, tokenizer, 8, START, PAD, workers=0)
    rows, references = ds.image_rows()
    assert [ds.examples[r].image for r in rows] == [e.image for e in want[:3]]
    assert references == [[f"image {i} caption {k}" for k in range(5)] for i in range(3)]
    bad = json.loads(path.read_text())
    del bad["images"][0]["file_name"]
    path.write_text(json.dumps(bad))
    with pytest.raises(DataError, match="captions_val2017.json.*file_name"):
        load_split(str(path), data_dir=str(image_dir))


def test_karpathy_split_file(tmp_path):
    """dataset_coco.json in its real layout: one file, every split; each role reads its own."""
    names = _images(tmp_path / "val2014", 5)
    splits = ["train", "restval", "val", "test", "train"]
    images = [
        {
            "filepath": "val2014",
            "filename": name,
            "imgid": i,
            "split": s,
            "cocoid": 42 + i,
            "sentences": [
                {"tokens": ["a", "b"], "raw": f"{s} {i} {k}.", "imgid": i, "sentid": k}
                for k in range(2)
            ],
        }  # fmt: skip
        for i, (name, s) in enumerate(zip(names, splits, strict=True))
    ]
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))

    def captions(**kw) -> list[str]:
        return [e.caption for e in load_split(str(path), data_dir=str(tmp_path), **kw).examples]

    assert captions() == ["train 0 0.", "train 0 1.", "train 4 0.", "train 4 1."]
    assert captions(karpathy_restval=True)[2:4] == ["restval 1 0.", "restval 1 1."]
    assert captions(split="validation") == ["val 2 0.", "val 2 1."]
    assert captions(split="test") == ["test 3 0.", "test 3 1."]
    example = load_split(str(path), data_dir=str(tmp_path), split="test").examples[0]
    assert example.image == str(tmp_path / "val2014" / names[3])
