"""The worked architecture edit (examples/gated_cross_attention.py) end to end: the script
itself, and the CLI training it with LoRA, exporting NNX layout and captioning with it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import nnx_caption as nc
from nnx_caption.cli import main as cli
from nnx_caption.data import make_shapes
from nnx_caption.edits import load_class

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = "examples/gated_cross_attention.py"
GATES = r"decoder\.blocks\.\d+\.gated\..*"


def test_the_example_runs_start_to_end(tmp_path):
    run = subprocess.run(
        [sys.executable, EXAMPLE, "--out", str(tmp_path), "--steps", "40"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "gates closed: logits equal the unedited model's: True" in run.stdout
    assert "logits identical: True" in run.stdout
    gates = json.loads(re.search(r"tanh\(gate\) per layer after 40 steps: (\[.*\])", run.stdout)[1])
    assert all(abs(g) > 1e-4 for g in gates), gates  # training opened every gate
    assert "exported NNX layout" in run.stderr
    assert (tmp_path / "run" / "nnx_model.safetensors").exists()


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(str(tmp_path_factory.mktemp("shapes")), n_train=64, n_validation=8, n_test=8)


def test_cli_trains_the_edit_with_lora_and_predicts_with_it(tmp_path, tiny_dir, shapes, capsys):
    run = tmp_path / "run"
    common = ["--model_class", f"{ROOT / EXAMPLE}:GatedCaptioner"]
    flags = ["train", "--model_name_or_path", str(tiny_dir), "--output_dir", str(run)]
    flags += ["--train_file", shapes["train"], "--image_column", "file_name"]
    flags += ["--caption_column", "text", "--do_train", "--max_steps", "3"]
    flags += ["--max_target_length", "12", "--per_device_train_batch_size", "8"]
    flags += ["--learning_rate", "1e-2"]
    # Without --new_params the load stops at once, naming a new parameter and the flag.
    assert cli([*flags, *common]) == 2
    assert "--new_params" in capsys.readouterr().err
    assert cli([*flags, *common, "--new_params", GATES, "--lora_rank", "2"]) == 0
    err = capsys.readouterr().err
    assert "exported NNX layout" in err and "have no Hugging Face name" in err
    cls = load_class(common[1])
    trained = nc.from_pretrained(run, model_cls=cls)
    stock = nc.from_pretrained(tiny_dir)
    gates = np.array([float(b.gated.gate[...]) for b in trained.decoder.blocks])
    assert np.all(gates != 0), gates  # declared new: trained in full beside the adapters
    # The adapters were merged at export: stock weights moved (LoRA), by a low-rank update.
    kernel = trained.decoder.blocks[0].attn.qkv.kernel[...]
    delta = np.asarray(kernel - stock.decoder.blocks[0].attn.qkv.kernel[...])
    delta = delta.reshape(kernel.shape[0], -1)
    assert np.abs(delta).max() > 0 and np.linalg.matrix_rank(delta, tol=1e-6) <= 2
    np.testing.assert_array_equal(
        np.asarray(trained.encoder.embeddings.patch.kernel[...]),
        np.asarray(stock.encoder.embeddings.patch.kernel[...]),
    )  # not a LoRA target, not new: frozen

    out = tmp_path / "predict"
    assert cli(["predict", str(run), shapes["test"], "--output-dir", str(out), *common]) == 0
    rows = [json.loads(line) for line in open(out / "predictions.jsonl")]
    assert len(rows) == 8
    pixels = nc.ImageProcessor.from_pretrained(run)([Image.open(rows[0]["image"])])
    want = nc.Tokenizer.from_pretrained(run).batch_decode(
        nc.generate(trained, jnp.asarray(pixels)).sequences, skip_special_tokens=True
    )
    assert rows[0]["caption"] == want[0].strip()
