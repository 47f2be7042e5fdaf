"""What a person watching a `train` run sees, and what the run leaves to read later: the
progress bar, metrics.jsonl and TensorBoard."""

from __future__ import annotations

import json
import os
import time

import numpy as np
from tqdm import tqdm

from nnx_caption import processes, rundir
from nnx_caption.plots import METRICS_FILE


def append_metrics(output_dir: str, row: dict) -> None:
    """One row of metrics.jsonl: a logging step's training metrics or an evaluation's."""
    with open(os.path.join(output_dir, METRICS_FILE), "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


class TrainLog:
    """What a person watching a run sees, and what it leaves to read later: the progress bar,
    and at each logging step a metrics.jsonl row and TensorBoard scalars of the steps since
    the last one, with their throughput (the compiling first step is left out of both)."""

    def __init__(self, output_dir: str, start: int, total: int, steps_per_epoch: int):
        # Imported here: images made for accelerators may lack it, and `bench` and `predict`
        # (which import the package) do not need it.
        from tensorboardX import SummaryWriter

        self.output_dir, self.total, self.steps_per_epoch = output_dir, total, steps_per_epoch
        self.start = start  # the step the run starts (or resumes) from
        self.writer = processes.is_main()  # process 0 writes the run directory
        # A resumed run's TensorBoard drops what earlier runs logged from this step on.
        path = os.path.join(output_dir, rundir.TENSORBOARD)
        self.board = SummaryWriter(path, purge_step=start or None) if self.writer else None
        self.bar = None  # made after the first step, which compiles: its ETA would count it
        self.window: list[dict] = []  # the steps' metrics since the last logging step
        self.timed_steps, self.timed_since = 0, 0.0  # in the window, after the compiling one

    def step(self, metrics: dict) -> None:
        """Notes a step's metrics (still on the device: nothing waits for them here)."""
        self.window.append(metrics)
        if self.bar is None:
            self.bar = tqdm(
                total=self.total,
                initial=self.start + 1,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                mininterval=2.0,
                disable=not self.writer,
            )
            self.timed_since = time.perf_counter()
        else:
            self.timed_steps += 1
            self.bar.update(1)

    def log(self, done: int, examples_per_step: int) -> dict:
        """The logging row of the steps since the last one, written to metrics.jsonl and
        TensorBoard (reading it waits for those steps)."""
        window = self.window
        logged = {k: float(np.mean([float(m[k]) for m in window])) for k in window[0]}
        now = time.perf_counter()  # float() above waited for the window's steps
        # Examples per second of the steps timed in the window: none when its only step was
        # the compiling one.
        seconds = now - self.timed_since
        rate = self.timed_steps * examples_per_step / seconds if self.timed_steps else None
        logged.update(step=done, epoch=done / self.steps_per_epoch, examples_per_second=rate)
        self.window, self.timed_steps, self.timed_since = [], 0, now
        if self.writer:
            append_metrics(self.output_dir, logged)  # NaN too: the row a divergence shows
            for key in ("loss", "learning_rate", "grad_norm", "examples_per_second"):
                if logged[key] is not None and np.isfinite(logged[key]):
                    self.board.add_scalar(f"train/{key}", logged[key], done)
            self.board.flush()
        self.bar.set_postfix(
            loss=f"{logged['loss']:.3f}",
            lr=f"{logged['learning_rate']:.2e}",
            ex_s="-" if rate is None else f"{rate:.0f}",
        )
        return logged

    def restart_timing(self) -> None:
        """After an evaluation: it is not training throughput."""
        self.timed_since = time.perf_counter()

    def __enter__(self) -> TrainLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.board is not None:
            self.board.close()
