"""`nnx-caption plot RUN_DIR`: the plots hold exactly what metrics.jsonl holds (training loss
on a log axis, evaluation loss and metrics at each evaluation, learning rate, throughput)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from nnx_caption import plots
from nnx_caption.cli import main as cli


def _rows() -> list[dict]:
    """A run as train_loop and evaluate write it: a loss falling from 2.9 to near 0, a
    first window with no throughput (its only step compiled), evaluations every 100 steps."""
    rows = []
    for step in range(10, 301, 10):
        rate = None if step == 10 else 800.0 + step
        rows.append(
            dict(
                step=step,
                loss=2.9 * 0.97**step,
                learning_rate=1e-3 * (1 - step / 300),
                grad_norm=1.0,
                examples_per_second=rate,
            )  # fmt: skip
        )
        if step % 100 == 0:
            rows.append(
                dict(
                    step=step,
                    eval_loss=3.0 * 0.98**step,
                    eval_CIDEr=step / 50,
                    eval_Bleu_4=step / 400,
                    eval_tokenizer="ptb",
                )  # fmt: skip
            )
    return rows


@pytest.fixture
def run_dir(tmp_path):
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for row in _rows():
            f.write(json.dumps(row) + "\n")
        f.write('{"step": 310, "loss": 0.0')  # killed mid-line: left out
    return tmp_path


def _lines(fig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {
        line.get_label(): tuple(map(np.asarray, line.get_data()))
        for ax in fig.axes
        for line in ax.lines
    }


def test_plots_hold_the_metrics_file(run_dir):
    rows = plots.read_metrics(str(run_dir / "metrics.jsonl"))
    assert rows == _rows()
    figs = plots.figures(rows)
    assert set(figs) == {"loss.png", "learning_rate.png", "throughput.png", "eval_metrics.png"}
    train = [r for r in _rows() if "loss" in r]
    evals = [r for r in _rows() if "eval_loss" in r]

    loss = _lines(figs["loss.png"])
    assert figs["loss.png"].axes[0].get_yscale() == "log"
    np.testing.assert_array_equal(loss["training"][0], [r["step"] for r in train])
    np.testing.assert_array_equal(loss["training"][1], [r["loss"] for r in train])
    np.testing.assert_array_equal(loss["evaluation"][1], [r["eval_loss"] for r in evals])

    (lr,) = _lines(figs["learning_rate.png"]).values()
    np.testing.assert_array_equal(lr[1], [r["learning_rate"] for r in train])
    (rate,) = _lines(figs["throughput.png"]).values()  # the compiling window has none
    np.testing.assert_array_equal(rate[0], [r["step"] for r in train[1:]])
    metrics = _lines(figs["eval_metrics.png"])
    assert set(metrics) == {"Bleu_4", "CIDEr"}  # a panel each, as the file orders them
    assert [ax.get_title() for ax in figs["eval_metrics.png"].axes] == ["Bleu_4", "CIDEr"]
    np.testing.assert_array_equal(metrics["CIDEr"][1], [r["eval_CIDEr"] for r in evals])


def test_plot_command_writes_pngs(run_dir, capsys):
    assert cli(["plot", str(run_dir)]) == 0
    for name in ("loss.png", "learning_rate.png", "throughput.png", "eval_metrics.png"):
        with Image.open(run_dir / name) as image:
            assert image.format == "PNG" and image.size == (840, 480)
            # Drawn, not blank: the curves add colours to the white page and grey grid.
            assert len(image.convert("RGB").getcolors(1 << 16)) > 20
    assert "loss.png" in capsys.readouterr().out


def test_plot_of_a_folder_without_metrics_is_a_usage_error(tmp_path, capsys):
    assert cli(["plot", str(tmp_path)]) == 2
    assert "metrics.jsonl: no such file" in capsys.readouterr().err


def test_a_zero_loss_keeps_a_linear_axis(tmp_path):
    rows = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.0}]
    assert plots.figures(rows)["loss.png"].axes[0].get_yscale() == "linear"
