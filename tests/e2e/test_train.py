"""`nnx-caption train` end to end on the shapes data: learns, evaluates, exports a checkpoint
transformers loads, and resumes exactly after SIGKILL or SIGTERM."""

from __future__ import annotations

import html
import json
import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shapes_runs import cli, launch, params, read_scalars, train_args, wait_for

import nnx_caption as nc
from nnx_caption.metrics import caption_metrics


def test_hf_example_command_trains_evaluates_and_exports(setup, tmp_path):
    """The training command of HF's example README, on a local csv instead of the hub
    dataset (the only change besides the script name)."""
    root, out = setup["root"], tmp_path / "results"
    proc = cli(
        "train",
        "--output_dir",
        str(out),
        "--model_name_or_path",
        str(setup["init"]),
        "--train_file",
        str(root / "train.csv"),
        "--validation_file",
        str(root / "validation.csv"),
        "--image_column",
        "image_path",
        "--caption_column",
        "caption",
        "--do_train",
        "--do_eval",
        "--predict_with_generate",
        "--num_train_epochs",
        "6",
        "--eval_steps",
        "500",
        "--learning_rate",
        "3e-3",
        "--warmup_steps",
        "0",
        "--per_device_train_batch_size",
        "32",
        "--per_device_eval_batch_size",
        "32",
        "--overwrite_output_dir",
        "--logging_steps",
        "8",
        "--max_target_length",
        "16",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    logged = [r for r in rows if "loss" in r]  # training rows; the evaluation's is last
    assert logged[-1]["loss"] < 0.6 * logged[0]["loss"]
    results = json.loads((out / "eval_results.json").read_text())
    assert rows[-1] == {"step": logged[-1]["step"], **results}
    for key in ("eval_loss", "eval_Bleu_4", "eval_ROUGE_L", "eval_CIDEr", "eval_rougeL"):
        assert key in results
    assert results["eval_Bleu_1"] > 0.3
    generated = json.loads((out / "generated_eval.json").read_text())
    # One entry per image, scored against all its references (the COCO protocol).
    assert len(generated) == 32 and set(generated[0]) == {"image", "prediction", "references"}
    assert [len(g["references"]) for g in generated] == [2] * 8 + [1] * 24
    assert all(g["references"][1] == "a picture" for g in generated[:8])
    scores = caption_metrics(
        [g["prediction"] for g in generated], [g["references"] for g in generated]
    )
    assert results["eval_CIDEr"] == pytest.approx(scores["CIDEr"])
    # The evaluation's gallery: a card per image with its prediction, references and match.
    page = (out / "gallery_eval.html").read_text(encoding="utf-8")
    assert page.count("<figure") == len({g["image"] for g in generated})
    for g in generated:
        assert html.escape(g["references"][0]) in page and html.escape(g["prediction"]) in page
    right = sum(g["prediction"].lower() in {r.lower() for r in g["references"]} for g in generated)
    assert page.count('class="card right"') == right
    assert f"exact match {results['eval_exact_match']:.1f}%" in page
    for plot in ("loss.png", "learning_rate.png", "throughput.png", "eval_metrics.png"):
        assert Image.open(out / plot).size == (840, 480), plot
    # The progress bar and the throughput leave the compiling first step out; it is logged.
    assert re.search(r"compiled train step in \d+\.\d s", proc.stderr)
    assert "compiled generation in" in proc.stderr and "compiled eval step in" in proc.stderr
    assert logged[0]["examples_per_second"] > 0
    losses = read_scalars(next((out / "tensorboard").glob("events.out.tfevents.*")))
    assert losses["train/loss"] == pytest.approx([r["loss"] for r in logged], rel=1e-6)

    import torch
    from transformers import VisionEncoderDecoderModel

    ref = VisionEncoderDecoderModel.from_pretrained(out).eval()
    ours = nc.from_pretrained(out)
    pixels = np.random.default_rng(0).standard_normal((2, 32, 32, 3), dtype=np.float32)
    ids = np.array([[ours.config.decoder_start_token_id, 5, 9]] * 2, np.int32)
    with torch.no_grad():
        want = ref(
            pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2),
            decoder_input_ids=torch.from_numpy(ids).long(),
        ).logits.numpy()
    np.testing.assert_allclose(ours(pixels, ids), want, atol=1e-4)


