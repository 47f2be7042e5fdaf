"""A run's curves, drawn from its metrics.jsonl with matplotlib (Agg: no display needed).

metrics.jsonl holds a row per logging step (`loss`, `learning_rate`, `examples_per_second`,
...) and a row per evaluation (`eval_loss`, `eval_CIDEr`, ...), each with its `step`.
`plot_run` draws four PNG files next to it, each from the rows that have its keys:

    loss.png          training loss (log y: it spans orders of magnitude) and evaluation loss
    learning_rate.png the schedule as it ran
    throughput.png    training examples per second
    eval_metrics.png  the caption metrics at each evaluation (BLEU-4, METEOR, ROUGE-L, CIDEr,
                      exact match), a panel each: their scales differ (CIDEr 0-10, exact
                      match in %, the others 0-1)
"""

from __future__ import annotations

import json
import os
from typing import Any

from nnx_caption.files import replacing

METRICS_FILE = "metrics.jsonl"
PLOT_FILES = ("loss.png", "learning_rate.png", "throughput.png", "eval_metrics.png")  # figures'
EVAL_METRICS = ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "exact_match")


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; a line that is not a JSON object (a run killed while
    writing it) is left out."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "step" in row:
                rows.append(row)
    return rows


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows that hold `key`, the last row of a step winning (a resumed
    run logs again the steps after its checkpoint)."""
    by_step = {row["step"]: row[key] for row in rows if isinstance(row.get(key), (int, float))}
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def figures(rows: list[dict]) -> dict[str, Any]:
    """file name -> matplotlib Figure, for each plot the rows have data for."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    def figure(title: str, ylabel: str):
        fig = Figure(figsize=(7, 4), dpi=120, layout="constrained")
        ax = fig.add_subplot()
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        ax.grid(True, which="both", alpha=0.3)
        return fig, ax

    out = {}
    train, evaluation = _series(rows, "loss"), _series(rows, "eval_loss")
    if train[0] or evaluation[0]:
        fig, ax = figure("loss", "cross-entropy per token")
        if train[0]:
            ax.plot(*train, label="training", linewidth=1.2)
        if evaluation[0]:
            ax.plot(*evaluation, "o-", label="evaluation", markersize=4)
        values = train[1] + evaluation[1]
        if min(values) > 0:  # a log axis needs positive values: a loss of exactly 0 has none
            ax.set_yscale("log")
        ax.legend()
        out["loss.png"] = fig
    for key, name, title, ylabel in (
        ("learning_rate", "learning_rate.png", "learning rate", "learning rate"),
        ("examples_per_second", "throughput.png", "training throughput", "examples / s"),
    ):
        steps, values = _series(rows, key)
        if steps:
            fig, ax = figure(title, ylabel)
            ax.plot(steps, values, linewidth=1.2)
            out[name] = fig
    found = [(m, _series(rows, f"eval_{m}")) for m in EVAL_METRICS]
    found = [(m, s) for m, s in found if s[0]]
    if found:
        fig = Figure(figsize=(7, 4), dpi=120, layout="constrained")
        fig.suptitle("caption metrics at each evaluation")
        columns = min(len(found), 3)
        rows_of_panels = -(-len(found) // columns)
        for i, (metric, series) in enumerate(found):
            ax = fig.add_subplot(rows_of_panels, columns, i + 1)
            ax.plot(*series, "o-", label=metric, markersize=4)
            ax.set(title=metric, xlabel="step")
            ax.grid(True, alpha=0.3)
        out["eval_metrics.png"] = fig
    return out


def plot_run(run_dir: str) -> list[str]:
    """Draws the plots of `run_dir`'s metrics.jsonl next to it; returns the files written."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (is {run_dir} a `train` output_dir?)")
    written = []
    for name, fig in figures(read_metrics(path)).items():
        target = os.path.join(run_dir, name)
        with replacing(target, "wb") as f:
            fig.savefig(f, format="png")
        written.append(target)
    return written