def test_killed_at_any_point_the_same_command_ends_as_the_straight_run(setup, tmp_path):
    """SIGKILL before the first checkpoint, SIGTERM (a clean save, exit 0), SIGKILL as soon as
    the step-16 checkpoint starts being written (in the background, so mostly mid-save): each
    time the same command goes on, and the last one ends with the weights of a run that was
    never interrupted, bit for bit. Another global batch is then refused."""
    straight = cli(*train_args(setup, tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    out, checkpoints = tmp_path / "killed", tmp_path / "killed" / "checkpoints"

    proc = launch(setup, out)  # killed before its first checkpoint
    wait_for(proc, out / "train_args.json")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not list(checkpoints.glob("step_*"))
    assert (out / "train.lock").exists()  # the killed run's: taken over below

    log = tmp_path / "sigterm.log"
    with open(log, "w") as stderr:  # SIGTERM: saves at the next step boundary, exits 0
        proc = launch(setup, out, stderr)
        wait_for(proc, checkpoints / "step_00000008" / "_CHECKPOINT_METADATA")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=240)
    err = log.read_text()
    assert proc.returncode == 0, err[-3000:]
    assert "starting over" in err and "SIGTERM: saved step" in err
    assert "taking over the lock of a run that is gone" in err
    assert not (out / "train.lock").exists()  # released at the clean stop
    assert not (out / "config.json").exists()  # it stopped mid-run, before the export

    proc = launch(setup, out)  # SIGKILL during an async save
    wait_for(proc, checkpoints, "step_00000016*")  # the temporary folder orbax writes first
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "config.json").exists()

    resumed = cli(*train_args(setup, out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    want, got = params(tmp_path / "straight"), params(out)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    # Resumed with another global batch, the data position would point at other examples.
    other = cli(*train_args(setup, out), "--per_device_train_batch_size", "8")
    assert other.returncode == 2 and "global batch of 16" in other.stderr, other.stderr[-2000:]


def test_bad_flags_and_data_stop_before_training(setup, tmp_path):
    root = setup["root"]
    proc = cli(
        "train",
        "--output_dir",
        str(tmp_path / "o"),
        "--model_name_or_path",
        str(setup["init"]),
        "--train_file",
        str(root / "train.csv"),
        "--do_train",
        "--image_column",
        "picture",
        "--max_target_length",
        "16",
    )
    assert proc.returncode == 2 and "picture" in proc.stderr and "train.csv" in proc.stderr
    proc = cli(
        "train",
        "--output_dir",
        str(tmp_path / "o2"),
        "--model_name_or_path",
        str(setup["init"]),
        "--do_train",
    )
    assert proc.returncode == 2 and "--train_file" in proc.stderr
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    proc = cli(
        "train",
        "--output_dir",
        str(tmp_path / "busy"),
        "--model_name_or_path",
        str(setup["init"]),
        "--train_file",
        str(root / "train.csv"),
        "--do_train",
        "--image_column",
        "image_path",
        "--max_target_length",
        "16",
    )
    assert proc.returncode == 2 and "--overwrite_output_dir" in proc.stderr
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_help_documents_every_flag():
    proc = cli("train", "--help")
    assert proc.returncode == 0
    for flag in (
        "--model_name_or_path",
        "--label_smoothing_factor",
        "--predict_with_generate",
        "--gradient_accumulation_steps",
        "--save_total_limit",
        "--mesh_fsdp",
        "--freeze",
        "--push_to_hub",
        "--hub_model_id",
        "--dataset_config_name",
    ):
        assert flag in proc.stdout


def test_lora_run_exports_plain_weights(setup, tmp_path):
    out = tmp_path / "lora"
    args = train_args(setup, out)
    args[args.index("--max_steps") + 1] = "4"
    # Also the uncached image path: every batch decoded on demand by worker processes.
    proc = cli(*args, "--lora_rank", "4", "--image_cache_gb", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LoRA rank 4" in proc.stderr
    merged, init = params(out), params(setup["init"])  # strict load: no adapter tensors left
    assert set(merged) == set(init)
    moved = [k for k in merged if not np.array_equal(merged[k], init[k])]
    assert moved and all(k.endswith("kernel") for k in moved)  # only adapted kernels changed


def test_speed_flags_train(setup, tmp_path):
    """--captions_per_image (each image encoded once for its 2 captions), --scan_layers and
    remat with a policy, wired through the CLI: the run trains; bad values stop it before
    training, naming the flag."""
    out = tmp_path / "fast"
    args = train_args(setup, out)
    args[args.index("--max_steps") + 1] = "8"
    proc = cli(
        *args,
        "--captions_per_image",
        "2",
        "--scan_layers",
        "--gradient_checkpointing",
        "--remat_policy",
        "dots_with_no_batch_dims_saveable",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [r["loss"] for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r]
    assert len(losses) == 2 and losses[-1] < losses[0]
    for flag, value in (("--captions_per_image", "3"), ("--remat_policy", "keep_all")):
        proc = cli(*train_args(setup, tmp_path / flag.strip("-")), flag, value)
        assert proc.returncode == 2 and flag in proc.stderr, proc.stderr[-2000:]


def test_hf_datasets_imagefolder(setup, tmp_path):
    """--dataset_name imagefolder --data_dir: HF datasets' own builder (no download)."""
    data_root = Path(setup["splits"]["train"]).parent
    proc = cli(
        "train",
        "--output_dir",
        str(tmp_path / "ds"),
        "--model_name_or_path",
        str(setup["init"]),
        "--dataset_name",
        "imagefolder",
        "--data_dir",
        str(data_root),
        "--image_column",
        "image",
        "--caption_column",
        "text",
        "--do_train",
        "--do_eval",
        "--max_steps",
        "2",
        "--max_train_samples",
        "64",
        "--max_eval_samples",
        "16",
        "--per_device_train_batch_size",
        "16",
        "--max_target_length",
        "16",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train: 64 examples" in proc.stderr and "eval: 16 examples" in proc.stderr
    assert json.loads((tmp_path / "ds" / "eval_results.json").read_text())["eval_loss"] > 0


def _five_references(caption: str) -> list[str]:
    """Five captions of one image, as COCO has (the shapes caption and four rewordings)."""
    return [caption, f"a picture of {caption}", f"{caption} on a plain background",
            f"there is {caption}", f"an image showing {caption}"]  # fmt: skip


def _shapes_rows(setup, split: str, n: int) -> list[tuple[Path, str]]:
    folder = Path(setup["splits"][split])
    rows = [json.loads(line) for line in open(folder / "metadata.jsonl")][:n]
    return [(folder / r["file_name"], r["text"]) for r in rows]


def test_coco_captions_files_train_and_score_as_cocoevalcap(setup, tmp_path, monkeypatch):
    """COCO's own layout: annotations/captions_{train,val}2017.json and the image folders
    train2017/ and val2017/ under one --image_dir. Evaluation captions each val image once and
    scores it against its five references: the scores are pycocoevalcap's COCOEvalCap on the
    same predictions, run on the val annotation file itself."""
    import shutil

    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    ids = {}
    for split, source, n in (("train2017", "train", 64), ("val2017", "validation", 16)):
        (root / split).mkdir()
        images, notes = [], []
        for i, (path, caption) in enumerate(_shapes_rows(setup, source, n)):
            image_id = 1000 * (split == "val2017") + 7 * i + 3
            name = f"{image_id:012d}.png"
            shutil.copy(path, root / split / name)
            ids[name] = image_id
            images.append({"id": image_id, "file_name": name, "height": 32, "width": 32})
            notes += [{"id": 10 * image_id + j, "image_id": image_id, "caption": c}
                      for j, c in enumerate(_five_references(caption))]  # fmt: skip
        notes = notes[::2] + notes[1::2]  # COCO's annotations are not grouped by image
        coco = {"info": {}, "licenses": [], "images": images, "annotations": notes}
        (root / "annotations" / f"captions_{split}.json").write_text(json.dumps(coco))
    out = tmp_path / "out"
    proc = cli(
        "train",
        *("--model_name_or_path", str(setup["init"]), "--output_dir", str(out)),
        *("--train_file", str(root / "annotations" / "captions_train2017.json")),
        *("--validation_file", str(root / "annotations" / "captions_val2017.json")),
        *("--image_dir", str(root), "--do_train", "--do_eval", "--predict_with_generate"),
        *("--max_steps", "40", "--per_device_train_batch_size", "32", "--learning_rate", "3e-3"),
        *("--max_target_length", "16", "--per_device_eval_batch_size", "16"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train: 320 examples" in proc.stderr and "eval: 80 examples" in proc.stderr
    generated = json.loads((out / "generated_eval.json").read_text())
    assert len(generated) == 16 and all(len(g["references"]) == 5 for g in generated)
    results = json.loads((out / "eval_results.json").read_text())

    from pycocoevalcap import eval as cocoeval
    from pycocotools.coco import COCO

    class NoSpice:  # SPICE downloads Stanford CoreNLP on first use; it is not one of ours
        def method(self) -> str:
            return "SPICE"

        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

    monkeypatch.setattr(cocoeval, "Spice", NoSpice)
    ground_truth = COCO(str(root / "annotations" / "captions_val2017.json"))
    predictions = [
        {"image_id": ids[Path(g["image"]).name], "caption": g["prediction"]} for g in generated
    ]
    evaluation = cocoeval.COCOEvalCap(ground_truth, ground_truth.loadRes(predictions))
    evaluation.evaluate()
    for name in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"):
        assert results[f"eval_{name}"] == pytest.approx(evaluation.eval[name], rel=1e-9), name
    assert results["eval_Bleu_1"] > 0.1  # it learned: the untrained model scores under 0.01


def test_karpathy_split_file_gives_each_flag_its_split(setup, tmp_path):
    """dataset_coco.json, the file captioning papers train and test on: one file, every split.
    As --train_file it is its train split (with restval under --karpathy_restval), as
    --validation_file its val split, as --test_file its test split."""
    import shutil

    root = tmp_path / "coco"
    images, sentence = [], 0
    splits = ["train"] * 16 + ["restval"] * 8 + ["val"] * 4 + ["test"] * 4
    for i, ((path, caption), split) in enumerate(
        zip(_shapes_rows(setup, "train", len(splits)), splits, strict=True)
    ):
        folder = "val2014" if split != "train" else "train2014"
        name = f"COCO_{folder}_{i:012d}.png"
        (root / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, root / folder / name)
        sentences = [
            {"raw": r, "tokens": r.split(), "imgid": i, "sentid": sentence + j}
            for j, r in enumerate(_five_references(caption))
        ]
        sentids = [s["sentid"] for s in sentences]
        images.append(
            dict(filepath=folder, filename=name, split=split, cocoid=i, imgid=i, sentids=sentids)
            | {"sentences": sentences}
        )
        sentence += 5
    karpathy = root / "dataset_coco.json"
    karpathy.write_text(json.dumps({"images": images, "dataset": "coco"}))
    out = tmp_path / "out"
    proc = cli(
        "train",
        *("--model_name_or_path", str(setup["init"]), "--output_dir", str(out)),
        *("--train_file", str(karpathy), "--validation_file", str(karpathy)),
        *("--test_file", str(karpathy), "--karpathy_restval", "--image_dir", str(root)),
        *("--do_train", "--do_eval", "--do_predict", "--predict_with_generate"),
        *("--max_steps", "2", "--per_device_train_batch_size", "16"),
        *("--max_target_length", "16", "--per_device_eval_batch_size", "4"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train: 120 examples" in proc.stderr  # (16 train + 8 restval images) x 5
    for prefix, split in (("eval", "val"), ("test", "test")):
        generated = json.loads((out / f"generated_{prefix}.json").read_text())
        want = [im for im in images if im["split"] == split]
        assert [Path(g["image"]).name for g in generated] == [im["filename"] for im in want]
        assert [g["references"] for g in generated] == [
            [s["raw"] for s in im["sentences"]] for im in want
        ]
        assert set(json.loads((out / f"{prefix}_results.json").read_text())) >= {
            f"{prefix}_loss",
            f"{prefix}_CIDEr",
        }
